"""One command that proves the guide's CUDA path on a GPU: every check prints one line, every
figure goes into a JSON, and the exit code is 0 only if every correctness check passes.

    python benchmarks/gpu_check.py                   # GPU: 73 s on an H200 (2026-12-04)
    python benchmarks/gpu_check.py --device cpu      # the same code on CPU paths, tiny sizes (tests)

Runs from a plain copy of the working tree with torch, triton and transformers only: no install,
no vLLM import, and `vllm_sgl.kernels` is registered from ./kernels if the link did not travel.
Lines: PASS / FAIL (correctness: FAIL sets the exit code), WARN (works, but not as intended, e.g.
the decode step's attention on SDPA's math kernel), INFO (figures), GOAL (issue 11's per-request
targets at qwen2.5-vl-3b, met or missed; never the exit code).

Checks: environment; varlen attention (bf16 on CUDA against the CPU path in fp32); the decode step
(graph replay against the eager step, its SDPA backend, ms per step); the Triton importance kernel
against its PyTorch definition and its compilations across two KV capacities; the keep rules' cost
("sgl" and "sgl-sdpp": ms, peak memory, equality with the torch definition); Guide.run on every
tiny family against vllm_sgl.reference (graphs on/off x importance triton/torch); the peak memory
of a full guide_max_batch call against the warm-up's; bench_guide.py at qwen2.5-vl-3b.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _device_arg(argv: list[str]) -> str:
    """--device as argparse reads it (`--device cpu` and `--device=cpu`), before torch and triton load."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="cuda")
    return pre.parse_known_args(argv)[0].device


DEVICE = _device_arg(sys.argv[1:])
if DEVICE == "cpu":  # the Triton kernel runs in Triton's interpreter; set before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from bare_tree import register_kernels  # noqa: E402

KERNELS_FROM = register_kernels()

try:
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except ImportError:  # pragma: no cover - reported by the environment check
    pass

from vllm_sgl.guide import Guide, GuideRequest  # noqa: E402
from vllm_sgl.guide.attention import Segments, flash_plan, flash_plans, sdpa_varlen, varlen_attention  # noqa: E402
from vllm_sgl.guide.decode import decode_step  # noqa: E402
from vllm_sgl.guide.profile import profile_decode_step  # noqa: E402

FAMILIES = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe_guide", "internvl"]
# Issue 11's goals, ms per request.
GOALS = {32: dict(total=40, vision=15, prefill=15, decode=8, importance=2), 1: dict(total=250)}
MAX_TOKENS = 8


class Report:
    def __init__(self):
        self.records: list[dict] = []

    def line(self, status: str, name: str, text: str, **figures) -> None:
        print(f"{status:<4} {name}: {text}", flush=True)
        self.records.append(dict(status=status, check=name, text=text, **figures))

    @property
    def failed(self) -> list[str]:
        return [r["check"] for r in self.records if r["status"] == "FAIL"]


def run_check(report: Report, name: str, fn, *args) -> None:
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            fn(report, *args)
    except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
        report.line("FAIL", name, f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    seconds = round(time.perf_counter() - t0, 2)
    print(f"     ({name}: {seconds} s)", flush=True)
    report.records.append(dict(status="TIME", check=name, seconds=seconds))


# -- checks ---------------------------------------------------------------------------------------


def check_environment(report: Report, dev: torch.device) -> None:
    import inspect

    versions = dict(python=platform.python_version(), torch=torch.__version__)
    for mod in ("triton", "transformers", "torchvision", "PIL"):
        try:
            versions["Pillow" if mod == "PIL" else mod] = __import__(mod).__version__
        except ImportError:
            versions["Pillow" if mod == "PIL" else mod] = None
    try:
        from torch.nn.attention.varlen import varlen_attn

        sig = str(inspect.signature(varlen_attn))
    except ImportError:
        sig = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "CPU"
    report.line("INFO", "environment", f"{name}; " + ", ".join(f"{k} {v}" for k, v in versions.items())
                + f"; cuDNN {cudnn}; vllm_sgl.kernels: {KERNELS_FROM}", device=name, versions=versions,
                cudnn=cudnn, kernels_from=KERNELS_FROM, varlen_signature=sig)
    report.line("INFO", "varlen signature", str(sig))
    if "vllm" in sys.modules:
        report.line("FAIL", "no vllm", "vllm was imported")


def check_varlen(report: Report, dev: torch.device, dtype: torch.dtype) -> None:
    """varlen_attention (flash on CUDA in bf16) against the CPU path in fp32, with the split views
    the guide passes, grouped heads and not, causal and not."""
    g = torch.Generator().manual_seed(0)
    lengths = [1, 37, 256, 700, 64] if dev.type == "cuda" else [1, 9, 30, 17]
    worst, cases = 0.0, 0
    for d in (64, 80, 128):
        for hq, hkv in ((16, 16), (16, 2), (12, 2)):
            qkv = torch.randn(sum(lengths), hq + 2 * hkv, d, generator=g)
            split = lambda x: (x[:, :hq], x[:, hq : hq + hkv], x[:, hq + hkv :])  # noqa: E731
            seg_cpu, seg = Segments.build(lengths, "cpu"), Segments.build(lengths, dev)
            for causal in (True, False):  # the definition from the same (rounded) inputs, in fp32
                want = sdpa_varlen(*split(qkv.to(dtype).float()), seg_cpu, causal, d**-0.5)
                got = varlen_attention(*split(qkv.to(dev, dtype)), seg, causal, d**-0.5).float().cpu()
                err = (got - want).abs().max().item()
                worst, cases = max(worst, err), cases + 1
    tol = 2e-2 if dtype != torch.float32 else 1e-5
    plan = flash_plan(dev, dtype).describe() if dev.type == "cuda" and dtype != torch.float32 else "SDPA path"
    report.line("PASS" if worst <= tol else "FAIL", "varlen attention",
                f"{cases} cases (D 64/80/128, GQA 1/8/6, causal and not), max abs err {worst:.2e} (tol {tol:g}); "
                f"plan {plan}", max_abs_err=worst, tol=tol, plans=flash_plans())
    if dev.type == "cuda" and isinstance(plan, dict) and not plan["usable"]:
        report.line("WARN", "varlen plan", "torch's varlen_attn gave no correct result: the SDPA path is used")


def tiny_pair(family: str):
    from vllm_sgl.tiny import TinyPairSpec, default_pair_dir, ensure_tiny_pair

    base = "qwen3_vl_moe" if family == "qwen3_vl_moe_guide" else family
    pair = ensure_tiny_pair(default_pair_dir(f"tiny-{base}"), TinyPairSpec(family=base))
    return (pair[1], pair[1]) if family == "qwen3_vl_moe_guide" else pair


def check_decode(report: Report, dev: torch.device, dtype: torch.dtype) -> None:
    """Graph replay against the eager step over several steps at a padded batch (3 real rows of 4)."""
    guide = Guide.load(tiny_pair("qwen2_5_vl")[0], dev, dtype, 16, importance_backend="torch", max_batch=4,
                       kv_tokens=1024, cuda_graphs=True, stop_at_eos=False)
    st = guide._state(4, 256)
    g = torch.Generator().manual_seed(0)
    guide._kv.copy_(torch.randn(guide._kv.shape, generator=g).to(dev, dtype))

    def reset():
        st.tokens.copy_(torch.tensor([5, 17, 99, 0]))
        st.lens.copy_(torch.tensor([40, 100, 7, 0]))
        st.pos.copy_(st.lens)
        st.done.copy_(torch.tensor([False, False, False, True]))
        st.qrow0.copy_(torch.tensor([0, 16, 32, 48]))
        st.step.zero_()
        st.out_tokens.zero_()
        st.out_probs.fill_(1.0)

    kv0 = guide._kv.clone()
    reset()
    for _ in range(6):
        decode_step(guide.text, st)
    eager = [t.clone() for t in (st.out_tokens, st.out_probs, st.lens)]
    kv_eager = guide._kv.clone()
    guide._kv.copy_(kv0)
    reset()
    for _ in range(6):
        guide.steps(st)
    graphs = bool(guide.steps._graphs)
    same_tokens = torch.equal(st.out_tokens, eager[0]) and torch.equal(st.lens, eager[2])
    prob_err = (st.out_probs - eager[1]).abs().max().item()
    kv_err = (guide._kv.float() - kv_eager.float()).abs().max().item()
    ok = same_tokens and prob_err <= 1e-5 and kv_err <= 1e-5
    report.line("PASS" if ok else "FAIL", "decode graph replay",
                f"{'graph replay' if graphs else 'eager (no CUDA graphs on ' + dev.type + ')'} vs eager step, 6 steps "
                f"at batch 4 (3 real rows): tokens {'equal' if same_tokens else 'DIFFER'}, max prob err "
                f"{prob_err:.1e}, max K/V err {kv_err:.1e}", graphs=graphs, prob_err=prob_err, kv_err=kv_err)
    prof = profile_decode_step(guide, 4)
    status = "WARN" if "math" in prof.sdpa_backends or not prof.sdpa_backends else "INFO"
    report.line(status, "decode SDPA backend", f"{prof.sdpa_backends} ({prof.ops} ops, {prof.syncs} host syncs "
                "per step)", sdpa_backends=prof.sdpa_backends, ops=prof.ops, syncs=prof.syncs)
    if prof.syncs:
        report.line("FAIL", "decode host syncs", f"{prof.syncs} in one step: {prof.sync_names}")


def check_decode_attention(report: Report, dev: torch.device, dtype: torch.dtype) -> None:
    """The decode step's attention call (strided (B, Hkv, G, D) queries, an additive (B, 1, 1, cap)
    mask) on the kernels it is given (DECODE_SDPA_BACKENDS) against SDPA's math kernel on the same
    inputs, and both against fp32: graph replay vs eager runs one kernel both ways, so this is
    where the chosen kernel meets a reference. Qwen2.5-VL-3B's heads on CUDA."""
    from types import SimpleNamespace

    from torch.nn.attention import SDPBackend

    from vllm_sgl.guide.decode import DECODE_SDPA_BACKENDS, attend
    from vllm_sgl.guide.profile import SDPA_BACKENDS

    b, hq, hkv, d, cap = (8, 16, 2, 128, 1536) if dev.type == "cuda" else (3, 4, 2, 64, 256)
    text = SimpleNamespace(kv_heads=hkv, scale=d**-0.5)
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, b, cap, hkv, d, generator=g).to(dev, dtype)
    q = torch.randn(b, hq, d, generator=g).to(dev, dtype)
    lens = torch.randint(1, cap, (b,), generator=g).to(dev)
    visible = torch.arange(cap, device=dev)[None, :] < lens[:, None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=dev).masked_fill_(~visible, float("-inf"))[:, None, None]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        chosen = attend(text, q, kv[0], kv[1], mask).float()
    ran = sorted({SDPA_BACKENDS[e.name] for e in prof.events() if e.name in SDPA_BACKENDS})
    math = attend(text, q, kv[0], kv[1], mask, backends=[SDPBackend.MATH]).float()
    exact = attend(text, q.float(), kv[0].float(), kv[1].float(), mask.float(), backends=[SDPBackend.MATH])
    err_math = (chosen - math).abs().max().item()
    err_fp32 = (chosen - exact).abs().max().item()
    err_math_fp32 = (math - exact).abs().max().item()
    tol = 2e-2 if dtype != torch.float32 else 1e-5
    want = {"efficient"} if dev.type == "cuda" else set(ran)
    ok = err_fp32 <= max(tol, 2 * err_math_fp32) and set(ran) == want
    report.line("PASS" if ok else "FAIL", "decode attention vs math",
                f"{[b.name for b in DECODE_SDPA_BACKENDS] if dev.type == 'cuda' else 'default'} ran {ran}, B {b} "
                f"Hq {hq} Hkv {hkv} D {d} cap {cap} {str(dtype).split('.')[-1]}: max err vs math {err_math:.1e}, "
                f"vs fp32 {err_fp32:.1e} (math's own {err_math_fp32:.1e}; tol {tol:g})", ran=ran,
                err_vs_math=err_math, err_vs_fp32=err_fp32, math_err_vs_fp32=err_math_fp32)


def check_importance(report: Report, dev: torch.device, dtype: torch.dtype) -> None:
    """The Triton kernel against its PyTorch definition (paged, as the guide calls it), and how many
    compilations a second KV capacity causes."""
    try:
        from vllm_sgl.kernels import importance_triton as KT
    except ImportError as exc:
        report.line("WARN", "importance triton", f"triton unavailable: {exc}")
        return
    from vllm_sgl.kernels import visual_importance_paged_ref

    big = dev.type == "cuda"
    L, hq, hkv, d = (36, 16, 2, 128) if big else (2, 4, 2, 64)
    n, text, rows, batch = (1024, 60, 64, 4) if big else (48, 10, 12, 2)
    g = torch.Generator().manual_seed(0)
    worst, before, counts = 0.0, KT.compiled_variants(), []
    for cap in ((1536, 2048) if big else (128, 192)):
        keys = n + text + 8
        cache = (torch.randn(L, batch, cap, hkv, d, generator=g)).to(dev, dtype)
        queries = (torch.randn(L, batch * rows, hq, d, generator=g) * 2).to(dev, dtype)
        args = (torch.arange(batch, dtype=torch.int32)[:, None], torch.tensor([keys] * batch),
                torch.arange(0, batch * rows + 1, rows), torch.arange(keys - rows, keys).repeat(batch),
                torch.arange(batch), torch.full((batch,), 4), torch.full((batch,), n))
        got = KT.visual_importance_paged_triton(queries, cache, *args)
        want = visual_importance_paged_ref(queries.float(), cache.float(), *args)
        tol = 2e-5 * want.abs() + 5e-7 * L * hq * rows + 1e-7  # docs/KERNEL.md's tolerance
        worst = max(worst, ((got - want).abs() / tol).max().item())
        counts.append(KT.compiled_variants())
    report.line("PASS" if worst <= 1 else "FAIL", "importance triton vs torch",
                f"paged, L{L} Hq{hq} Hkv{hkv} D{d}, N {n}, {rows} rows x {batch} requests: max err / tol {worst:.2f} "
                "(tol 2e-5 |ref| + 5e-7 L Hq rows + 1e-7, as docs/KERNEL.md)", worst_err_over_tol=worst)
    if counts[0] is None:
        report.line("INFO", "importance compilations", "interpreter: nothing is compiled")
        return
    first = {k: counts[0][k] - (before or {}).get(k, 0) for k in counts[0]}
    second = {k: counts[1][k] - counts[0][k] for k in counts[1]}
    report.line("PASS" if not any(second.values()) else "FAIL", "importance compilations",
                f"first capacity compiled {first}, a second capacity {second}", first=first, second=second)


def check_keep_rules(report: Report, dev: torch.device) -> None:
    """keep_set with "sgl" and "sgl-sdpp" (the Triton kernels) on square grids of N tokens x batch
    images, keep 0.1 and 0.99: ms and peak memory per call, and the keep sets against the torch
    definition on the same device (bit for bit: q and S come from the same torch ops, IEEE division
    and square root, no FMA). On the CPU Triton's interpreter runs small sizes."""
    try:
        from vllm_sgl.kernels import importance_triton as KT
    except ImportError as exc:
        report.line("WARN", "keep rule cost", f"triton unavailable: {exc}")
        return
    import warnings

    from vllm_sgl.kernels import keep_count, keep_set_ref
    from vllm_sgl.kernels._args import sdpp_scratch_elems

    cuda = dev.type == "cuda"
    sizes, batches = ((1024, 4096, 16384), (1, 8, 32)) if cuda else ((64, 324), (2,))
    g = torch.Generator(device=dev).manual_seed(0)
    differ, figures = [], []

    def timed(fn):
        if not cuda:
            t0 = time.perf_counter()
            return fn(), (time.perf_counter() - t0) * 1e3, None
        fn()  # compiled, warm
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize(dev)
        return out, start.elapsed_time(end), torch.cuda.max_memory_allocated(dev) - base

    for n in sizes:
        side = int(n**0.5)
        for batch in batches:
            imp = torch.rand(batch * n, generator=g, device=dev)
            cu = torch.arange(batch + 1) * n
            rules, lay = ["sgl-sdpp"] * batch, [(side, n)] * batch
            for ratio in ((0.1, 0.99) if cuda or n <= 64 else (0.1,)):  # the interpreter is slow
                (top, _), top_ms, top_mem = timed(lambda: KT.keep_set_triton(imp, cu, ratio))
                (got, _), ms, mem = timed(lambda: KT.keep_set_triton(imp, cu, ratio, rules=rules, layouts=lay))
                want = keep_set_ref(imp, cu, ratio, rules=rules, layouts=lay)[0]
                same = torch.equal(got, want) and torch.equal(top, keep_set_ref(imp, cu, ratio)[0])
                if not same:
                    differ.append(f"N {n} batch {batch} keep {ratio}")
                k = keep_count(n, ratio)
                rec = dict(n=n, batch=batch, keep_ratio=ratio, sgl_ms=top_ms, sdpp_ms=ms, sgl_peak_bytes=top_mem,
                           sdpp_peak_bytes=mem, scratch_bytes=4 * sdpp_scratch_elems([n] * batch, [k] * batch),
                           equal=same)
                figures.append(rec)
                memory = (f", peak {top_mem / 2**20:.1f} / {mem / 2**20:.1f} MiB" if cuda else "")
                report.line("INFO", f"keep rule N {n} batch {batch} keep {ratio}",
                            f"sgl {top_ms:.2f} ms, sgl-sdpp {ms:.2f} ms ({ms / max(top_ms, 1e-9):.1f}x){memory}; "
                            f"scratch {rec['scratch_bytes'] / 2**20:.2f} MiB; "
                            f"{'equal to' if same else 'DIFFERS from'} the torch definition", **rec)
    report.line("FAIL" if differ else "PASS", "keep rules triton vs torch",
                f"{len(figures)} keep-set pairs (sgl, sgl-sdpp) on {dev.type}: "
                + ("all equal to the torch definition" if not differ else "differ: " + "; ".join(differ)),
                differ=differ)
    if cuda:  # host syncs of one sgl-sdpp call: the metadata copy only
        n, batch = sizes[0], batches[-1]
        imp = torch.rand(batch * n, generator=g, device=dev)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                KT.keep_set_triton(imp, torch.arange(batch + 1) * n, 0.5, rules=["sgl-sdpp"] * batch,
                                   layouts=[(int(n**0.5), n)] * batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message)[:80] for w in caught if "synchroniz" in str(w.message)]
        report.line("INFO" if len(syncs) <= 1 else "WARN", "keep rule host syncs",
                    f"{len(syncs)} in one sgl-sdpp call (the metadata copy: 1)", syncs=syncs)


def _family_requests(ref, cases):
    from vllm_sgl.images import synthetic_image
    from vllm_sgl.pruning import keep_count

    expected, requests = [], []
    for i, (question, images) in enumerate(cases):
        imgs = [synthetic_image(seed, size) for seed, size in images]
        prep = ref.prepare(imgs, question)
        _, _, answer, top1, importance = ref.guide_pass(prep, MAX_TOKENS)
        expected.append((answer, importance))
        requests.append(GuideRequest(
            str(i), prep.input_ids.tolist(), prep.pixel_values, prep.image_grid_thw,
            [keep_count(n, 0.25) for _, n in prep.visual_spans],
            image_tiles=None if prep.image_grid_thw is not None else [n // 256 for _, n in prep.visual_spans]))
    return expected, requests


# Importance tolerance (relative, with 1e-6 absolute) of the guide against the fp32 reference, as
# tests/test_guide_runtime.py's IMPORTANCE_REL: Qwen3-VL's deepstack adds rounding (CPU: 1.1e-4 to
# 2.0e-4 for the dense guide; the MoE guide 3.3e-4 on AVX-512).
FAMILY_REL_TOL = {"qwen3_vl": 3e-4, "qwen3_vl_moe_guide": 5e-4}


def check_family(report: Report, dev: torch.device, family: str) -> None:
    """Guide.run (fp32, so answers and keep sets can be exact) on one tiny family against the
    reference: graphs on and off, importance backend triton and torch. Each family is its own
    check, so one family's failure hides none of the others; on the CPU two requests, graphs off,
    the Triton kernel (interpreter) on Qwen2.5-VL only."""
    from vllm_sgl.pruning import keep_set
    from vllm_sgl.reference import SGLReference

    cases = [("what is in the image", [(1, (448, 224))]),
             ("what shape is at the top", [(8, (280, 168)), (9, (168, 280))]),
             ("count the circles", [(6, (112, 112))])]
    if dev.type != "cuda":
        cases = cases[:2]
    has_triton = importlib.util.find_spec("triton") is not None
    pair = tiny_pair(family)
    ref = SGLReference(*pair)
    expected, requests = _family_requests(ref, cases)
    rel = FAMILY_REL_TOL.get(family, 1e-4)
    graph_modes = (True, False) if dev.type == "cuda" else (False,)
    backends = ["torch"] + (["triton"] if has_triton and (dev.type == "cuda" or family == "qwen2_5_vl") else [])
    for graphs in graph_modes:
        for backend in backends:
            guide = Guide.load(pair[0], dev, torch.float32, MAX_TOKENS, importance_backend=backend, max_batch=8,
                               cuda_graphs=graphs)
            results = guide.run([GuideRequest(**{**r.__dict__, "pixel_values": r.pixel_values.to(dev)})
                                 for r in requests])
            bad, worst = [], 0.0
            for res, (answer, importance), req in zip(results, expected, requests):
                if res.answer_ids != answer:
                    bad.append(f"request {req.request_id}: answer differs")
                for got, want in zip(res.importance, importance):  # rel, with 1e-6 absolute
                    worst = max(worst, ((got - want).abs() / (want.abs() + 1e-6 / rel)).max().item())
                for keep, want in zip(res.keep_indices, importance):
                    if not torch.equal(keep, keep_set(want, 0.25)):
                        bad.append(f"request {req.request_id}: keep set differs from the reference's")
            if worst > rel:
                bad.append(f"importance rel err {worst:.1e} > {rel:g}")
            captured = bool(guide.steps._graphs)
            name = f"guide {family} graphs {'on' if graphs else 'off'} {backend}"
            report.line("FAIL" if bad else "PASS", name,
                        f"{len(requests)} requests vs reference: answers and keep sets "
                        f"{'equal' if not bad else '; '.join(sorted(set(bad)))}, importance max rel err "
                        f"{worst:.1e} (tol {rel:g}); graphs captured: {captured}", max_rel_err=worst)


def check_memory_and_steps(report: Report, dev: torch.device, dtype: torch.dtype) -> None:
    """A full guide_max_batch call's peak memory against the warm-up's (what load_model and
    vLLM's profile_run see), at qwen2.5-vl-3b shapes on CUDA; ms per captured decode step."""
    import bench_guide as B

    if dev.type == "cuda":
        batch, visual, prompt = 32, 1024, 1100
        p = B.PRESETS["qwen2.5-vl-3b"]
        model, config = B.build_model(p["family"], p["lm"], p["vision"], dev, dtype)
        guide = Guide(model, config, dev, dtype, 32, max_batch=batch, kv_tokens=batch * prompt, stop_at_eos=False)
    else:
        batch, visual, prompt = 4, 64, 120
        guide = Guide.load(tiny_pair("qwen2_5_vl")[0], dev, dtype, 4, importance_backend="torch", max_batch=batch,
                           kv_tokens=batch * prompt, stop_at_eos=False)
    info = guide.warm_up()
    report.line("INFO", "warm-up", f"{info['seconds']:.1f} s: {info['graphs']} decode graphs captured, largest call "
                f"peak {info['peak_bytes'] / 2**20:.0f} MiB, workspace {info['workspace_bytes'] / 2**20:.0f} MiB",
                **info)
    reqs, _ = B.make_requests(guide, batch, visual, prompt, 0.1, seed=1)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    guide.run(reqs)
    lazy = guide.steps.lazy_captures
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        limit = 1.1 * info["peak_bytes"] + 64 * 2**20
        report.line("PASS" if peak <= limit else "FAIL", "memory",
                    f"a full call of {batch} requests x {prompt} tokens peaked {peak / 2**20:.0f} MiB above the "
                    f"workspace; the warm-up's largest call {info['peak_bytes'] / 2**20:.0f} MiB (limit "
                    f"{limit / 2**20:.0f})", peak_bytes=peak, warm_peak_bytes=info["peak_bytes"])
    else:
        report.line("INFO", "memory", "no CUDA: peak memory not measured (the call ran)")
    report.line("PASS" if not lazy else "FAIL", "no lazy captures", f"{lazy} decode graphs captured after warm-up")
    for b in ((1, 8, 32) if dev.type == "cuda" else (1, 4)):
        st = guide._state(b, 1536 if dev.type == "cuda" else 128)  # within the workspace: no lazy capture
        st.done.fill_(False)
        st.lens.fill_(min(prompt, st.cap - 16))  # 11 steps below stay inside the capacity
        st.step.zero_()
        guide.steps(st)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(10):
            st.step.zero_()
            guide.steps(st)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        ms = (time.perf_counter() - t0) / 10 * 1e3
        report.line("INFO", f"decode step batch {b}", f"{ms:.2f} ms per step "
                    f"({'graph replay' if guide._graphs else 'eager'}, capacity {st.cap})", ms=ms, batch=b)


def check_bench(report: Report, dev: torch.device, out: Path) -> None:
    import gc

    import bench_guide as B

    gc.collect()  # the memory check's guide and its graphs
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    if dev.type == "cuda":
        argv = ["--preset", "qwen2.5-vl-3b", "--batches", "1,8,32", "--iters", "3"]
    else:
        argv = ["--device", "cpu", "--tiny", "--batches", "1", "--iters", "1", "--target-layers", "1",
                "--visual-tokens", "64", "--prompt-tokens", "100", "--answer-tokens", "2"]
    recs = []  # bench_guide.main's records, kept by wrapping its run()
    orig_run = B.run

    def capture(args):
        recs.extend(orig_run(args))
        return recs

    B.run = capture
    try:
        B.main(argv + ["--csv", str(out / "gpu_check_bench.csv"), "--no-plot"])
    finally:
        B.run = orig_run
    for rec in recs:
        b = rec["batch"]
        report.line("INFO", f"bench batch {b}", " ".join(f"{k} {rec[k + '_ms']:.2f}" for k in
                    ("vision", "prefill", "decode", "importance", "total")) + " ms/request", **rec)
        if dev.type == "cuda" and b in GOALS:
            missed = {k: round(rec[f"{k}_ms"], 2) for k, v in GOALS[b].items() if rec[f"{k}_ms"] > v}
            report.line("GOAL", f"issue 11 batch {b}", f"{'met' if not missed else 'missed: ' + str(missed)} "
                        f"(goals {GOALS[b]} ms/request)", missed=missed, goals=GOALS[b])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--json", type=Path, default=REPO / "out" / "gpu_check.json")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--families", type=lambda v: v.split(","), default=FAMILIES,
                    help=f"tiny families to check against the reference (default: all: {','.join(FAMILIES)})")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("FAIL environment: no CUDA device (use --device cpu for the CPU paths)", flush=True)
        return 2
    if dev.type == "cpu":
        torch.set_num_threads(1)  # a shared 2-core machine: spinning OpenMP threads make tiny ops 10-50x slower
    else:
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 checks compare with the fp32 reference
        torch.backends.cudnn.allow_tf32 = False
    low = torch.bfloat16 if dev.type == "cuda" else torch.float32
    report = Report()
    t0 = time.perf_counter()
    run_check(report, "environment", check_environment, dev)
    run_check(report, "varlen attention", check_varlen, dev, low)
    run_check(report, "decode", check_decode, dev, low)
    run_check(report, "decode attention", check_decode_attention, dev, low)
    run_check(report, "importance", check_importance, dev, low)
    run_check(report, "keep rule cost", check_keep_rules, dev)
    for family in args.families:
        run_check(report, f"family {family}", check_family, dev, family)
    run_check(report, "memory", check_memory_and_steps, dev, low)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_bench:
        run_check(report, "bench", check_bench, dev, args.json.parent)
    failed = report.failed
    summary = dict(device=str(dev), seconds=round(time.perf_counter() - t0, 1), failed=failed,
                   ok=not failed, records=report.records)
    args.json.write_text(json.dumps(summary, indent=1, default=str))
    print(f"{'OK' if not failed else 'FAILED: ' + ', '.join(failed)} in {summary['seconds']} s; wrote {args.json}",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
