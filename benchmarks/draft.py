"""Drafting with the guide's answer (the SGL setting draft_tokens) on and off, side by side in one
run, on the trained shapes pair (guide and target agree on most answers) and on a random pair
(they never agree: what drafting costs when it cannot help).

    .venv/bin/python benchmarks/draft.py                          # both pairs, 100 test questions, k = 4
    .venv/bin/python benchmarks/draft.py --examples 20 --pairs shapes --draft-tokens 2,4,8

Per pair, one engine per configuration (draft_tokens 0, then each k), each running the same
questions of the shapes test split (SGL at --keep-ratio, greedy, the guide's answer budget =
--max-tokens):
- batch: every request submitted at once: output tokens/s over the timed LLM.generate;
- one at a time (--latency-requests of the `List the objects.` questions, the long answers):
  TPOT = (last token - first token) / (tokens - 1) per request (RequestOutput.metrics), the
  median, and the mean end-to-end latency; this is where a decode step saved shows;
- target steps: engine steps in which the target computed tokens, summed over the batch's
  requests (trace target_steps); ideal = the drafting-off steps minus the accepted tokens (each
  accepted draft token is one decode step the target does not run);
- drafts: vLLM's own spec-decode counters (the engine's /metrics, here LLM.get_metrics()):
  acceptance = accepted / draft tokens; mean accepted length = 1 + accepted / drafts (tokens per
  target step of a drafted request, vLLM's definition);
- ceiling (drafting off only): the share of the target's tokens on the common prefix of the guide's
  answer and the target's output, what a perfect drafter could have had accepted, counting the
  target's own token after each accepted draft.
Greedy outputs with drafting must equal those without it (checked, printed as `same`).
Writes draft.csv, draft.json (the arguments, the rows, the command) and draft.png to --out-dir.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from draft_ceiling import common_prefix  # noqa: E402  (a sibling: benchmarks/ is the script's directory)


def log(msg: str) -> None:
    print(f"[draft {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pair_dirs(name: str):
    from vllm_sgl.tiny import SHAPES_SPEC, TinyPairSpec, default_pair_dir, ensure_tiny_pair

    if name == "shapes":
        return ensure_tiny_pair(default_pair_dir("shapes-pair"), SHAPES_SPEC)
    return ensure_tiny_pair(default_pair_dir("tiny-qwen2_5_vl"), TinyPairSpec())  # random weights


def spec_counters(llm) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode_num_") and not m.name.endswith("per_pos"):
            out[m.name] = out.get(m.name, 0.0) + float(getattr(m, "value", 0.0))
    return out


def run_config(pair: str, k: int, args, prompts, examples) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_sgl.engine.trace import read_trace, user_request_id

    guide, target = pair_dirs(pair)
    trace = Path(tempfile.mkdtemp(prefix="sgl-draft-")) / "trace.jsonl"
    sgl = {"guide_model": str(guide), "keep_ratio": args.keep_ratio, "guide_max_tokens": args.max_tokens,
           "trace_path": str(trace), "draft_tokens": k}
    log(f"{pair}: starting the engine with draft_tokens={k}")
    llm = LLM(model=str(target), model_impl="sgl", additional_config={"sgl": sgl}, dtype="float32",
              max_model_len=2048, kv_cache_memory_bytes=512 * 2**20, limit_mm_per_prompt={"image": 1}, seed=0,
              disable_log_stats=False, enforce_eager=args.enforce_eager)
    try:
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
        llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up, untimed
        before = spec_counters(llm)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        after = spec_counters(llm)
        lines = read_trace(trace)
        rows = [lines[user_request_id(o.request_id)] for o in outs]
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        log(f"{pair} k={k}: batch of {len(prompts)} in {wall:.1f} s; now {args.latency_requests} one at a time")
        tpot, latency = [], []
        for p in [p for p, e in zip(prompts, examples) if e.kind == "list"][: args.latency_requests]:
            t1 = time.perf_counter()
            (o,) = llm.generate([p], params, use_tqdm=False)
            latency.append(time.perf_counter() - t1)
            m, n = o.metrics, len(o.outputs[0].token_ids)
            if m is not None and n > 1 and m.last_token_ts > m.first_token_ts:
                tpot.append((m.last_token_ts - m.first_token_ts) / (n - 1))
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    delta = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
    drafts = delta.get("vllm:spec_decode_num_drafts", 0.0)
    draft_tokens = delta.get("vllm:spec_decode_num_draft_tokens", 0.0)
    accepted = delta.get("vllm:spec_decode_num_accepted_tokens", 0.0)
    out_tokens = sum(map(len, tokens))
    prefix = sum(common_prefix(r["guide_answer_ids"], t) for r, t in zip(rows, tokens))
    return {
        "pair": pair, "draft_tokens": k, "requests": len(prompts), "output_tokens": out_tokens,
        "seconds": wall, "output_tok_s": out_tokens / wall, "tpot_ms": 1000 * statistics.median(tpot) if tpot else None,
        "latency_ms": 1000 * statistics.mean(latency) if latency else None,
        "target_steps": sum(r["target_steps"] for r in rows),
        "trace_proposed": sum(r["draft_proposed"] for r in rows), "trace_accepted": sum(r["draft_accepted"] for r in rows),
        "drafts": drafts, "draft_token_count": draft_tokens, "accepted": accepted,
        "acceptance": accepted / draft_tokens if draft_tokens else None,
        "mean_accepted_length": 1 + accepted / drafts if drafts else None,
        "ceiling": prefix / out_tokens if out_tokens else None,
        "tokens": tokens,
    }


def plot(rows, path: Path) -> None:
    """Per pair: the target's steps (and the ideal) and the TPOT / latency ratios, against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    fig, axes = plt.subplots(len(pairs), 2, figsize=(11, 3.6 * len(pairs)), squeeze=False)
    for i, pair in enumerate(pairs):
        rs = [r for r in rows if r["pair"] == pair]
        ks = [r["draft_tokens"] for r in rs]
        ax = axes[i][0]
        ax.bar([str(k) for k in ks], [r["target_steps"] for r in rs], color=["#999"] + ["#3a7"] * (len(rs) - 1))
        ax.plot([str(k) for k in ks[1:]], [r["ideal_steps"] for r in rs[1:]], "k_", markersize=24, label="ideal: off - accepted")
        ax.set_title(f"{pair} pair: target steps ({rs[0]['requests']} requests)")
        ax.set_xlabel("draft_tokens (0 = off)")
        ax.legend(loc="lower left", fontsize=8)
        ax = axes[i][1]
        ax.axhline(1.0, color="#999", lw=1)
        ax.plot(ks[1:], [r["tpot_ratio"] for r in rs[1:]], "o-", label="TPOT, one at a time")
        ax.plot(ks[1:], [r["latency_ratio"] for r in rs[1:]], "s-", label="latency, one at a time")
        ax.plot(ks[1:], [r["tok_s_ratio"] for r in rs[1:]], "^-", label="output tok/s, batch")
        ax.set_title(f"{pair} pair: drafting on / off")
        ax.set_xlabel("draft_tokens")
        ax.set_xticks(ks[1:])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default="shapes,random", help="comma-separated: shapes (trained), random")
    p.add_argument("--examples", type=int, default=100, help="questions of the shapes test split per configuration")
    p.add_argument("--latency-requests", type=int, default=10,
                   help="list questions run one at a time for TPOT and latency")
    p.add_argument("--draft-tokens", default="4", help="comma-separated k > 0 (draft_tokens 0 always runs)")
    p.add_argument("--keep-ratio", type=float, default=0.1)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out-dir", type=Path, default=ROOT / "out" / "draft")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--enforce-eager", action="store_true", help="engines without torch.compile or CUDA graphs: a faster start, not the configuration users time (the tests' smoke runs)")
    args = p.parse_args(argv)
    ks = [int(x) for x in args.draft_tokens.split(",") if x.strip()]
    if any(k <= 0 for k in ks):
        raise SystemExit("--draft-tokens: each k must be > 0 (0, drafting off, always runs)")

    from transformers import AutoProcessor

    from vllm_sgl.reference import build_prompt_text
    from vllm_sgl.tasks import shapes

    examples = shapes.split_examples("test", args.examples)
    rows = []
    for pair in [x.strip() for x in args.pairs.split(",") if x.strip()]:
        if pair not in ("shapes", "random"):
            raise SystemExit(f"--pairs: shapes or random, got {pair!r}")
        processor = AutoProcessor.from_pretrained(pair_dirs(pair)[1])
        prompts = [{"prompt": build_prompt_text(processor, 1, e.question), "multi_modal_data": {"image": e.image}}
                   for e in examples]
        off = run_config(pair, 0, args, prompts, examples)
        rows.append(off)
        for k in ks:
            on = run_config(pair, k, args, prompts, examples)
            on["same"] = on["tokens"] == off["tokens"]
            on["ideal_steps"] = off["target_steps"] - on["accepted"]
            on["tok_s_ratio"] = on["output_tok_s"] / off["output_tok_s"]
            on["tpot_ratio"] = on["tpot_ms"] / off["tpot_ms"] if on["tpot_ms"] and off["tpot_ms"] else None
            on["latency_ratio"] = on["latency_ms"] / off["latency_ms"] if on["latency_ms"] and off["latency_ms"] else None
            rows.append(on)

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    header = ["pair", "k", "out tok/s", "x off", "TPOT ms", "x off", "latency ms", "x off", "target steps", "ideal steps", "draft tok",
              "accepted", "acceptance", "mean acc len", "ceiling", "same"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for r in rows:
        print("| " + " | ".join([
            r["pair"], str(r["draft_tokens"]), f(r["output_tok_s"], ".1f"), f(r.get("tok_s_ratio"), ".2f"),
            f(r["tpot_ms"], ".1f"), f(r.get("tpot_ratio"), ".2f"), f(r["latency_ms"], ".1f"),
            f(r.get("latency_ratio"), ".2f"), str(r["target_steps"]),
            f(r.get("ideal_steps"), ".0f"), f(r["draft_token_count"], ".0f"), f(r["accepted"], ".0f"),
            f(r["acceptance"], ".3f"), f(r["mean_accepted_length"], ".2f"),
            f(r["ceiling"], ".3f") if r["draft_tokens"] == 0 else "", "" if "same" not in r else str(r["same"]),
        ]) + " |")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    fields = [k for k in rows[0] if k != "tokens"] + ["same", "ideal_steps", "tok_s_ratio", "tpot_ratio", "latency_ratio"]
    with open(args.out_dir / "draft.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (args.out_dir / "draft.json").write_text(json.dumps(
        {"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
         "rows": [{k: v for k, v in r.items() if k != "tokens"} for r in rows]}, indent=1))
    if not args.no_plot:
        plot(rows, args.out_dir / "draft.png")
    bad = [r for r in rows if r.get("same") is False]
    if bad:
        print(f"DRAFTING CHANGED GREEDY OUTPUTS: {[(r['pair'], r['draft_tokens']) for r in bad]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
