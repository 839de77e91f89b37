"""Benchmark: what the guide costs per request, phase by phase, next to what its pruning saves in
the target's prefill, and against an ideal. No vLLM import: it runs on a GPU machine with torch
and transformers only (the repo root goes on sys.path).

    python benchmarks/bench_guide.py                          # GPU: every preset (Qwen2.5-VL-3B, Qwen2-VL-2B, Qwen3-VL-4B/2B)
    python benchmarks/bench_guide.py --preset qwen2.5-vl-3b --batches 32
    python benchmarks/bench_guide.py --tiny --device cpu      # the tiny pair on the CPU (tests)

Per preset (random weights at the real shapes, vocabulary included) and batch size: requests with
one image of --visual-tokens tokens inside a prompt of about --prompt-tokens tokens, answers forced
to --answer-tokens tokens (end of sequence ignored). Printed per request, in ms:
- vision, prefill, decode, importance: each phase timed between device synchronisations (one run);
  importance again with the spatial keep rule ("sgl-sdpp", docs/importance.md) on the same requests,
  and what it adds as a share of the guide's total;
  total: a whole guide call without those synchronisations (median of --iters runs);
- saved 7B / 32B / 72B: the target prefill that keep --keep-ratio removes for the same prompts:
  full minus pruned prompt, measured on a --target-layers slice of the target's decoder with the
  same packed-prefill code and scaled to all its layers;
- guide / saved: the guide's total as a share of what it saves (below 100%: SGL pays);
- ideal: per phase max(bytes / bandwidth, FLOPs / matmul rate), with the device's measured
  bandwidth and matmul rate; % of ideal = ideal / total.
Also, counted with torch's profiler on one eager decode step: `ops per decode step: N` and
`host syncs per decode step: N` (on CUDA each step then replays as one CUDA graph).
Writes a CSV and a plot (out/bench_guide.csv, out/bench_guide.png).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # this checkout's vllm_sgl, installed or not (a bare GPU machine)
sys.path.insert(0, str(HERE))
from bare_tree import register_kernels  # noqa: E402
from timing import measure_peaks, sync, time_fn  # noqa: E402

register_kernels()  # vllm_sgl.kernels from ./kernels where the link did not travel

from vllm_sgl.guide import Guide, GuideRequest  # noqa: E402
from vllm_sgl.guide.attention import Segments, varlen_attention  # noqa: E402
from vllm_sgl.guide.profile import profile_decode_step  # noqa: E402
from vllm_sgl.guide.text import TextModel  # noqa: E402
from vllm_sgl.pruning import keep_count  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Token ids of the Qwen2-VL vocabulary (151936 entries) that the prompts use.
IMAGE, VSTART, VEND = 151655, 151652, 151653
VIDEO = 151656


@dataclass(frozen=True)
class LM:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 151936
    head_dim: int | None = None  # Qwen3: set explicitly (not hidden / heads)


# Guides at the real checkpoints' shapes (config.json of Qwen/Qwen2.5-VL-3B-Instruct, Qwen2-VL-2B).
PRESETS = {
    "qwen2.5-vl-3b": dict(family="qwen2_5_vl", lm=LM(2048, 36, 16, 2, 11008),
                          vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                      out_hidden_size=2048, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                                      hidden_act="silu", tokens_per_second=2)),
    "qwen2-vl-2b": dict(family="qwen2_vl", lm=LM(1536, 28, 12, 2, 8960),
                        vision=dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16,
                                    hidden_act="quick_gelu")),
    # Qwen3-VL-4B / 2B-Instruct: Qwen3-4B / 1.7B language models, a 24-block tower with deepstack
    # mergers after blocks 5, 11 and 17.
    "qwen3-vl-4b": dict(family="qwen3_vl", lm=LM(2560, 36, 32, 8, 9728, head_dim=128),
                        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                                    out_hidden_size=2560, num_position_embeddings=2304,
                                    deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh")),
    "qwen3-vl-2b": dict(family="qwen3_vl", lm=LM(2048, 28, 16, 8, 6144, head_dim=128),
                        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                                    out_hidden_size=2048, num_position_embeddings=2304,
                                    deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh")),
}
# Targets the guides serve (Qwen2.5-VL 7B / 32B / 72B language models).
TARGETS = {"7B": LM(3584, 28, 28, 4, 18944), "32B": LM(5120, 64, 40, 8, 27648), "72B": LM(8192, 80, 64, 8, 29568)}


def _text_config(lm: LM, interleaved: bool = False) -> dict:
    half = (lm.head_dim or lm.hidden // lm.heads) // 2
    if interleaved:  # Qwen3-VL: 24:20:20 of 64, interleaved
        rope = {"mrope_section": [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16], "mrope_interleaved": True}
    else:
        t = half // 4  # the real models' 16:24:24 split of head_dim / 2 = 64 rotary frequencies
        rope = {"mrope_section": [t, (half - t) // 2, half - t - (half - t) // 2]}
    extra = {"head_dim": lm.head_dim} if lm.head_dim else {}
    return dict(vocab_size=lm.vocab, hidden_size=lm.hidden, intermediate_size=lm.intermediate,
                num_hidden_layers=lm.layers, num_attention_heads=lm.heads, num_key_value_heads=lm.kv_heads,
                hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, **rope},
                bos_token_id=None, eos_token_id=151645 if lm.vocab > 151645 else None, pad_token_id=None, **extra)


def build_model(family_name: str, lm: LM, vision: dict, device, dtype):
    """A random-weight VLM of the family at these shapes (built on the device)."""
    from vllm_sgl.families import FAMILIES

    family = FAMILIES[family_name]
    vision = dict(vision, in_channels=3, patch_size=family.patch_size, spatial_merge_size=2, temporal_patch_size=2)
    config = family.hf_config_cls(text_config=_text_config(lm, family.interleaved_mrope), vision_config=vision, image_token_id=IMAGE,
                                  video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
                                  tie_word_embeddings=False)
    with torch.device(device):
        model = family.hf_model_cls._from_config(config, dtype=dtype)
    return model.eval(), config


def build_guide(args, preset: str, device, dtype) -> Guide:
    kw = dict(importance_backend="auto", max_batch=max(args.batches), kv_tokens=args.prompt_tokens * max(args.batches),
              stop_at_eos=False)
    if preset == "tiny":
        from vllm_sgl.tiny import TinyPairSpec, default_pair_dir, ensure_tiny_pair

        guide_dir, _ = ensure_tiny_pair(default_pair_dir("tiny-qwen2_5_vl"), TinyPairSpec())
        return Guide.load(guide_dir, device, dtype, args.answer_tokens, **kw)
    p = PRESETS[preset]
    model, config = build_model(p["family"], p["lm"], p["vision"], device, dtype)
    return Guide(model, config, device, dtype, args.answer_tokens, **kw)


def make_requests(guide: Guide, batch: int, visual_tokens: int, prompt_tokens: int, keep_ratio: float, seed: int):
    """batch requests: text, one square image of visual_tokens tokens, text; random ids and pixels.
    The pixels are made where the engine has them (the guide's device and dtype: GuideRunner
    normalises them there), so a timed call holds no host-to-device copy or cast the engine lacks."""
    merge = guide.merge
    side = int(round((visual_tokens * merge * merge) ** 0.5))
    side -= side % merge
    n = side * side // (merge * merge)
    cfg = guide.config  # text ids below every special token (image, video, vision start/end)
    vocab = min(cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    g = torch.Generator().manual_seed(seed)
    text = max(2, prompt_tokens - n - 2)
    before = text // 4
    patch_dim = guide.vision.patch_dim
    reqs = []
    for b in range(batch):
        ids = torch.randint(0, vocab, (text,), generator=g).tolist()
        prompt = ids[:before] + [guide.config.vision_start_token_id] + [guide.image_token_id] * n + \
            [guide.config.vision_end_token_id] + ids[before:]
        pixels = torch.randn(side * side, patch_dim, generator=g).to(guide.device, guide.dtype)
        reqs.append(GuideRequest(str(b), prompt, pixels, torch.tensor([[1, side, side]]), [keep_count(n, keep_ratio)]))
    return reqs, n


# -- the target prefill that pruning saves ------------------------------------------------------


def target_slice(lm: LM, layers: int, device, dtype) -> TextModel:
    model, config = build_model("qwen2_5_vl", LM(lm.hidden, layers, lm.heads, lm.kv_heads, lm.intermediate, 1024),
                                dict(depth=1, hidden_size=64, intermediate_size=64, num_heads=1,
                                     out_hidden_size=lm.hidden, window_size=112, fullatt_block_indexes=[0]),
                                device, dtype)
    text = TextModel(model, config.text_config)
    text.hf_model = model  # keep the weights alive
    return text


@torch.inference_mode()
def prefill_seconds(text: TextModel, lengths: list[int], device, dtype, warmup: int, iters: int) -> float:
    """One packed prefill of prompts of these lengths through the slice (median seconds)."""
    h0 = torch.randn(sum(lengths), text.embed.shape[1], device=device, dtype=dtype)
    pos = torch.cat([torch.arange(n) for n in lengths]).expand(3, -1).to(device)
    cos, sin = text.rope.mrope(pos, dtype)
    seg = Segments.build(lengths, device)

    def run():
        h = h0
        for w in text.layers:
            q, k, v = text.qkv(w, h, cos, sin)
            h = text.finish_layer(w, h, varlen_attention(q, k, v, seg, causal=True, scale=text.scale))
        return h

    return time_fn(run, device, warmup, iters)


# -- the ideal ----------------------------------------------------------------------------------


def ideal_seconds(guide: Guide, batch: int, prompt: int, n_visual: int, answer: int, bw: float, flops: float,
                  dtype_bytes: int) -> dict[str, float]:
    """Per call: max(bytes / bandwidth, FLOPs / matmul rate) of each phase."""
    t = guide.text
    lm_params = sum(x.numel() for w in t.layers for x in (w.qkv, w.o, w.gate_up, w.down) if x is not None)
    lm_params += sum(p.numel() for w in t.layers if w.moe is not None for p in w.moe.parameters())  # all experts
    head = t.lm_head.numel()
    vis = guide.vision.visual
    vis_params = sum(p.numel() for p in vis.parameters())
    patches = n_visual * guide.merge**2
    kv_token = 2 * t.num_layers * t.kv_heads * t.head_dim * dtype_bytes
    q_dim = t.heads * t.head_dim
    # vision: weights once, 2 FLOPs per parameter per patch, attention within each block's segments
    side = int(round(patches**0.5))
    seg_sq = sum(sum(n * n for n in guide.vision.segment_lengths((1, side, side), i)) for i in range(len(vis.blocks)))
    v_flops = batch * (2 * vis_params * patches + 4 * seg_sq * guide.vision.head_dim * guide.vision.heads)
    prefill_flops = batch * (2 * lm_params * prompt + 2 * t.num_layers * q_dim * prompt * prompt)  # causal QK + PV
    decode_bytes = answer * (lm_params + head) * dtype_bytes + answer * batch * (prompt + answer) * kv_token
    decode_flops = answer * batch * 2 * (lm_params + head)
    rows = batch * (prompt - n_visual + answer)
    imp_bytes = batch * n_visual * kv_token / 2 + rows * t.num_layers * q_dim * dtype_bytes
    imp_flops = 2 * rows * t.num_layers * q_dim * prompt * 2
    return {
        "vision": max(vis_params * dtype_bytes / bw, v_flops / flops),
        "prefill": max((lm_params + head) * dtype_bytes / bw, prefill_flops / flops),
        "decode": max(decode_bytes / bw, decode_flops / flops),
        "importance": max(imp_bytes / bw, imp_flops / flops),
    }


# -- the run ------------------------------------------------------------------------------------


def run(args) -> list[dict]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu (with --tiny for shapes a CPU can run)", file=sys.stderr)
        raise SystemExit(2)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    # on a CPU a 2048 x 2048 matmul: large enough to reach the cores' rate, small enough to be quick
    bw, peak = measure_peaks(device, dtype, tiny=device.type != "cuda", n=None if device.type == "cuda" else 2048)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{args.dtype}: bandwidth {bw / 1e9:.0f} GB/s, matmul {peak / 1e12:.1f} TFLOP/s (measured)")
    recs = []
    for preset in args.preset:
        guide = build_guide(args, preset, device, dtype)
        targets = {"tiny": LM(512, 4, 8, 2, 1024)} if preset == "tiny" else TARGETS
        slices = {name: target_slice(lm, min(args.target_layers, lm.layers), device, dtype)
                  for name, lm in targets.items()}
        prof = {b: profile_decode_step(guide, b) for b in args.batches}
        for batch in args.batches:
            reqs, n = make_requests(guide, batch, args.visual_tokens, args.prompt_tokens, args.keep_ratio, seed=batch)
            prompt = len(reqs[0].prompt_ids)
            kept = prompt - n + reqs[0].keep_counts[0]
            guide.run(reqs)  # warm-up: kernels, CUDA graphs of this bucket
            times = []
            for _ in range(args.iters):
                sync(device)
                t0 = time.perf_counter()
                results = guide.run(reqs)
                times.append(time.perf_counter() - t0)
            assert all(len(r.answer_ids) == args.answer_tokens for r in results)
            total = statistics.median(times)
            guide.run(reqs, timed=True)
            phases = dict(guide.timings)
            # the same call with the spatial keep rule (docs/importance.md): only its importance phase differs
            sdpp = [dataclasses.replace(r, importance="sgl-sdpp") for r in reqs]
            guide.run(sdpp)  # warm-up (the keep rule's kernel)
            guide.run(sdpp, timed=True)
            sdpp_importance = guide.timings["importance"]
            ideal = ideal_seconds(guide, batch, prompt, n, args.answer_tokens, bw, peak, torch.finfo(dtype).bits // 8)
            rec = dict(preset=preset, device=str(device), dtype=args.dtype, batch=batch, prompt_tokens=prompt,
                       visual_tokens=n, answer_tokens=args.answer_tokens,
                       **{f"{k}_ms": 1e3 * v / batch for k, v in phases.items()}, total_ms=1e3 * total / batch,
                       ideal_ms=1e3 * sum(ideal.values()) / batch,
                       **{f"ideal_{k}_ms": 1e3 * v / batch for k, v in ideal.items()},
                       ops_per_decode_step=prof[batch].ops, host_syncs_per_decode_step=prof[batch].syncs,
                       importance_sdpp_ms=1e3 * sdpp_importance / batch)
            rec["sdpp_pct_of_total"] = 100 * (rec["importance_sdpp_ms"] - rec["importance_ms"]) / rec["total_ms"]
            rec["pct_of_ideal"] = 100 * rec["ideal_ms"] / rec["total_ms"]
            for name, text in slices.items():
                lm = targets[name]
                scale = lm.layers / len(text.layers)
                full = prefill_seconds(text, [prompt] * batch, device, dtype, 1, args.iters) * scale
                pruned = prefill_seconds(text, [kept] * batch, device, dtype, 1, args.iters) * scale
                rec[f"saved_{name}_ms"] = 1e3 * (full - pruned) / batch
                saved = rec[f"saved_{name}_ms"]
                rec[f"guide_pct_of_saved_{name}"] = 100 * rec["total_ms"] / saved if saved > 0 else float("inf")
            recs.append(rec)
            print_row(rec, list(slices))
        print(f"{preset}: ops per decode step: {prof[args.batches[0]].ops}")
        print(f"{preset}: host syncs per decode step: {max(p.syncs for p in prof.values())}")
        print(f"{preset}: guide workspace {guide.workspace_bytes() / 2**20:.0f} MiB")
        del guide, slices
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return recs


def print_row(rec: dict, targets: list[str]) -> None:
    saved = "  ".join(f"saved {t} {rec[f'saved_{t}_ms']:.1f} ({rec[f'guide_pct_of_saved_{t}']:.0f}%)" for t in targets)
    print(f"{rec['preset']} batch {rec['batch']:>3}: vision {rec['vision_ms']:.2f}  prefill {rec['prefill_ms']:.2f}  "
          f"decode {rec['decode_ms']:.2f}  importance {rec['importance_ms']:.2f} (sgl-sdpp {rec['importance_sdpp_ms']:.2f}, "
          f"{rec['sdpp_pct_of_total']:+.1f}% of total)  total {rec['total_ms']:.2f} ms/req "
          f"(ideal {rec['ideal_ms']:.2f}, {rec['pct_of_ideal']:.0f}%)  {saved}", flush=True)


def write_csv(recs: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in recs for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(recs)
    print(f"wrote {path}")


def plot(recs: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    presets = list(dict.fromkeys(r["preset"] for r in recs))
    fig, axes = plt.subplots(1, len(presets), figsize=(6 * len(presets), 4.5), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        rs = [r for r in recs if r["preset"] == preset]
        x = range(len(rs))
        bottom = [0.0] * len(rs)
        for phase in ("vision", "prefill", "decode", "importance"):
            vals = [r[f"{phase}_ms"] for r in rs]
            ax.bar(x, vals, bottom=bottom, label=phase)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for key in [k for k in rs[0] if k.startswith("saved_")]:
            ax.plot(x, [r[key] for r in rs], "o--", label=key.replace("_", " ").replace(" ms", ""))
        ax.set_xticks(list(x), [f"batch {r['batch']}" for r in rs])
        ax.set_ylabel("ms per request")
        ax.set_yscale("log")
        ax.set_title(f"{preset}: guide cost by phase vs target prefill saved")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--preset", type=lambda s: s.split(","), default=None,
                   help=f"comma list of {', '.join(PRESETS)} (default: all)")
    p.add_argument("--tiny", action="store_true", help="the tiny pair's guide and target shapes, small prompts")
    p.add_argument("--batches", type=ints, default=None, help="default 1,8,32 (tiny: 1,8)")
    p.add_argument("--visual-tokens", type=int, default=None, help="per image (default 1024; tiny 256)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="about (default 1100; tiny 330)")
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--keep-ratio", type=float, default=0.1)
    p.add_argument("--target-layers", type=int, default=4, help="layers of each target slice that are timed")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--csv", type=Path, default=REPO / "out" / "bench_guide.csv")
    p.add_argument("--plot", type=Path, default=REPO / "out" / "bench_guide.png")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.tiny:
        args.preset = ["tiny"]
        args.batches = args.batches or [1, 8]
        args.visual_tokens = args.visual_tokens or 256
        args.prompt_tokens = args.prompt_tokens or 330
        args.answer_tokens = min(args.answer_tokens, 8)
    else:
        args.preset = args.preset or list(PRESETS)
        bad = [x for x in args.preset if x not in PRESETS]
        if bad:
            p.error(f"unknown preset(s) {', '.join(bad)}; accepted: {', '.join(PRESETS)}")
    args.batches = args.batches or [1, 8, 32]
    args.visual_tokens = args.visual_tokens or 1024
    args.prompt_tokens = args.prompt_tokens or 1100
    recs = run(args)
    write_csv(recs, args.csv)
    if not args.no_plot:
        plot(recs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
