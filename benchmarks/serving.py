#!/usr/bin/env python
"""Serving latency and throughput: a vanilla server against an SGL server (`--model-impl sgl`) on
the same target, measured by vLLM's own benchmark client (`vllm bench serve`).

    python benchmarks/serving.py                          # bench tiny pair, rates 0.3 and inf, 24 requests
    python benchmarks/serving.py --rates 0.1,0.3,1,inf --num-prompts 48
    python benchmarks/serving.py --smoke                  # test tiny pair, 4 requests, rates 2 and inf

For each server in turn (vanilla, then SGL; one at a time, so they never share the CPU): start it
with `vllm-sgl serve` (same flags for both), wait until healthy, warm it up with 4 requests (not
reported: a new server's first requests pay one-time costs), then for each request rate run
`vllm-sgl bench serve` (vLLM's client; `vllm bench serve` on GPU builds takes the same arguments)
on dataset random-mm: every request has 0 to 2 random images of --image-size pixels and
--input-len text tokens, and decodes exactly --output-len tokens (ignore_eos). Rate i uses seed
--seed + i: both servers get the same requests, and no run repeats an earlier run's requests (a
repeat would be a prefix-cache hit, which is not what a rate measures). Rate inf sends them all at once (saturation); a finite rate is a
Poisson process. Prints, per rate, requests/s, TTFT, TPOT and ITL (median, p99) and end-to-end
latency for both servers with SGL / vanilla ratios; writes OUT/serving.csv, the client's JSON per
run (OUT/NAME-RATE.json), each server's log, and OUT/serving.png (TTFT and TPOT against rate).

Video: `--video-frames F` makes every request one random-mm video of F frames of --image-size
pixels (sent as an mp4 data URL; the server samples its frames as vLLM's video loader does) and adds
a third server, vLLM's EVS at video_pruning_rate 1 - keep ratio: about the same kept tokens as SGL.

    python benchmarks/serving.py --video-frames 16 --image-size 224 --keep-ratio 0.25 --rates 0.5,inf
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import REPO, default_pair, pyplot  # noqa: E402

CLI = [sys.executable, "-m", "vllm_sgl.cli"]
HOST = "127.0.0.1"
# (key in the client's JSON, column label); ratios are SGL / vanilla
METRICS = [
    ("request_throughput", "req/s"),
    ("median_ttft_ms", "TTFT p50 ms"),
    ("p99_ttft_ms", "TTFT p99 ms"),
    ("median_tpot_ms", "TPOT p50 ms"),
    ("median_itl_ms", "ITL p50 ms"),
    ("p99_itl_ms", "ITL p99 ms"),
    ("mean_e2el_ms", "E2E mean ms"),
    ("total_input_tokens", "prompt tokens"),  # the servers' usage counts: SGL's are the pruned prompts
]


def log(msg: str) -> None:
    print(f"[serving] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", default="bench", help="tiny bench pair (throughput.py's --pair)")
    p.add_argument("--guide", help="guide checkpoint (with --target: your own pair instead of a tiny one)")
    p.add_argument("--target", help="target checkpoint")
    p.add_argument("--keep-ratio", type=float, default=0.1)
    p.add_argument("--guide-max-tokens", type=int, default=None, help="SGL's guide_max_tokens (default: the engine's)")
    p.add_argument("--rates", default="0.3,inf", help="request rates, comma-separated; inf = all at once")
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--image-size", type=int, default=896, help="square random images of this side (px)")
    p.add_argument("--video-frames", type=int, default=0,
                   help="each request one random video of this many frames instead of 0-2 images; adds an EVS server")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--server-args", default="--kv-cache-memory-bytes 1G --max-model-len 8192 --max-num-seqs 64",
                   help="more flags for both servers (one string)")
    p.add_argument("--only", choices=["vanilla", "sgl", "evs"], help="run one server only")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--out-dir", default=str(REPO / "out" / "serving"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--smoke", action="store_true", help="test tiny pair, 4 requests of 224 px images, rates 2 and inf")
    p.add_argument("--enforce-eager", action="store_true", help="engines without torch.compile or CUDA graphs: a faster start, not the configuration users time (the tests' smoke runs)")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_prompts, args.rates, args.image_size, args.output_len, args.input_len = 4, "2,inf", 224, 4, 16
        args.server_args = "--kv-cache-memory-bytes 64M --max-model-len 4096"
    try:
        args.rate_list = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        p.error(f"--rates must be comma-separated numbers or inf, got {args.rates!r}")
    if not args.rate_list or not all(r > 0 for r in args.rate_list):
        p.error(f"request rates must be > 0 (inf: all at once), got {args.rates!r}")
    if not 0.0 < args.keep_ratio <= 1.0:
        p.error(f"--keep-ratio must be in (0, 1], got {args.keep_ratio}")
    if bool(args.guide) != bool(args.target):
        p.error("--guide and --target go together")
    for name in ("num_prompts", "input_len", "output_len", "image_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
            return r.status == 200
    except OSError:
        return False


class Server:
    """One `vllm-sgl serve` process in a session of its own (stopping it stops its engine too)."""

    def __init__(self, name: str, target: Path, extra: list[str], args, out: Path):
        self.name, self.port = name, _free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = out / f"server-{name}.log"
        cmd = [*CLI, "serve", str(target), "--host", HOST, "--port", str(self.port), "--dtype", args.dtype,
               "--limit-mm-per-prompt", json.dumps(_limits(args)), "--seed", "0", *args.server_args.split(), *extra]
        if args.enforce_eager:
            cmd.append("--enforce-eager")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["HF_HUB_OFFLINE"] = "1"
        log(f"{name}: starting {' '.join(cmd)}")
        with open(self.log_path, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + args.start_timeout
        t0 = time.monotonic()
        while not _healthy(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
                raise SystemExit(f"{name} server did not start (see {self.log_path}):\n{tail}")
            time.sleep(1.0)
        log(f"{name}: healthy after {time.monotonic() - t0:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def _limits(args) -> dict:
    return {"image": 0, "video": 1} if args.video_frames else {"image": 2}


def _rate_name(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def run_client(server: Server, target: Path, rate: float, seed: int, args, out: Path,
               num_prompts: int | None = None, name: str | None = None) -> dict:
    """vLLM's client against one server at one rate; its saved result (JSON) as a dict."""
    num_prompts = num_prompts or args.num_prompts
    name = name or f"{server.name}-{_rate_name(rate)}.json"
    cmd = [
        *CLI, "bench", "serve", "--backend", "openai-chat", "--base-url", server.url, "--endpoint", "/v1/chat/completions",
        "--model", str(target), "--tokenizer", str(target),
        "--dataset-name", "random-mm", "--num-prompts", str(num_prompts), "--seed", str(seed),
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--random-range-ratio", "0", "--ignore-eos",
        "--random-mm-base-items-per-request", "1", "--random-mm-num-mm-items-range-ratio", "1",
        "--random-mm-limit-mm-per-prompt", json.dumps({"video": 0, **_limits(args)}),
        "--random-mm-bucket-config", json.dumps({f"({args.image_size}, {args.image_size}, {args.video_frames or 1})": 1.0}),
        "--request-rate", _rate_name(rate), "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(out), "--result-filename", name,
    ]
    log(f"{server.name} @ {_rate_name(rate)} req/s: {num_prompts} requests (seed {seed})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (out / f"client-{name[:-5]}.log").write_text(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"the benchmark client failed ({proc.returncode}):\n" + "\n".join(proc.stdout.splitlines()[-30:]))
    result = json.loads((out / name).read_text())
    if result.get("completed") != num_prompts:
        raise SystemExit(f"{server.name} @ {_rate_name(rate)}: {result.get('completed')} of {num_prompts} requests "
                         f"completed (see {out / ('client-' + name[:-5] + '.log')})")
    return result


def rows_of(results: dict[tuple[str, float], dict], rates: list[float], names: list[str]) -> list[dict]:
    """Per rate and metric: each server's value and each non-vanilla server's ratio to vanilla's."""
    rows = []
    for rate in rates:
        for key, label in METRICS:
            row = {"rate": _rate_name(rate), "metric": label}
            for name in names:
                got = results.get((name, rate))
                row[name] = got.get(key) if got else None
            for name in names[1:]:
                a, b = row["vanilla"], row[name]
                row[f"{name}/vanilla"] = (b / a) if a and b is not None else None
            rows.append(row)
    return rows


def print_table(rows: list[dict], args) -> None:
    fmt = lambda x: "-" if x is None else f"{x:.3g}" if abs(x) < 10 else f"{x:.0f}"  # noqa: E731
    media = (f"one video of {args.video_frames} frames of {args.image_size} px" if args.video_frames
             else f"0-2 images of {args.image_size} px")
    evs = f", EVS video_pruning_rate {1 - args.keep_ratio:g}" if args.video_frames else ""
    print(f"\nvLLM bench serve, random-mm: {args.num_prompts} requests, {media}, "
          f"{args.input_len} in / {args.output_len} out tokens; SGL keep {args.keep_ratio:g}{evs}")
    names = [k for k in rows[0] if k not in ("rate", "metric") and "/" not in k]
    ratios = [k for k in rows[0] if "/" in k]
    print(f"{'rate':>6}  {'metric':<12} " + " ".join(f"{n:>9}" for n in names) + " " + " ".join(f"{n:>12}" for n in ratios))
    for r in rows:
        cells = " ".join(f"{fmt(r[n]):>9}" for n in names)
        rel = " ".join(f"{'-' if r[n] is None else format(r[n], '.2f') + 'x':>12}" for n in ratios)
        print(f"{r['rate']:>6}  {r['metric']:<12} {cells} {rel}")


def plot(results: dict[tuple[str, float], dict], rates: list[float], path: Path) -> None:
    plt = pyplot()
    finite = [r for r in rates if not math.isinf(r)]
    if plt is None or not finite:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "median_ttft_ms", "median TTFT (ms)"), (axes[1], "median_tpot_ms", "median TPOT (ms)")):
        for name, style in (("vanilla", "o-"), ("sgl", "s-"), ("evs", "^-")):
            pts = [(r, results[(name, r)][key]) for r in finite if (name, r) in results]
            if pts:
                ax.plot(*zip(*pts), style, label=name)
        ax.set_xlabel("request rate (req/s, Poisson)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("vanilla vs SGL" + (" vs EVS" if ("evs", finite[0]) in results else "") + " under vLLM's benchmark client")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"plot: {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.guide:
        guide, target = Path(args.guide), Path(args.target)
    else:
        guide, target = default_pair(args.smoke, args.pair)
    sgl = {"guide_model": str(guide), "keep_ratio": args.keep_ratio}
    if args.guide_max_tokens:
        sgl["guide_max_tokens"] = args.guide_max_tokens
    servers = [("vanilla", []), ("sgl", ["--model-impl", "sgl", "--additional-config", json.dumps({"sgl": sgl})])]
    if args.video_frames:  # vLLM's own video pruning at about the same kept tokens
        servers.append(("evs", ["--video-pruning-rate", f"{1 - args.keep_ratio:g}"]))
    results: dict[tuple[str, float], dict] = {}
    for name, extra in servers:
        if args.only and name != args.only:
            continue
        server = Server(name, target, extra, args, out)
        try:
            # Warm-up (not reported): the first requests of a new server pay one-time costs (graph
            # compilation, first shapes of 0, 1 and 2 images).
            run_client(server, target, math.inf, args.seed + 1000, args, out, num_prompts=4, name=f"{name}-warmup.json")
            # Each rate gets requests of its own (seed + i, the same for both servers): the same
            # requests again would be prefix-cache hits for the second run on a server.
            for i, rate in enumerate(args.rate_list):
                results[(name, rate)] = run_client(server, target, rate, args.seed + i, args, out)
        finally:
            server.stop()
    rows = rows_of(results, args.rate_list, [n for n, _ in servers if not args.only or n == args.only or n == "vanilla"])
    print_table(rows, args)
    with open(out / "serving.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    log(f"csv: {out / 'serving.csv'}")
    if not args.no_plot:
        plot(results, args.rate_list, out / "serving.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
