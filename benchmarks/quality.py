"""The paper's accuracy comparison on the trained shapes pair: what each way of spending fewer
visual tokens costs in accuracy, and what it buys in requests/s.

    .venv/bin/python benchmarks/quality.py                   # 600 test examples, all methods
    .venv/bin/python benchmarks/quality.py --examples 20 --ratios 1,0.1   # smoke size (tests)

At each fraction of visual tokens kept (1.0, 0.5, 0.25, 0.1, 0.05), on the shapes test split
(vllm_sgl/tasks/shapes.py, exact-match answers, per question kind):
- engine (vLLM, offline LLM.generate, timed per configuration, all requests at once):
  `sgl`: LLM(model_impl="sgl"), the per-request keep ratio; `sgl-sdpp`: the same engine with the
  spatial keep rule per request (sgl_importance, docs/importance.md); `sgl+see`: the same with early exit at
  the threshold calibrated on the validation split, at --see-ratio (calibrate's rule: the lowest threshold whose
  exits agree with the target >= --min-agreement); `downscaled`: vanilla vLLM with the image
  resized to the largest square grid of at most k visual tokens (what users do today);
  `target` (vanilla, full image) and `guide` (the guide's own answer, from the SGL trace).
- reference (vllm_sgl.reference, fp32; benchmarks/baselines.py, where each is defined as its paper
  does): `random`, `fastv` (at its own layer K: the target runs K layers on every token), `fastv-flops`
  (FastV after layer 1 with as many tokens as give the target the compute of input pruning, where
  that leaves any), `fastv+sdpp` (FastV's
  scores spread by the spatial keep rule), `divprune`, `cdpruner`, `visionzip` (with its contextual
  tokens); `sgl-ref` / `sgl-sdpp-ref` (the method's keep sets, cross-checks of the engine rows),
  `sgl-sdpp-tuned` (if the search picks other constants than the shipped ones), `sgl@K` (the guide's
  keep set dropped at FastV's layer: the guide's ranking against the target's own, same place),
  `guide-1-layer`; `target-ref` / `guide-ref` (the reference's answers on the full image).
  Hyperparameters: the same budget of configurations for every method that has any, chosen on
  --search-examples validation questions of the pair under test (search.csv). This part runs in a
  second process beside the engine part.
- SEE: exit rate, accuracy of exited answers and of all answers against the threshold (scores from
  the score-only SGL run at keep 0.1), and the measured requests/s with SEE on.
- significance: every accuracy with its 95% Wilson interval; at each ratio every method against
  `sgl`, `sgl-sdpp`, the best baseline and the best baseline that prunes at the target's input (as
  SGL does), and SGL's rows against the target on the full image, paired on the same questions: the
  difference with its 95% bootstrap interval and the exact McNemar p-value.

Writes OUT/quality.csv (one row per method, ratio and kind), OUT/quality.md (the tables),
OUT/per_question.csv.gz (every answer),
OUT/comparisons.csv, OUT/search.csv, OUT/see.csv, OUT/quality.json and OUT/quality.png (accuracy
with intervals against tokens kept; accuracy against requests/s; SEE against the threshold;
accuracy per kind at keep 0.1).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))
import throughput as tp_bench  # noqa: E402

from vllm_sgl.pruning import keep_count  # noqa: E402
from vllm_sgl.tasks import shapes  # noqa: E402

RATIOS = (1.0, 0.5, 0.25, 0.1, 0.05)
ENGINE_METHODS = ("sgl", "sgl-sdpp", "sgl+see", "downscaled")
# The field's baselines (benchmarks/baselines.py: one implementation of each, as its paper defines it)
BASELINES = ("random", "fastv", "fastv+sdpp", "divprune", "cdpruner", "visionzip")
INPUT_BASELINES = ("random", "divprune", "cdpruner", "visionzip")
# What every comparison is made against: the paper's method as the engine serves it
SGL = ("sgl", "sgl-sdpp")


def log(msg: str) -> None:
    print(f"[quality] {msg}", file=sys.stderr, flush=True)


def downscaled_side(ratio: float, grid: int = shapes.IMAGE_SIZE // 28) -> int:
    """Visual tokens per side of the downscaled image: the largest square grid with at most
    k = max(1, floor(ratio * N)) tokens (a 28 px merged patch per token)."""
    k = max(1, math.floor(ratio * grid * grid))
    return max(1, math.isqrt(k))


class Results:
    """Answers per (method, ratio): correctness per example, with the example's kind."""

    def __init__(self, examples: list[shapes.Example]):
        self.examples = examples
        self.correct: dict[tuple[str, float], list[bool]] = {}
        self.replies: dict[tuple[str, float], list[str]] = {}
        self.tokens: dict[tuple[str, float], float] = {}
        self.req_s: dict[tuple[str, float], float] = {}
        self.exit_rate: dict[tuple[str, float], float] = {}

    def add(self, method: str, ratio: float, replies: list[str], tokens: float,
            req_s: float | None = None, exit_rate: float | None = None) -> None:
        self.correct[(method, ratio)] = [shapes.is_correct(r, e.answer) for r, e in zip(replies, self.examples)]
        self.replies[(method, ratio)] = list(replies)
        self.tokens[(method, ratio)] = tokens
        if req_s is not None:
            self.req_s[(method, ratio)] = req_s
        if exit_rate is not None:
            self.exit_rate[(method, ratio)] = exit_rate
        acc = self.accuracy(method, ratio)
        log(f"{method} at {ratio:g}: accuracy {acc:.3f}" + (f", {req_s:.2f} req/s" if req_s else ""))

    def accuracy(self, method: str, ratio: float, kind: str | None = None) -> float:
        ok = [c for c, e in zip(self.correct[(method, ratio)], self.examples) if kind is None or e.kind == kind]
        return sum(ok) / len(ok) if ok else float("nan")

    def rows(self) -> list[dict]:
        out = []
        for (method, ratio), ok in self.correct.items():
            for kind in (None,) + shapes.KINDS:
                sel = [c for c, e in zip(ok, self.examples) if kind is None or e.kind == kind]
                out.append({"method": method, "ratio": ratio, "kind": kind or "all", "correct": sum(sel),
                            "total": len(sel), "accuracy": round(sum(sel) / len(sel), 4) if sel else None,
                            "visual_tokens": round(self.tokens[(method, ratio)], 1),
                            "req_per_s": round(self.req_s[(method, ratio)], 3) if (method, ratio) in self.req_s else None,
                            "exit_rate": self.exit_rate.get((method, ratio))})
        return out


# ----------------------------------------------------------------------------------------------
# The engine: SGL (score-only, then with SEE) and vanilla (full and downscaled images)


def _prompts(processor, examples, images=None, kwargs=None):
    from vllm_sgl.reference import build_prompt_text

    return [{"prompt": build_prompt_text(processor, 1, e.question),
             "multi_modal_data": {"image": images[i] if images else e.image},
             **({"mm_processor_kwargs": kwargs} if kwargs else {})} for i, e in enumerate(examples)]


def _generate(llm, prompts, params):
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return outs, len(prompts) / (time.perf_counter() - t)


def _guide_seconds(recs: list[dict]) -> float:
    """The guide's seconds per request: each batched guide call counted once (trace)."""
    steps = {r["guide_step_seconds"] for r in recs if r.get("guide_step_seconds") is not None}
    return max(1e-6, sum(steps) / max(1, len(recs)))  # > 0: calibrate.table divides by 1 - rate x (1 - share)


def _shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort between engines
        pass


def engine_runs(args, guide_dir: Path, target_dir: Path, res: Results, calib: list[shapes.Example]) -> dict:
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from vllm_sgl.engine.calibrate import Item, Scored, recommend, table
    from vllm_sgl.engine.trace import read_trace, user_request_id

    processor = AutoProcessor.from_pretrained(target_dir)
    tok = processor.tokenizer
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    common = dict(dtype="float32", max_model_len=2048, kv_cache_memory_bytes=512 * 2**20, seed=0,
                  limit_mm_per_prompt={"image": 1, "video": 0}, max_num_seqs=args.max_num_seqs)
    examples = res.examples
    n_vis = 256
    tmp = Path(tempfile.mkdtemp(prefix="sgl-quality-"))
    see: dict = {}

    def sgl_engine(name: str, extra: dict):
        trace = tmp / f"{name}.jsonl"
        sgl = {"guide_model": str(guide_dir), "keep_ratio": 0.1, "guide_max_tokens": args.max_tokens,
               "trace_path": str(trace), **extra}
        log(f"starting the SGL engine ({name})")
        return LLM(model=str(target_dir), model_impl="sgl", additional_config={"sgl": sgl}, **common), trace

    # 1. SGL, score-only: every ratio's answers, the guide's answers and every request's exit score
    llm, trace = sgl_engine("score-only", {"see_score_only": True})
    try:
        scored_test, test_cost = None, (1.0, 0.0)
        for ratio in args.ratios:
            outs, rps = _generate(llm, _prompts(processor, examples, kwargs={"sgl_keep_ratio": ratio}), params)
            lines = read_trace(trace)
            recs = [lines[user_request_id(o.request_id)] for o in outs]
            kept = sum(len(r["keep_indices"][0]) for r in recs) / len(recs)
            res.add("sgl", ratio, [o.outputs[0].text for o in outs], kept, rps)
            if ratio < 1:  # the spatial keep rule, same engine, same budget
                kwargs = {"sgl_keep_ratio": ratio, "sgl_importance": "sgl-sdpp"}
                sd_outs, sd_rps = _generate(llm, _prompts(processor, examples, kwargs=kwargs), params)
                res.add("sgl-sdpp", ratio, [o.outputs[0].text for o in sd_outs], kept, sd_rps)
            guide_text = [tok.decode(r["guide_answer_ids"], skip_special_tokens=True) for r in recs]
            if "guide" not in {m for m, _ in res.correct}:
                res.add("guide", 1.0, guide_text, n_vis)
            if ratio == args.see_ratio:
                test_cost = (1.0 / rps, _guide_seconds(recs))
                scored_test = [Scored(Item([], e.question, e.answer), r["see_score"], bool(r["see_fits"]), g,
                                      o.outputs[0].text) for e, r, g, o in zip(examples, recs, guide_text, outs)]
        # the SEE threshold, chosen on the validation split as `vllm-sgl calibrate` chooses it
        outs, rps = _generate(llm, _prompts(processor, calib, kwargs={"sgl_keep_ratio": args.see_ratio}), params)
        lines = read_trace(trace)
        recs = [lines[user_request_id(o.request_id)] for o in outs]
        scored_val = [Scored(Item([], e.question, e.answer), r["see_score"], bool(r["see_fits"]),
                             tok.decode(r["guide_answer_ids"], skip_special_tokens=True), o.outputs[0].text)
                      for e, r, o in zip(calib, recs, outs)]
        grid = [round(0.05 * i, 2) for i in range(21)] + [0.96, 0.97, 0.98, 0.99, 0.995, 0.999]
        grid = sorted(set(grid))
        val_rows = table(scored_val, grid, 1.0 / rps, _guide_seconds(recs))
        best = recommend(val_rows, args.min_agreement)
        threshold = best["threshold"] if best else None
        see = {"threshold": threshold, "min_agreement": args.min_agreement, "ratio": args.see_ratio,
               "validation": val_rows, "test": table(scored_test, grid, *test_cost) if scored_test else []}
        log(f"SEE threshold from {len(calib)} validation examples: {threshold}")
    finally:
        _shutdown(llm)
        del llm

    # 2. SGL with SEE at that threshold: measured requests/s and exits
    if threshold is not None:
        llm, trace = sgl_engine("see", {"see_threshold": threshold})
        try:
            for ratio in [args.see_ratio]:  # the ratio its threshold was calibrated at
                outs, rps = _generate(llm, _prompts(processor, examples, kwargs={"sgl_keep_ratio": ratio}), params)
                lines = read_trace(trace)
                recs = [lines[user_request_id(o.request_id)] for o in outs]
                exits = sum(bool(r["see_exit"]) for r in recs) / len(recs)
                kept = sum(len(r["keep_indices"][0]) * (not r["see_exit"]) for r in recs) / len(recs)
                res.add("sgl+see", ratio, [o.outputs[0].text for o in outs], kept, rps, exits)
        finally:
            _shutdown(llm)
            del llm

    # 3. vanilla: the full image, and the image downscaled to about k tokens
    log("starting the vanilla engine")
    llm = LLM(model=str(target_dir), **common)
    try:
        for ratio in args.ratios:
            side = downscaled_side(ratio) if ratio < 1 else shapes.IMAGE_SIZE // 28
            images = [e.image.resize((side * 28, side * 28), resample=3) for e in examples]  # bicubic
            outs, rps = _generate(llm, _prompts(processor, examples, images=images), params)
            res.add("downscaled" if ratio < 1 else "target", ratio, [o.outputs[0].text for o in outs], side * side, rps)
    finally:
        _shutdown(llm)
        del llm
    return see


# ----------------------------------------------------------------------------------------------
# The reference: the field's baselines at the same token counts (benchmarks/baselines.py)


def search_runs(args, runner) -> tuple[dict, list[dict]]:
    """Every method with hyperparameters gets the same SEARCH_BUDGET configurations, each scored by
    its mean accuracy at --search-ratios on --search-examples validation examples of the pair under
    test; the best is kept (ties: the earlier configuration, the papers' or shipped values first).
    Returns ({method: chosen hp}, the whole log)."""
    import baselines as bl

    val = shapes.split_examples("validation", args.search_examples)
    t0 = time.perf_counter()
    caps = [runner.capture("validation", i, e) for i, e in enumerate(val)]
    log(f"search: captured {len(caps)} validation examples ({time.perf_counter() - t0:.0f} s)")
    chosen, rows = {}, []
    for name, configs in bl.SEARCH.items():
        best = None
        for own in configs:
            hp = {**chosen.get(bl.BUILDS_ON.get(name), {}), **own}
            accs = {}
            for r in args.search_ratios:
                ok = [shapes.is_correct(runner.reply(c, bl.keep(name, c, keep_count(c["n"], r), hp)), c["answer"])
                      for c in caps]
                accs[r] = sum(ok) / len(ok)
            score = sum(accs.values()) / len(accs)
            rows.append({"method": name, "config": json.dumps(hp), "score": round(score, 4),
                         **{f"keep {r:g}": round(a, 4) for r, a in accs.items()}})
            log(f"search {name} {json.dumps(hp)}: {score:.3f} ({time.perf_counter() - t0:.0f} s)")
            if best is None or score > best[0]:
                best = (score, hp)
        chosen[name] = best[1]
        rows[-len(configs):] = [dict(r, chosen=json.loads(r["config"]) == best[1]) for r in rows[-len(configs):]]
    runner.save()
    return chosen, rows


def reference_runs(args, runner, examples: list[shapes.Example], chosen: dict) -> list[tuple]:
    """Each baseline with its chosen hyperparameters, SGL's keep sets as the reference computes them
    (cross-checks of the engine rows), the guide's ranking at FastV's layer, FastV at equal target
    compute, and the target on the full image."""
    import baselines as bl

    fastv = chosen.get("fastv", bl.METHODS["fastv"][1])
    plan = {m: chosen.get(m) for m in BASELINES}
    plan.update({"sgl-ref": None, "sgl-sdpp-ref": None, "guide-1-layer": None, "sgl@K": {"K": fastv["K"]}})
    if chosen.get("sgl-sdpp") and chosen["sgl-sdpp"] != bl.METHODS["sgl-sdpp"][1]:
        plan["sgl-sdpp-tuned"] = chosen["sgl-sdpp"]
    layers = runner.ref.target.num_layers
    ratios = [r for r in args.ratios if r < 1]
    replies: dict[tuple[str, float], list[str]] = defaultdict(list)
    tokens: dict[tuple[str, float], list[int]] = defaultdict(list)
    t0 = time.perf_counter()
    for i, e in enumerate(examples):
        c = runner.capture("test", i, e)
        for m in ("target", "guide"):
            replies[(f"{m}-ref", 1.0)].append(c[f"{m}_reply"])
            tokens[(f"{m}-ref", 1.0)].append(c["n"])
        for ratio in ratios:
            k = keep_count(c["n"], ratio)
            for method, hp in plan.items():
                name = {"sgl-ref": "sgl", "sgl-sdpp-ref": "sgl-sdpp", "sgl-sdpp-tuned": "sgl-sdpp"}.get(method, method)
                replies[(method, ratio)].append(runner.reply(c, bl.keep(name, c, k, hp)))
                tokens[(method, ratio)].append(k)
            # FastV at equal target compute: as many visual-token layer passes as keeping k at the
            # input. K = 1, the only layer that leaves any token at keep <= 0.5 on a 4-layer target.
            k_eq = bl.target_flops_keep(c["n"], k, 1, layers)
            if k_eq >= 1:
                replies[("fastv-flops", ratio)].append(runner.reply(c, bl.keep("fastv", c, k_eq, {**fastv, "K": 1})))
                tokens[("fastv-flops", ratio)].append(k_eq)
        if (i + 1) % 20 == 0 or i + 1 == len(examples):
            el = time.perf_counter() - t0
            log(f"reference: {i + 1}/{len(examples)} examples ({el:.0f} s, "
                f"eta {el / (i + 1) * (len(examples) - i - 1):.0f} s)")
    runner.save()
    # (method, ratio, replies, mean visual tokens) of the rows every example has
    return [(method, ratio, texts, sum(tokens[(method, ratio)]) / len(texts)) for (method, ratio), texts in replies.items()
            if len(texts) == len(examples) and (1.0 in args.ratios or ratio < 1)]


def reference_part(args, guide_dir: Path, target_dir: Path) -> dict:
    """The search on validation, then every reference row on the test examples (its own process
    while the engine part runs: it needs only the pair and the examples' seeds)."""
    import baselines as bl

    runner = bl.Runner(guide_dir, target_dir, args.threads)
    log(f"pair {runner.pair}: captures and replies cached in {runner.dir}")
    chosen, search_log = search_runs(args, runner)
    rows = reference_runs(args, runner, shapes.split_examples("test", args.examples), chosen)
    return {"chosen": chosen, "search": search_log, "rows": rows}


# ----------------------------------------------------------------------------------------------
# Significance: every comparison is paired (the same questions), with its sample size


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    mid, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (mid - half) / (1 + z * z / n), (mid + half) / (1 + z * z / n)


def mcnemar_exact(a: list[bool], b: list[bool]) -> tuple[int, int, float]:
    """Exact (binomial) two-sided McNemar test of paired outcomes: (a right and b wrong, a wrong and
    b right, p-value)."""
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    m = only_a + only_b
    if m == 0:
        return only_a, only_b, 1.0
    tail = sum(math.comb(m, i) for i in range(min(only_a, only_b) + 1)) / 2 ** m
    return only_a, only_b, min(1.0, 2 * tail)


def bootstrap_diff(a: list[bool], b: list[bool], iters: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% paired bootstrap interval of accuracy(a) - accuracy(b) (questions resampled together)."""
    import numpy as np

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(iters, len(d)))
    means = d[idx].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def best_baseline(res: Results, ratio: float, at_input: bool = False) -> str | None:
    """The most accurate baseline at this ratio (test split); at_input: of those that prune at the
    target's input like SGL, so the pruned tokens never enter the KV (FastV keeps them for K layers)."""
    cands = [m for m in (INPUT_BASELINES if at_input else BASELINES + ("fastv-flops",)) if (m, ratio) in res.correct]
    return max(cands, key=lambda m: (res.accuracy(m, ratio), -cands.index(m))) if cands else None


def paired(ratio: float, method: str, against: str, a: list[bool], b: list[bool], role: str = "") -> dict:
    lo, hi = bootstrap_diff(a, b)
    only_a, only_b, p = mcnemar_exact(a, b)
    return {"ratio": ratio, "method": method, "against": against, "role": role or against, "n": len(a),
            "accuracy": round(sum(a) / len(a), 4), "accuracy_against": round(sum(b) / len(b), 4),
            "difference": round((sum(a) - sum(b)) / len(a), 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4),
            "only_method_right": only_a, "only_against_right": only_b, "p_mcnemar": p}


def comparisons(res: Results) -> list[dict]:
    """At each ratio < 1, every method against `sgl`, `sgl-sdpp`, the best baseline and the best
    one at the input (by test accuracy at that ratio), and SGL's rows against the target on the
    full image: accuracy difference, its paired bootstrap interval, exact McNemar."""
    out = []
    full = res.correct.get(("target", 1.0))
    for ratio in sorted({r for _, r in res.correct if r < 1}, reverse=True):
        best, best_in = best_baseline(res, ratio), best_baseline(res, ratio, at_input=True)
        against = [m for m in SGL if (m, ratio) in res.correct]
        for m in dict.fromkeys(m for m, r in res.correct if r == ratio):
            a = res.correct[(m, ratio)]
            out += [paired(ratio, m, other, a, res.correct[(other, ratio)]) for other in against if other != m]
            out += [paired(ratio, m, other, a, res.correct[(other, ratio)], role)
                    for other, role in ((best, "best baseline"), (best_in, "best input baseline")) if other and other != m]
            if full and m in SGL + ("sgl+see",):
                out.append(paired(ratio, m, "target", a, full))
            if m == "sgl@K" and ("fastv", ratio) in res.correct:  # the guide's ranking against the target's, same layer
                out.append(paired(ratio, m, "fastv", a, res.correct[("fastv", ratio)], "same layer"))
    return out


def per_question_rows(res: Results) -> list[dict]:
    return [{"method": m, "ratio": r, "index": i, "seed": e.seed, "kind": e.kind, "correct": int(ok),
             "reply": reply, "answer": e.answer}
            for (m, r), oks in res.correct.items()
            for i, (e, ok, reply) in enumerate(zip(res.examples, oks, res.replies[(m, r)]))]


# ----------------------------------------------------------------------------------------------
# Output


def print_table(res: Results, comps: list[dict]) -> None:
    ratios = sorted({r for _, r in res.correct}, reverse=True)
    methods = list(dict.fromkeys(m for m, _ in res.correct))
    n = len(res.examples)
    print(f"\naccuracy (all kinds) by fraction of visual tokens kept, 95% Wilson interval; n = {n} test questions")
    print(f"{'method':<15}" + "".join(f"{f'keep {r:g}':>20}" for r in ratios))
    for m in methods:
        cells = ""
        for r in ratios:
            if (m, r) in res.correct:
                ok = res.correct[(m, r)]
                lo, hi = wilson(sum(ok), len(ok))
                cells += f"{sum(ok) / len(ok):>9.3f} ({lo:.2f}-{hi:.2f})"
            else:
                cells += f"{'':>20}"
        print(f"{m:<15}{cells}")
    print("\npaired differences (method - other), 95% bootstrap interval, exact McNemar p (n as above)")
    for r in sorted({c["ratio"] for c in comps}, reverse=True):
        best = best_baseline(res, r)
        print(f"keep {r:g} (best baseline: {best}; best at the input: {best_baseline(res, r, at_input=True)})")
        cols = [m for m in SGL if (m, r) in res.correct] + ["best baseline", "best input baseline"] + \
            (["target"] if ("target", 1.0) in res.correct else [])
        print(f"  {'method':<15}{'acc':>7}" + "".join(f"{'vs ' + c:>34}" for c in cols))
        for m in dict.fromkeys(c["method"] for c in comps if c["ratio"] == r):
            cells = ""
            for col in cols:
                hit = [c for c in comps if c["ratio"] == r and c["method"] == m and c["role"] == col]
                if hit:
                    c = hit[0]
                    cells += f"{c['difference']:>+8.3f} [{c['ci_low']:+.3f},{c['ci_high']:+.3f}] p={c['p_mcnemar']:<7.2g}"
                else:
                    cells += f"{'':>34}"
            print(f"  {m:<15}{res.accuracy(m, r):>7.3f}{cells}")
    print("\nper kind at each ratio: method ratio | " + " ".join(f"{k:>7}" for k in shapes.KINDS) + " | req/s")
    for m in methods:
        for r in ratios:
            if (m, r) in res.correct:
                kinds = " ".join(f"{res.accuracy(m, r, k):>7.3f}" for k in shapes.KINDS)
                rps = res.req_s.get((m, r))
                print(f"{m:<15}{r:>5g} | {kinds} | {f'{rps:.2f}' if rps else '-'}")
    for m in SGL:
        if ("target", 1.0) in res.correct and (m, 0.1) in res.correct:
            t, s = res.accuracy("target", 1.0), res.accuracy(m, 0.1)
            print(f"\n{m} at keep 0.1 keeps {s / t:.1%} of the target's accuracy ({s:.3f} / {t:.3f})")


def markdown(res: Results, comps: list[dict], chosen: dict) -> str:
    """The tables as markdown (quality.md, beside the per-question file they are computed from)."""
    ratios = sorted({r for _, r in res.correct}, reverse=True)
    methods = list(dict.fromkeys(m for m, _ in res.correct))
    n = len(res.examples)
    kinds = {k: sum(e.kind == k for e in res.examples) for k in shapes.KINDS}
    md = [f"n = {n} test questions (" + ", ".join(f"{k} {c}" for k, c in kinds.items()) + "); accuracy with its 95% "
          "Wilson interval", "", "| method | " + " | ".join(f"keep {r:g}" for r in ratios) + " |",
          "| --- |" + " --- |" * len(ratios)]
    for m in methods:
        cells = []
        for r in ratios:
            ok = res.correct.get((m, r))
            cells.append(f"{sum(ok) / len(ok):.3f} ({wilson(sum(ok), len(ok))[0]:.2f}-{wilson(sum(ok), len(ok))[1]:.2f})"
                         if ok else "")
        md.append(f"| {m} | " + " | ".join(cells) + " |")
    if chosen:
        md += ["", "Chosen on validation (search.csv): " + "; ".join(f"`{m}` {json.dumps(hp)}" for m, hp in chosen.items())]
    for r in sorted({c["ratio"] for c in comps}, reverse=True):
        best = best_baseline(res, r)
        cols = [m for m in SGL if (m, r) in res.correct] + ["best baseline", "best input baseline"] + \
            (["target"] if ("target", 1.0) in res.correct else [])
        md += ["", f"keep {r:g}: paired difference (row - column), 95% bootstrap interval, exact McNemar p; "
               f"best baseline `{best}`, best at the target's input `{best_baseline(res, r, at_input=True)}`", "", "| method | accuracy | " + " | ".join(f"vs {c}" for c in cols) + " |",
               "| --- | --- |" + " --- |" * len(cols)]
        for m in dict.fromkeys(c["method"] for c in comps if c["ratio"] == r):
            cells = []
            for col in cols:
                hit = [c for c in comps if c["ratio"] == r and c["method"] == m and c["role"] == col]
                cells.append(f"{hit[0]['difference']:+.3f} [{hit[0]['ci_low']:+.3f}, {hit[0]['ci_high']:+.3f}] "
                             f"p={hit[0]['p_mcnemar']:.2g}" if hit else "")
            md.append(f"| {m} | {res.accuracy(m, r):.3f} | " + " | ".join(cells) + " |")
        md += [f"\nThe guide's keep set against FastV's own ranking, both dropped after FastV's layer K: "
               f"`sgl@K` - `fastv` {c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] p={c['p_mcnemar']:.2g}"
               for c in comps if c["ratio"] == r and c["role"] == "same layer"]
    at = 0.1 if any(r == 0.1 for _, r in res.correct) else min(ratios)
    md += ["", f"Per kind at keep {at:g} (target and guide: keep 1)", "",
           "| method | all | " + " | ".join(shapes.KINDS) + " |", "| --- | --- |" + " --- |" * len(shapes.KINDS)]
    for m in methods:
        r = 1.0 if m in ("target", "guide", "target-ref", "guide-ref") else at
        if (m, r) in res.correct:
            md.append(f"| {m} | {res.accuracy(m, r):.3f} | " + " | ".join(f"{res.accuracy(m, r, k):.3f}" for k in shapes.KINDS)
                      + " |")
    return "\n".join(md) + "\n"


def load_results(out: Path) -> tuple[Results, dict]:
    """Results from a run's per_question.csv.gz and quality.csv (--tables-from: the tables, comparisons
    and plot again from the committed files)."""
    with gzip.open(out / "per_question.csv.gz", "rt", newline="") as f:
        pq = list(csv.DictReader(f))
    seeds = list(dict.fromkeys(int(r["seed"]) for r in pq))
    res = Results([shapes.make_example(s) for s in seeds])
    order = {s: i for i, s in enumerate(seeds)}
    by = defaultdict(dict)
    for r in pq:
        by[(r["method"], float(r["ratio"]))][order[int(r["seed"])]] = r["reply"]
    with (out / "quality.csv").open() as f:
        meta = {(r["method"], float(r["ratio"])): r for r in csv.DictReader(f) if r["kind"] == "all"}
    for (m, ratio), replies in by.items():
        row = meta[(m, ratio)]
        res.add(m, ratio, [replies[i] for i in range(len(seeds))], float(row["visual_tokens"]),
                float(row["req_per_s"]) if row["req_per_s"] else None, float(row["exit_rate"]) if row["exit_rate"] else None)
    q = json.loads((out / "quality.json").read_text())
    return res, q


def plot(res: Results, see: dict, path: Path) -> None:
    plt = tp_bench.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    ax = axes[0][0]
    styles = {"sgl": ("C0", "o", "-"), "sgl-sdpp": ("C9", "o", "-"), "sgl+see": ("C0", "s", ":"),
              "downscaled": ("C3", "v", "-"), "random": ("grey", "x", "--"), "fastv": ("C2", "^", "--"),
              "fastv+sdpp": ("C2", "^", ":"), "fastv-flops": ("C2", "2", "none"), "divprune": ("C6", "<", "--"),
              "cdpruner": ("C8", ">", "--"), "visionzip": ("C7", "v", ":"), "guide-1-layer": ("C4", "d", "--"),
              "sgl@K": ("C1", "*", "--"), "sgl-sdpp-tuned": ("C9", "*", ":")}
    for m, (c, mk, ls) in styles.items():
        pts = sorted((r, res.accuracy(m, r), *wilson(sum(res.correct[(m, r)]), len(res.correct[(m, r)])))
                     for mm, r in res.correct if mm == m)
        if m in ("downscaled",) and ("target", 1.0) in res.correct:
            ok = res.correct[("target", 1.0)]
            pts = sorted(pts + [(1.0, res.accuracy("target", 1.0), *wilson(sum(ok), len(ok)))])
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                        yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                        color=c, marker=mk, ls=ls, label=m, capsize=2, lw=1)
    for m, c in (("target", "k"), ("guide", "C5")):
        if (m, 1.0) in res.correct:
            ax.axhline(res.accuracy(m, 1.0), color=c, lw=0.8, ls="-.", label=f"{m} alone, full image")
    ax.set_xscale("log")
    ax.set_xticks(sorted({r for _, r in res.correct}))
    ax.set_xticklabels([f"{r:g}" for r in sorted({r for _, r in res.correct})])
    ax.set_xlabel("fraction of visual tokens the target sees")
    ax.set_ylabel(f"exact-match accuracy, 95% interval (n = {len(res.examples)})")
    ax.set_title("accuracy against tokens kept")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[0][1]
    for m, c, mk in (("sgl", "C0", "o"), ("sgl-sdpp", "C9", "o"), ("sgl+see", "C0", "s"), ("downscaled", "C3", "v"),
                     ("target", "k", "*")):
        pts = [(res.req_s[(mm, r)], res.accuracy(mm, r), r) for mm, r in res.correct if mm == m and (mm, r) in res.req_s]
        if pts:
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=c, marker=mk, ls="-" if m != "target" else "none",
                    label=m)
            for x, y, r in pts:
                ax.annotate(f"{r:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("requests/s (offline, all requests at once, this CPU)")
    ax.set_ylabel("accuracy")
    ax.set_title("the user's decision: up and to the right wins")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1][0]
    rows = see.get("test") or []
    if rows:
        ts = [r["threshold"] for r in rows]
        ax.plot(ts, [r["exit_rate"] for r in rows], "C0-", label="exit rate")
        ax.plot(ts, [r["guide_accuracy"] if r["guide_accuracy"] is not None else float("nan") for r in rows], "C2-",
                label="accuracy of exited answers")
        ax.plot(ts, [r["accuracy_with_see"] for r in rows], "C1-", label="accuracy of all answers (SEE)")
        ax.axhline(rows[0]["accuracy_target_only"], color="grey", ls="--", lw=1, label="SGL without SEE")
        if see.get("threshold") is not None:
            ax.axvline(see["threshold"], color="k", ls=":", lw=1, label=f"calibrated {see['threshold']:g}")
        ax.set_xlabel(f"SEE threshold (keep {see.get('ratio'):g})")
        ax.set_title("SEE: exits and accuracy against the threshold")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)

    ax = axes[1][1]
    at = 0.1 if any(r == 0.1 for _, r in res.correct) else min(r for _, r in res.correct)
    methods = [m for m in ("target", "guide", "sgl", "sgl-sdpp", "sgl+see", "downscaled", "fastv", "fastv+sdpp",
                           "divprune", "random")
               if (m, 1.0 if m in ("target", "guide") else at) in res.correct]
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        r = 1.0 if m in ("target", "guide") else at
        ax.bar([i + j * width for i in range(len(shapes.KINDS))], [res.accuracy(m, r, k) for k in shapes.KINDS],
               width, label=m if m in ("target", "guide") else f"{m} {r:g}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes.KINDS))])
    ax.set_xticklabels(shapes.KINDS)
    ax.set_title(f"accuracy per question kind at keep {at:g}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


def write_csv(path: Path, rows: list[dict]) -> None:
    if rows:
        with gzip.open(path, "wt", newline="") if path.name.endswith(".gz") else path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair-dir", type=Path, default=None,
                   help="a guide/target pair (default: the trained shapes pair, written to the cache)")
    p.add_argument("--examples", type=int, default=600,
                   help="test examples (600: a 4-point paired difference is significant at ~15%% discordance)")
    p.add_argument("--calib-examples", type=int, default=100, help="validation examples for the SEE threshold")
    p.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS))
    p.add_argument("--see-ratio", type=float, default=0.1, help="keep ratio of the SEE sweep")
    p.add_argument("--min-agreement", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads for the reference part")
    p.add_argument("--search-examples", type=int, default=150,
                   help="validation examples for the baselines' (and sgl-sdpp's) hyperparameter search")
    p.add_argument("--search-ratios", default="0.25,0.1", help="keep ratios the search scores (mean accuracy)")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--out", type=Path, default=Path("out/quality"))
    p.add_argument("--engine-from", type=Path, default=None,
                   help="a finished run's folder: its engine rows (same test examples) instead of running the engine")
    p.add_argument("--tables-from", type=Path, default=None,
                   help="a finished run's folder: its tables, comparisons.csv and plot again from its files, nothing run")
    args = p.parse_args(argv)
    if args.tables_from:
        res, q = load_results(args.tables_from)
        comps = comparisons(res)
        print_table(res, comps)
        write_csv(args.tables_from / "comparisons.csv", comps)
        (args.tables_from / "quality.md").write_text(markdown(res, comps, q.get("chosen") or {}))
        plot(res, q.get("see") or {}, args.tables_from / "quality.png")
        return 0
    try:
        args.ratios = sorted({float(x) for x in args.ratios.split(",")}, reverse=True)
        args.search_ratios = sorted({float(x) for x in args.search_ratios.split(",")}, reverse=True)
    except ValueError:
        p.error(f"--ratios and --search-ratios must be comma lists of numbers in (0, 1], got {args.ratios!r}")
    if not all(0 < r <= 1 for r in args.ratios + args.search_ratios):
        p.error(f"--ratios and --search-ratios must be in (0, 1], got {args.ratios}, {args.search_ratios}")
    if args.see_ratio not in args.ratios:
        args.see_ratio = min(args.ratios, key=lambda r: abs(r - args.see_ratio))

    from vllm_sgl.demo import resolve_pair

    guide_dir, target_dir = resolve_pair(str(args.pair_dir) if args.pair_dir else None)
    t0 = time.perf_counter()
    res = Results(shapes.split_examples("test", args.examples))
    see: dict = {}
    chosen, search_log = {}, []
    ref_future = None
    if not args.skip_reference:  # in a second process, beside the engine part
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        ref_future = pool.submit(reference_part, args, guide_dir, target_dir)
    if args.engine_from:
        done, q = load_results(args.engine_from)
        assert [e.seed for e in done.examples] == [e.seed for e in res.examples], "--engine-from ran other examples"
        for (m, r), ok in done.correct.items():
            if m in ENGINE_METHODS + ("target", "guide"):
                res.add(m, r, done.replies[(m, r)], done.tokens[(m, r)], done.req_s.get((m, r)), done.exit_rate.get((m, r)))
        see = q.get("see") or {}
    elif not args.skip_engine:
        see = engine_runs(args, guide_dir, target_dir, res, shapes.split_examples("validation", args.calib_examples))
    if ref_future is not None:
        ref = ref_future.result()
        pool.shutdown()
        chosen, search_log = ref["chosen"], ref["search"]
        for row in ref["rows"]:
            res.add(*row)
    args.out.mkdir(parents=True, exist_ok=True)
    comps = comparisons(res)

    rows = res.rows()
    write_csv(args.out / "quality.csv", rows)
    write_csv(args.out / "per_question.csv.gz", per_question_rows(res))
    write_csv(args.out / "comparisons.csv", comps)
    write_csv(args.out / "search.csv", search_log)
    write_csv(args.out / "see.csv", see.get("test") or [])
    (args.out / "quality.json").write_text(json.dumps(
        {"examples": args.examples, "ratios": args.ratios, "rows": rows, "see": see, "chosen": chosen,
         "search": {"examples": args.search_examples, "ratios": args.search_ratios},
         "seconds": round(time.perf_counter() - t0, 1)}, indent=2) + "\n")
    if chosen:
        print("\nhyperparameters chosen on validation (search.csv): " +
              "; ".join(f"{m} {json.dumps(hp)}" for m, hp in chosen.items()))
    print_table(res, comps)
    (args.out / "quality.md").write_text(markdown(res, comps, chosen))
    if see:
        print(f"\nSEE at keep {see['ratio']:g}: threshold {see['threshold']} (validation, min agreement "
              f"{see['min_agreement']:g})")
    plot(res, see, args.out / "quality.png")
    log(f"wrote {args.out}/quality.csv, quality.md, per_question.csv.gz, comparisons.csv, search.csv and quality.json "
        f"in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
