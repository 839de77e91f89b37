#!/usr/bin/env python
"""Benchmark: fused Triton SGL importance vs the unfused PyTorch way, at guide model sizes.

    python benchmarks/bench_importance.py                      # GPU, Qwen2.5-VL-3B guide sizes
    python benchmarks/bench_importance.py --n 4096 --rows 64 --batch 8
    python benchmarks/bench_importance.py --device cpu --tiny  # exercises the script on CPU
    python benchmarks/bench_importance.py --keep-only          # the keep rules alone, N x batch x keep ratio

Fused   = vllm_sgl.kernels visual_importance_triton (two Triton launches, no rows x keys matrix).
Unfused = per layer and request: logits = Q K^T in the input dtype, softmax in fp32 over the whole
          (heads, rows, keys) matrix, sum of the visual columns (what an eager attention with
          output_attentions would give you).
Both are checked against the fp32 PyTorch definition (max abs error columns).

Roofline: the necessary work is one Q K^T over every attended key, 2 * L * Hq * D * sum(pos+1)
flops, and reading Q and K once. roofline_s = max(bytes / bandwidth, flops / matmul_peak) with the
bandwidth (a large device copy) and matmul peak (a large matmul in the benchmark dtype) measured by
this script; *_roofline_frac = roofline_s / measured time. The fused kernel computes the visual
logits twice (once for the log-sum-exp, once for the probabilities), so when compute-bound its
fraction can reach at most about 1 / (1 + N / T).

With --device cpu (or no CUDA) the Triton kernel cannot run (unless TRITON_INTERPRET=1 is set, then
the interpreter runs it); the PyTorch definition stands in for the fused path so every code path of
the script (timing, memory, roofline, CSV, plot) still runs. CPU numbers say nothing about the kernel.

Keep rules: for every batch x N (a square grid of N tokens per image) x --keep-ratios, the keep-set
time with "sgl" (top-k) and "sgl-sdpp" (the windowed spatial DPP) side by side, their ratio, and
the sgl-sdpp scratch bytes (sdpp_scratch_elems). Importance: the fused path's output, or with
--keep-only uniform random values (no importance pass: the CPU can then run N = 16384 x batch 32).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import measure_peaks, peak_extra_mib, time_fn  # noqa: E402
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FIELDS = ["batch", "n_visual", "rows", "layers", "q_heads", "kv_heads", "head_dim", "dtype", "device",
          "fused_impl", "fused_ms", "keep_ms", "sdpp_keep_ms", "sdpp_overhead", "unfused_ms", "speedup", "fused_peak_mib", "unfused_peak_mib",
          "roofline_ms", "fused_roofline_frac", "unfused_roofline_frac", "max_abs_err", "unfused_max_abs_err",
          "max_importance"]
KEEP_FIELDS = ["batch", "n_visual", "keep_ratio", "device", "keep_impl", "sgl_ms", "sdpp_ms", "sdpp_over_sgl",
               "sdpp_scratch_bytes", "sdpp_max_steps"]


def _kernels():
    sys.path.insert(0, str(REPO))  # this checkout's vllm_sgl, installed or not (a bare GPU machine)
    import vllm_sgl.kernels as k

    return k


def make_inputs(batch, n_visual, rows, layers, q_heads, kv_heads, head_dim, dtype, device, prefix=16, seed=0):
    """batch identical-shape requests: prefix text, one image of n_visual tokens, then `rows` Q rows
    (text after the image + decode rows), each row at the tail of its request."""
    # Generated on the device in the benchmark dtype: the largest keys are ~10 GB.
    g = torch.Generator(device=device).manual_seed(seed)
    T_b = prefix + n_visual + rows
    q = torch.randn(layers, batch * rows, q_heads, head_dim, generator=g, device=device, dtype=dtype) * 2
    k = torch.randn(layers, batch * T_b, kv_heads, head_dim, generator=g, device=device, dtype=dtype)
    cu_rows = torch.arange(batch + 1) * rows
    cu_keys = torch.arange(batch + 1) * T_b
    row_pos = torch.arange(T_b - rows, T_b).repeat(batch)
    image_req = torch.arange(batch)
    image_start = torch.full((batch,), prefix)
    image_len = torch.full((batch,), n_visual)
    return q, k, cu_rows, row_pos, cu_keys, image_req, image_start, image_len


def unfused_importance(queries, keys, cu_rows, row_pos, cu_keys, image_req, image_start, image_len, sm_scale=None):
    """The unfused way: materialise softmax(Q K^T) per layer and request, then sum visual columns."""
    L, R, Hq, D = queries.shape
    G = Hq // keys.shape[2]
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    cu_rows, cu_keys, row_pos = cu_rows.tolist(), cu_keys.tolist(), row_pos.to(queries.device)
    out = []
    for b, start, n in zip(image_req.tolist(), image_start.tolist(), image_len.tolist()):
        r0, r1, k0, k1 = cu_rows[b], cu_rows[b + 1], cu_keys[b], cu_keys[b + 1]
        pos = row_pos[r0:r1]
        keep_rows = pos > start + n - 1
        mask = torch.arange(k1 - k0, device=queries.device)[None, :] > pos[:, None]
        acc = torch.zeros(n, dtype=torch.float32, device=queries.device)
        for layer in range(L):
            q = queries[layer, r0:r1].transpose(0, 1)  # (Hq, rows, D)
            k = keys[layer, k0:k1].repeat_interleave(G, dim=1).permute(1, 2, 0)  # (Hq, D, keys)
            logits = torch.matmul(q, k).float() * scale
            probs = torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1)
            acc += probs[:, keep_rows, start:start + n].sum(dim=(0, 1))
        out.append(acc)
    return torch.cat(out)


def smoke_check(K) -> None:
    """Tiny CPU check: the definition vs the unfused path (and the interpreter when enabled)."""
    args = make_inputs(2, 40, 5, 2, 4, 2, 64, torch.float32, torch.device("cpu"))
    ref = K.visual_importance_ref(*args)
    err = (unfused_importance(*args) - ref).abs().max().item()
    print(f"  definition vs unfused: max abs err {err:.2e}")
    assert err < 1e-4, err
    if os.environ.get("TRITON_INTERPRET") == "1":
        err = (K.visual_importance_triton(*args) - ref).abs().max().item()
        print(f"  definition vs Triton interpreter: max abs err {err:.2e}")
        assert err < 1e-4, err
    print("smoke check passed")


def fmt(x, spec):
    return "" if x is None else format(x, spec)


def run(args) -> list[dict]:
    K = _kernels()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":
        fused, fused_impl = K.visual_importance_triton, "triton"
        keep = K.keep_set_triton
    elif os.environ.get("TRITON_INTERPRET") == "1":
        fused, fused_impl, keep = K.visual_importance_triton, "triton-interpreter", K.keep_set_triton
    else:
        fused, fused_impl, keep = K.visual_importance_ref, "torch-definition", K.keep_set_ref
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"fused path: {fused_impl}, dtype {args.dtype}")
    bw, peak = measure_peaks(device, dtype, args.tiny)
    print(f"measured: copy bandwidth {bw / 1e9:.1f} GB/s, {args.dtype} matmul peak {peak / 1e12:.2f} TFLOP/s")

    rows_out, importance = [], {}
    configs = [(b, n, r) for b in args.batch for n in args.n for r in args.rows]
    for ci, (batch, n_vis, rows) in enumerate(configs, 1):
        tag = f"[{ci}/{len(configs)}] batch {batch} N {n_vis} rows {rows}"
        try:
            inp = make_inputs(batch, n_vis, rows, args.layers, args.q_heads, args.kv_heads, args.head_dim,
                              dtype, device, prefix=args.prefix)
        except torch.OutOfMemoryError:
            print(f"{tag}: inputs do not fit, skipped", flush=True)
            continue
        q, k = inp[0], inp[1]
        cu_image = torch.arange(batch + 1) * n_vis
        rec = dict(batch=batch, n_visual=n_vis, rows=rows, layers=args.layers, q_heads=args.q_heads,
                   kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype, device=device.type,
                   fused_impl=fused_impl)
        T_b = args.prefix + n_vis + rows
        attended = batch * sum(range(T_b - rows + 1, T_b + 1))  # sum over rows of (pos + 1)
        flops = 2 * args.layers * args.q_heads * args.head_dim * attended
        nbytes = (q.numel() + k.numel()) * q.element_size() + 4 * batch * n_vis
        roof = max(nbytes / bw, flops / peak)
        rec["roofline_ms"] = roof * 1e3

        ref = None
        if args.check:
            ref = K.visual_importance_ref(*inp)  # upcasts one layer and request at a time
            rec["max_importance"] = ref.max().item()
        imp = fused(*inp)
        rec["fused_ms"] = time_fn(lambda: fused(*inp), device, args.warmup, args.iters) * 1e3
        rec["fused_peak_mib"] = peak_extra_mib(lambda: fused(*inp), device)
        rec["keep_ms"] = time_fn(lambda: keep(imp, cu_image, args.keep_ratio), device, args.warmup,
                                 args.iters) * 1e3
        importance.setdefault((batch, n_vis), imp)
        # the spatial keep rule (importance "sgl-sdpp") on a square grid of N tokens
        side = math.isqrt(n_vis)
        if args.sdpp and side * side == n_vis:
            rules, lay = ["sgl-sdpp"] * batch, [(side, n_vis)] * batch
            rec["sdpp_keep_ms"] = time_fn(lambda: keep(imp, cu_image, args.keep_ratio, rules=rules, layouts=lay),
                                          device, min(args.warmup, 1), max(1, min(args.iters, 2))) * 1e3
            rec["sdpp_overhead"] = (rec["sdpp_keep_ms"] - rec["keep_ms"]) / (rec["fused_ms"] + rec["keep_ms"])
        if ref is not None:
            rec["max_abs_err"] = (imp - ref).abs().max().item()
        print(f"{tag}: fused {rec['fused_ms']:.3f} ms (keep set {rec['keep_ms']:.3f} ms"
              + (f", sgl-sdpp keep set {rec['sdpp_keep_ms']:.3f} ms" if "sdpp_keep_ms" in rec else "") + ")",
              end="", flush=True)
        if args.unfused:
            try:
                u = unfused_importance(*inp)
                rec["unfused_ms"] = time_fn(lambda: unfused_importance(*inp), device, args.warmup,
                                            args.iters) * 1e3
                rec["unfused_peak_mib"] = peak_extra_mib(lambda: unfused_importance(*inp), device)
                rec["speedup"] = rec["unfused_ms"] / rec["fused_ms"]
                rec["unfused_roofline_frac"] = rec["roofline_ms"] / rec["unfused_ms"]
                if ref is not None:
                    rec["unfused_max_abs_err"] = (u - ref).abs().max().item()
                del u
                print(f", unfused {rec['unfused_ms']:.3f} ms, speed-up {rec['speedup']:.2f}x", flush=True)
            except torch.OutOfMemoryError:
                print(", unfused: out of memory", flush=True)
                rec["unfused_ms"] = "OOM"
        else:
            print(flush=True)
        rec["fused_roofline_frac"] = rec["roofline_ms"] / rec["fused_ms"]
        rows_out.append(rec)
        del inp, q, k, imp, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows_out, importance


def run_keep_rules(args, importance=None) -> list[dict]:
    """Keep-set time of "sgl" and "sgl-sdpp" for every batch x N x keep ratio. importance: {(batch,
    N): fp32 importance} from the fused pass; missing ones are uniform random."""
    K = _kernels()
    from vllm_sgl.kernels._args import sdpp_scratch_elems
    from vllm_sgl.kernels.importance_ref import sdpp_windows

    device = torch.device(args.device)
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        keep, impl = K.keep_set_triton, "triton" if device.type == "cuda" else "triton-interpreter"
    else:
        keep, impl = K.keep_set_ref, "torch-definition"
    recs = []
    for batch in args.batch:
        for n_vis in args.n:
            side = math.isqrt(n_vis)
            if side * side != n_vis:
                print(f"keep rules: N {n_vis} is not a square grid, skipped")
                continue
            g = torch.Generator(device=device).manual_seed(n_vis + batch)
            imp = (importance or {}).get((batch, n_vis))
            if imp is None:
                imp = torch.rand(batch * n_vis, generator=g, device=device)
            cu_image = torch.arange(batch + 1) * n_vis
            rules, lay = ["sgl-sdpp"] * batch, [(side, n_vis)] * batch
            for ratio in args.keep_ratios:
                k = K.keep_count(n_vis, ratio)
                rec = dict(batch=batch, n_visual=n_vis, keep_ratio=ratio, device=device.type, keep_impl=impl,
                           sdpp_scratch_bytes=4 * sdpp_scratch_elems([n_vis] * batch, [k] * batch))
                rec["sgl_ms"] = time_fn(lambda: keep(imp, cu_image, ratio), device, args.warmup, args.iters) * 1e3
                rec["sdpp_ms"] = time_fn(lambda: keep(imp, cu_image, ratio, rules=rules, layouts=lay), device,
                                         min(args.warmup, 1), max(1, min(args.iters, 3))) * 1e3
                rec["sdpp_over_sgl"] = rec["sdpp_ms"] / rec["sgl_ms"]
                wins, kw = sdpp_windows(imp[:n_vis], [0, n_vis], [k], [(side, n_vis)])
                size = torch.as_tensor(wins[:, 4] * wins[:, 5], device=kw.device)
                rec["sdpp_max_steps"] = int(torch.where(kw < size, kw, 0).max())  # the first image's
                print(f"keep rules: batch {batch} N {n_vis} keep {ratio}: sgl {rec['sgl_ms']:.3f} ms, sgl-sdpp "
                      f"{rec['sdpp_ms']:.3f} ms ({rec['sdpp_over_sgl']:.1f}x), scratch "
                      f"{rec['sdpp_scratch_bytes'] / 2**20:.2f} MiB", flush=True)
                recs.append(rec)
            del imp
    return recs


def print_keep_table(recs):
    cols = [("batch", "d"), ("n_visual", "d"), ("keep_ratio", "g"), ("sgl_ms", ".3f"), ("sdpp_ms", ".3f"),
            ("sdpp_over_sgl", ".1f"), ("sdpp_scratch_bytes", "d"), ("sdpp_max_steps", "d")]
    _print_cells(recs, cols)


def print_table(recs):
    cols = [("batch", "d"), ("n_visual", "d"), ("rows", "d"), ("fused_ms", ".3f"), ("keep_ms", ".3f"),
            ("sdpp_keep_ms", ".3f"), ("sdpp_overhead", ".2f"),
            ("unfused_ms", ".3f"), ("speedup", ".2f"), ("fused_peak_mib", ".1f"), ("unfused_peak_mib", ".1f"),
            ("fused_roofline_frac", ".2f"), ("unfused_roofline_frac", ".2f"), ("max_abs_err", ".1e")]
    _print_cells(recs, cols)


def _print_cells(recs, cols):
    cells = [[c for c, _ in cols]]
    for r in recs:
        cells.append([fmt(r.get(c), f) if not isinstance(r.get(c), str) else r[c] for c, f in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for j, row in enumerate(cells):
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def write_csv(recs, path, fields=FIELDS):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in recs:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    print(f"wrote {path}")


def plot(recs, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (batch, rows) in enumerate(sorted({(r["batch"], r["rows"]) for r in recs})):
        color = f"C{i % 10}"  # fused (solid) and unfused (dashed) of one shape share a colour
        sel = sorted((r for r in recs if r["batch"] == batch and r["rows"] == rows), key=lambda r: r["n_visual"])
        xs = [r["n_visual"] for r in sel]
        axes[0].plot(xs, [r["fused_ms"] for r in sel], marker="o", color=color, label=f"fused b{batch} r{rows}")
        un = [(r["n_visual"], r["unfused_ms"]) for r in sel if isinstance(r.get("unfused_ms"), float)]
        if un:
            axes[0].plot(*zip(*un), marker="x", linestyle="--", color=color, label=f"unfused b{batch} r{rows}")
        sp = [(r["n_visual"], r["speedup"]) for r in sel if r.get("speedup")]
        if sp:
            axes[1].plot(*zip(*sp), marker="o", color=color, label=f"b{batch} r{rows}")
    axes[0].set(xscale="log", yscale="log", xlabel="visual tokens N", ylabel="ms", title="time")
    axes[1].set(xscale="log", xlabel="visual tokens N", ylabel="unfused / fused", title="speed-up")
    for ax in axes:
        ax.legend(fontsize=6)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def ints(s):
    return [int(x) for x in s.split(",") if x]


def floats(s):
    return [float(x) for x in s.split(",") if x]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="small shapes (2 layers, 4/2 heads, d64) for a quick run")
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--q-heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--n", type=ints, default=[1024, 4096, 16384], help="visual tokens per image, comma list")
    p.add_argument("--rows", type=ints, default=[16, 64, 256], help="Q rows per request, comma list")
    p.add_argument("--batch", type=ints, default=[1, 8, 32], help="requests, comma list")
    p.add_argument("--prefix", type=int, default=16, help="text tokens before the image")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--keep-ratio", type=float, default=0.25)
    p.add_argument("--keep-ratios", type=floats, default=[0.1, 0.5, 0.99],
                   help="keep ratios of the keep-rule table (sgl vs sgl-sdpp), comma list")
    p.add_argument("--keep-only", action="store_true",
                   help="only the keep-rule table, on random importance (no importance pass)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--no-unfused", dest="unfused", action="store_false", help="skip the unfused PyTorch path")
    p.add_argument("--no-sdpp", dest="sdpp", action="store_false",
                   help="skip timing the spatial keep rule (sgl-sdpp) and the keep-rule table")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the comparison with the fp32 definition (saves time at large sizes)")
    p.add_argument("--csv", type=Path, default=REPO / "out" / "bench_importance.csv")
    p.add_argument("--plot", type=Path, default=REPO / "out" / "bench_importance.png")
    p.add_argument("--keep-csv", type=Path, default=REPO / "out" / "bench_keep_rules.csv")
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.q_heads, args.kv_heads, args.head_dim = 2, 4, 2, 64
        if args.n == p.get_default("n"):
            args.n = [64, 256]
        if args.rows == p.get_default("rows"):
            args.rows = [4, 16]
        if args.batch == p.get_default("batch"):
            args.batch = [1, 2]

    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: the fused Triton kernel needs a GPU, so no timings are taken.\n"
              "Running a tiny CPU correctness smoke check instead "
              "(use --device cpu --tiny to exercise the timing loop on CPU).")
        smoke_check(_kernels())
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    importance = None
    if not args.keep_only:
        recs, importance = run(args)
        print()
        print_table(recs)
        write_csv(recs, args.csv)
        if recs:
            plot(recs, args.plot)
    if args.sdpp or args.keep_only:
        keep_recs = run_keep_rules(args, importance)
        print()
        print_keep_table(keep_recs)
        write_csv(keep_recs, args.keep_csv, KEEP_FIELDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
