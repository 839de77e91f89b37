"""The call contracts of the guide's CUDA-only branches, checked on the CPU (no GPU in CI): each
branch runs here against a stand-in with the exact signature of the torch release it serves,
computing with SDPA, so none of them is an untested line. benchmarks/gpu_check.py runs the real
kernels on a GPU.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from vllm_sgl.guide.attention import FlashPlan, Segments, flash_plan, sdpa_varlen

# -- varlen_attn stand-ins: the signatures of torch 2.10, 2.11 and 2.12+ -------------------------


def _compute(q, k, v, cu, causal, scale, grouped_ok=True, wrong_heads=False):
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv and not grouped_ok:
        raise RuntimeError(f"number of heads in key/value must equal query: {hkv} vs {hq}")
    if wrong_heads and hq != hkv:  # head h reads KV head h % Hkv: silently wrong
        k, v = k.repeat(1, hq // hkv, 1), v.repeat(1, hq // hkv, 1)
    seg = Segments.build(torch.diff(cu).tolist(), "cpu")
    return sdpa_varlen(q, k, v, seg, causal, q.shape[-1] ** -0.5 if scale is None else scale)


def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None):
    return _compute(query, key, value, cu_seq_q, is_causal, None)


def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)):
    """torch 2.11: scale and window_size, no enable_gqa; grouped K/V go to aten's flash forward."""
    return _compute(query, key, value, cu_seq_q, tuple(window_size) == (-1, 0), scale)


def varlen_2_11_no_groups(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                          window_size=(-1, -1)):
    return _compute(query, key, value, cu_seq_q, tuple(window_size) == (-1, 0), scale, grouped_ok=False)


def varlen_2_11_wrong_groups(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                             window_size=(-1, -1)):
    return _compute(query, key, value, cu_seq_q, tuple(window_size) == (-1, 0), scale, wrong_heads=True)


def varlen_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch 2.12+ (as 2.14's source): enable_gqa, and a ValueError without it for grouped heads."""
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise ValueError("Expect query and key/value to have the same number of heads; try enable_gqa=True")
    return _compute(query, key, value, cu_seq_q, tuple(window_size) == (-1, 0), scale)


def varlen_views_refused(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                         window_size=(-1, -1), enable_gqa=False):
    if not all(x.is_contiguous() for x in (query, key, value)):
        raise RuntimeError("query must be contiguous")
    return _compute(query, key, value, cu_seq_q, tuple(window_size) == (-1, 0), scale)


def varlen_broken(*args, **kwargs):
    raise RuntimeError("no kernel image is available")


@pytest.mark.parametrize("fn,want", [
    (varlen_2_10, dict(causal="is_causal", scale=False, gqa="native", contiguous=False, usable=True)),
    (varlen_2_11, dict(causal="window_size", scale=True, gqa="native", contiguous=False, usable=True)),
    (varlen_2_11_no_groups, dict(causal="window_size", scale=True, gqa="repeat", contiguous=False, usable=True)),
    (varlen_2_11_wrong_groups, dict(causal="window_size", scale=True, gqa="repeat", contiguous=False, usable=True)),
    (varlen_2_12, dict(causal="window_size", scale=True, gqa="flag", contiguous=False, usable=True)),
    (varlen_views_refused, dict(causal="window_size", scale=True, gqa="flag", contiguous=True, usable=True)),
    (varlen_broken, dict(causal="is_causal", scale=False, gqa="repeat", contiguous=True, usable=False)),
])
def test_flash_plan_per_torch_signature(fn, want):
    """Each keyword is read from the signature on its own; grouped K/V and strided views are passed
    only where the probe shows the kernel computes them right; the plan then equals SDPA."""
    plan = flash_plan("cpu", torch.float32, fn=fn)
    assert plan.describe() == want
    if not plan.usable:
        return
    g = torch.Generator().manual_seed(1)
    lengths = [7, 1, 12, 5]
    seg = Segments.build(lengths, "cpu")
    for d in (64, 80, 128):
        for hq, hkv in ((4, 4), (4, 1), (6, 2)):
            qkv = torch.randn(sum(lengths), hq + 2 * hkv, d, generator=g)  # split views, as the guide passes
            q, k, v = qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]
            for causal in (True, False):
                scale = 0.7 / math.sqrt(d)
                torch.testing.assert_close(plan(q, k, v, seg, causal, scale), sdpa_varlen(q, k, v, seg, causal, scale),
                                           rtol=1e-5, atol=1e-5)


def test_installed_torch_signature_is_known():
    """The installed torch's varlen_attn has a signature one of the plans covers (2.14 here: the flag)."""
    from torch.nn.attention.varlen import varlen_attn

    params = set(inspect.signature(varlen_attn).parameters)
    assert {"query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k"} <= params
    plan = FlashPlan.of(varlen_attn)
    assert plan.causal_kw in params and (not plan.scale_kw or "scale" in params)
    assert plan.gqa == ("flag" if "enable_gqa" in params else "native")


# -- the Triton kernels: a KV capacity is a runtime value -----------------------------------------


def test_importance_kernels_take_block_size_at_run_time():
    """The paged kernels' block size (the guide's KV capacity) is a runtime argument Triton does not
    specialise on, so a new capacity reuses the compiled kernel (read from the source: importing
    triton here would change what the engine tests' vLLM sees)."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parent.parent / "kernels" / "importance_triton.py"
    kernels = {n.name: n for n in ast.parse(src.read_text()).body if isinstance(n, ast.FunctionDef)}
    for name in ("_lse_kernel", "_importance_kernel"):
        fn = kernels[name]
        constexprs = {a.arg for a in fn.args.args if a.annotation is not None and "constexpr" in ast.unparse(a.annotation)}
        assert "page" in {a.arg for a in fn.args.args} and "page" not in constexprs and "PAGE" not in constexprs
        (deco,) = fn.decorator_list
        assert "do_not_specialize" in ast.unparse(deco) and "'page'" in ast.unparse(deco)


# -- decode buckets and the warm-up at load ----------------------------------------------------------


def test_decode_buckets_cover_every_call_that_fits():
    from vllm_sgl.guide.runtime import _batch_bucket, _bucket, decode_buckets

    for max_batch, slots in ((32, 18432), (8, 4096), (5, 1000)):
        buckets = set(decode_buckets(max_batch, slots))
        for n in range(1, max_batch + 1):
            for need in range(1, slots + 1, 7):
                shape = (_batch_bucket(n), _bucket(need, 256))
                if shape[0] * shape[1] <= slots:
                    assert shape in buckets, (max_batch, slots, n, need)


@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "internvl"])
def test_warm_up_runs_a_largest_call(family_pairs, family_name):
    """Guide.warm_up (what load_model runs on CUDA) on the CPU: the synthetic largest call is valid
    for the family (grids or tiles), nothing is captured off CUDA, later captures count as lazy."""
    from vllm_sgl.guide import Guide

    guide = Guide.load(family_pairs(family_name)[0], "cpu", torch.float32, 4, importance_backend="torch",
                       max_batch=3, kv_tokens=3 * 300)
    info = guide.warm_up()
    assert info["graphs"] == 0 and info["peak_bytes"] == 0 and guide.steps.warmed
    reqs = guide.synthetic_requests(3, 300)
    assert len(reqs) == 3 and all(sum(r.keep_counts) >= 1 for r in reqs)
    assert all(len(r.prompt_ids) <= 300 for r in reqs)


# -- the proof command itself ---------------------------------------------------------------------


@pytest.mark.parametrize("transformers_overlay", [None, "transformers-5.17"])
def test_gpu_check_runs_on_cpu(tmp_path, transformers_overlay):
    """benchmarks/gpu_check.py --device cpu: every check with a CPU meaning passes, and its JSON
    holds them, so the GPU command cannot rot. Run from a copy of the tree without the
    vllm_sgl/kernels link, as a GPU machine may receive it; with the installed transformers and
    with the GPU machine's 5.17 (an overlay scripts/setup.sh builds), whose Qwen3-VL deepstack
    features come unsplit (the family check failed there before)."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import transformers

    repo = Path(__file__).resolve().parent.parent
    tree = tmp_path / "tree"
    for part in ("vllm_sgl", "kernels", "benchmarks"):
        shutil.copytree(repo / part, tree / part, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "out"))
    (tree / "vllm_sgl" / "kernels").unlink()  # the link did not travel
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env.setdefault("VLLM_SGL_CACHE", str(repo / ".cache"))  # the tiny pairs the other tests built
    extra = []
    if transformers_overlay:
        overlay = Path(sys.prefix) / "overlays" / transformers_overlay
        assert overlay.is_dir(), f"{overlay} missing: scripts/setup.sh builds it"
        env["PYTHONPATH"] = str(overlay)
        extra = ["--skip-bench"]  # the bench's code is the same; the families are what differ
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(tree / "benchmarks" / "gpu_check.py"), "--device=cpu",
                           "--json", str(out), *extra], cwd=str(tree), env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and not report["failed"]
    checks = {r["check"] for r in report["records"]}
    names = ["environment", "varlen attention", "decode graph replay", "decode SDPA backend", "decode attention vs math",
             "importance triton vs torch", "keep rules triton vs torch", "guide qwen2_5_vl graphs off torch", "guide qwen2_5_vl graphs off triton",
             "warm-up"] + [f"guide {f} graphs off torch" for f in ("qwen2_vl", "qwen3_vl", "qwen3_vl_moe_guide", "internvl")]
    for name in names + ([] if transformers_overlay else ["bench batch 1"]):
        assert name in checks, name
    env_rec = next(r for r in report["records"] if r["check"] == "environment")
    assert env_rec["kernels_from"] == "registered ./kernels"
    assert env_rec["versions"]["transformers"] == ("5.17.0" if transformers_overlay else transformers.__version__)
    assert env_rec["versions"]["torchvision"] and env_rec["versions"]["Pillow"]
    assert "no vllm" not in checks  # gpu_check reports a vllm import as a failure


def test_profile_run_hook_runs_the_guide_after_the_target():
    """vLLM's profile_run, hooked: the target's dummy forward, then the guide's largest call
    (GuideRunner.profile_run, CUDA only), so the profiled peak includes the guide's."""
    from vllm_sgl.engine.runners import GUIDE_RUNNER_ATTR, v1

    calls = []

    class Guide:
        def profile_run(self):
            calls.append("guide")

    runner = type("Runner", (), {GUIDE_RUNNER_ATTR: Guide()})()
    v1._profile_run(lambda self, *a, **k: calls.append("target"))(runner)
    assert calls == ["target", "guide"]
