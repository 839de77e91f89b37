#!/usr/bin/env python
"""The guide's work split across tensor-parallel ranks: vanilla and SGL at TP=1 and TP=2 (or any
--tensor-parallel list) on the same workload, in one run.

    python benchmarks/bench_parallel.py                    # bench tiny pair, keep 0.1, TP 1 and 2
    python benchmarks/bench_parallel.py --smoke            # test tiny pair, 4 requests

Each configuration is one offline engine (benchmarks/throughput.py's workload, engine settings and
timing: see its docstring). On the CPU every rank gets one core of its own
(VLLM_CPU_OMP_THREADS_BIND="0|1|..."), as every rank gets its own GPU: TP=1 runs on one core, TP=2
on two, so the ratios show what splitting the work across devices gives. A GPU user runs the same
command; the binding is then ignored.

Columns per configuration: requests/s, speed-up over vanilla at the same TP, and for SGL the
guide's steps (the engine steps that ran guide work), their total and mean wall time (from the
engine trace: each step's wall time on the rank whose output reaches the scheduler, the slowest
share plus the gather). Ratios TP=n / TP=1: guide time (lower is better) and requests/s.

Outputs: a table on stdout, OUT_DIR/parallel.csv and OUT_DIR/parallel.png.
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput as tp_bench  # noqa: E402

FIELDS = ["config", "tensor_parallel", "keep_ratio", "requests", "req_per_s", "req_per_s_all_runs", "speedup",
          "guide_steps", "guide_s", "guide_step_ms", "guide_s_vs_tp1", "req_per_s_vs_tp1"]


def parse(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    tps = "1,2"
    if "--tensor-parallel" in argv:
        i = argv.index("--tensor-parallel")
        tps = argv[i + 1]
        del argv[i : i + 2]
    if not any(a.startswith("--ratios") for a in argv):
        argv += ["--ratios", "0.1"]
    if not any(a.startswith("--out-dir") for a in argv):
        argv += ["--out-dir", str(tp_bench.REPO / "out" / "parallel")]
    args = tp_bench.parse_args(argv)
    try:
        args.tp_list = [int(t) for t in tps.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"--tensor-parallel must be comma-separated integers, got {tps!r}") from None
    if not args.tp_list or min(args.tp_list) < 1 or args.online or args.see_list or args.downscale:
        raise SystemExit("--tensor-parallel takes sizes >= 1; --online, --see-threshold and --downscale are "
                         "throughput.py's")
    args.one_core_per_rank = _on_cpu()
    return args


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def configurations(args) -> list[tp_bench.Config]:
    out = []
    for n in args.tp_list:
        out.append(tp_bench.Config(f"vanilla tp{n}", tensor_parallel=n))
        out += [tp_bench.Config(f"sgl@{r:g} tp{n}", ratio=r, tensor_parallel=n) for r in args.ratio_list]
    return out


def rows_for(configs, runs) -> list[dict]:
    rows = []
    for cfg, reps in zip(configs, runs):
        median = statistics.median_low([r.elapsed_s for r in reps])
        r = next(x for x in reps if x.elapsed_s == median)
        steps = r.guide_steps
        rows.append({
            "config": cfg.name, "tensor_parallel": cfg.tensor_parallel,
            "keep_ratio": cfg.ratio if cfg.ratio is not None else "", "requests": r.requests,
            "req_per_s": r.requests / r.elapsed_s,
            "req_per_s_all_runs": " ".join(f"{x.requests / x.elapsed_s:.4g}" for x in reps),
            "guide_steps": len(steps) if cfg.ratio is not None else "",
            "guide_s": sum(steps) if steps else "",
            "guide_step_ms": 1e3 * statistics.fmean(steps) if steps else "",
        })
    for row in rows:
        base = next(x for x in rows if x["tensor_parallel"] == row["tensor_parallel"] and x["keep_ratio"] == "")
        row["speedup"] = row["req_per_s"] / base["req_per_s"]
        one = next((x for x in rows if x["tensor_parallel"] == 1 and x["keep_ratio"] == row["keep_ratio"]), None)
        if one is not None:
            row["req_per_s_vs_tp1"] = row["req_per_s"] / one["req_per_s"]
            if row["guide_s"] != "" and one["guide_s"]:
                row["guide_s_vs_tp1"] = row["guide_s"] / one["guide_s"]
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v == "" or v is None else format(v, spec)


def report(rows: list[dict], args, work) -> None:
    print(f"\n{rows[0]['requests']} requests x {args.images_per_request} image(s) of {work.visual_tokens} visual "
          f"tokens, {args.output_len} output tokens, dtype {args.dtype}; target {args.target}, guide {args.guide}"
          + ("; CPU: one core per rank" if args.one_core_per_rank else ""))
    head = (f"{'config':<16} {'req/s':>7} {'speed-up':>8} {'guide steps':>11} {'guide s':>8} {'ms/step':>8} "
            f"{'guide s / TP1':>13} {'req/s / TP1':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['config']:<16} {r['req_per_s']:>7.3f} {r['speedup']:>7.2f}x {_fmt(r['guide_steps'], '>11d')} "
              f"{_fmt(r['guide_s'], '>8.3f')} {_fmt(r['guide_step_ms'], '>8.1f')} "
              f"{_fmt(r.get('guide_s_vs_tp1', ''), '>12.2f')}x {_fmt(r.get('req_per_s_vs_tp1', ''), '>10.2f')}x")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "parallel.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})
    tp_bench.log(f"wrote {out / 'parallel.csv'}")
    plt = None if args.no_plot else tp_bench.pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.bar([r["config"] for r in rows], [r["req_per_s"] for r in rows],
            color=["grey" if r["keep_ratio"] == "" else "C0" for r in rows])
    ax1.set_ylabel("requests/s")
    ax1.set_title("throughput by tensor-parallel size")
    ax1.tick_params(axis="x", labelrotation=25)
    sgl = [r for r in rows if r["guide_s"] != ""]
    ax2.bar([r["config"] for r in sgl], [r["guide_s"] for r in sgl], color="C1")
    ax2.set_ylabel("guide wall time over the run (s)")
    ax2.set_title("the guide's work, split across ranks")
    ax2.tick_params(axis="x", labelrotation=25)
    fig.tight_layout()
    fig.savefig(out / "parallel.png", dpi=100)
    plt.close(fig)
    tp_bench.log(f"wrote {out / 'parallel.png'}")


def main(argv=None) -> int:
    args = parse(argv)
    if not (args.target and args.guide):
        guide, target = tp_bench.default_pair(args.smoke, args.pair)
        args.target, args.guide = args.target or str(target), args.guide or str(guide)
    args.target, args.guide = str(args.target), str(args.guide)
    work = tp_bench.build_workload(args, Path(args.target))
    configs = configurations(args)
    tp_bench.log(f"configs: {', '.join(c.name for c in configs)}")
    runs = [[] for _ in configs]
    for rep in range(args.repeats):
        for i, cfg in enumerate(configs):
            tp_bench.log(f"run {rep * len(configs) + i + 1}/{args.repeats * len(configs)}")
            runs[i].append(tp_bench.run_offline(args, work, cfg))
    report(rows_for(configs, runs), args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
