"""SGL end to end on a tiny pair: `python -m vllm_sgl.demo`.

Writes (or reuses) the guide/target pair trained on the shapes task (`vllm-sgl make-tiny-pair OUT
--task shapes`) when the repo holds its weights, else the random tiny pair, and runs one batch of its test questions (one of each kind, image + question with
an exact answer) through vLLM twice, vanilla and with `--model-impl sgl` (its decode drafted by the
guide's answer, `--draft-tokens`), side by side: per request
the visual tokens kept and pruned, the prompt tokens and KV blocks each way, both answers against
the right one, and the wall time of the batch both ways; saves a picture of the kept visual tokens
over each image (OUT/keep_sets.png, from the engine's trace: they sit on the objects) and the
results (OUT/results.json). `--reference` runs the PyTorch reference instead (adds the early-exit
scores and the target's unpruned answer). `--pair-dir` runs another pair (a random one answers
with arbitrary words: the mechanics without the quality).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vllm_sgl.args import ratio_arg
from vllm_sgl.kernels import IMPORTANCES

# The keep rule and ratio the demo shows: what the quality benchmark supports on the shapes pair
# (benchmarks/README.md, "quality.py and the shapes pair", 600 test questions): `sgl-sdpp` is the
# better rule at keep 0.5-0.1, and keep 0.25 is the smallest ratio at which it keeps >= 90% of the
# target's accuracy (0.645 / 0.700; at 0.1, 72%).
DEMO_IMPORTANCE = "sgl-sdpp"
DEMO_KEEP_RATIO = 0.25


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vllm_sgl.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--pair-dir", default=None,
                   help="folder holding guide/ and target/ (default: the tiny pair cache, built if missing)")
    p.add_argument("--images", type=_positive, default=5,
                   help="number of test questions, one kind after another (default 5: one of each kind)")
    p.add_argument("--keep-ratio", type=ratio_arg("--keep-ratio"), default=DEMO_KEEP_RATIO,
                   help=f"fraction of visual tokens the target sees; default {DEMO_KEEP_RATIO}: the smallest at which "
                        "benchmarks/quality.py measured SGL keeping >= 90%% of the target's accuracy on this pair")
    p.add_argument("--importance", choices=IMPORTANCES, default=DEMO_IMPORTANCE,
                   help=f"keep rule (the SGL setting importance; docs/importance.md); default {DEMO_IMPORTANCE}: "
                        "the one benchmarks/quality.py found best at keep 0.5-0.1 on the shapes test split")
    p.add_argument("--consistency-ratio", type=ratio_arg("--consistency-ratio"), default=0.05)
    p.add_argument("--max-new-tokens", type=_positive, default=16)
    p.add_argument("--exit-threshold", type=float, default=0.6)
    p.add_argument("--draft-tokens", type=int, default=4,
                   help="SGL drafts the target's decode with up to this many of the guide's answer tokens per step "
                        "(the SGL setting draft_tokens; 0: off)")
    p.add_argument("--seed", type=int, default=0, help="first example of the shapes test split")
    p.add_argument("--reference", action="store_true",
                   help="run the PyTorch reference instead of the vLLM engine (adds SEE scores)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the tiny models gain nothing from more, and "
                        "on a busy machine spinning threads slow them down many times; 0: torch's default)")
    return p


def default_spec():
    """The trained shapes pair when the repo holds its weights, else the random tiny pair."""
    from vllm_sgl.tasks import has_trained_weights
    from vllm_sgl.tiny import SHAPES_SPEC, TinyPairSpec

    if has_trained_weights("shapes"):
        return SHAPES_SPEC, "shapes-pair"
    _log("no trained shapes weights in vllm_sgl/tasks/weights: the random tiny pair (arbitrary answers)")
    return TinyPairSpec(), "tiny-qwen2_5_vl"


def resolve_pair(pair_dir: str | None) -> tuple[Path, Path]:
    """An existing guide/target pair in pair_dir, else the default pair (default_spec) written there."""
    from vllm_sgl.tiny import default_pair_dir, ensure_tiny_pair

    if pair_dir is not None:
        d = Path(pair_dir)
        guide, target = d / "guide", d / "target"
        # A pair that is already there is used as it is (whatever spec or family built it).
        if (guide / "config.json").exists() and (target / "config.json").exists():
            return guide, target
        _log(f"no pair in {d}: writing the default pair there")
        return ensure_tiny_pair(d, default_spec()[0])
    spec, name = default_spec()
    return ensure_tiny_pair(default_pair_dir(name), spec)


def demo_examples(args):
    """Shapes test examples, one kind after another (the questions have exact answers)."""
    from vllm_sgl.tasks import shapes

    return [shapes.make_example(shapes.example_seed("test", args.seed + i), shapes.KINDS[i % len(shapes.KINDS)])
            for i in range(args.images)]


def _mark(reply: str, answer: str) -> str:
    from vllm_sgl.tasks.shapes import is_correct

    return "right" if is_correct(reply, answer) else "wrong"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    guide_dir, target_dir = resolve_pair(args.pair_dir)
    _log(f"pair: guide {guide_dir}, target {target_dir}")
    if (args.keep_ratio, args.importance) == (DEMO_KEEP_RATIO, DEMO_IMPORTANCE):
        _log(f"keep {DEMO_KEEP_RATIO:g} with the keep rule {DEMO_IMPORTANCE}: on the shapes pair the quality benchmark "
             f"measured this rule keeping >= 90% of the target's accuracy down to this ratio (benchmarks/README.md)")
    if not args.reference:
        return run_engine(args, guide_dir, target_dir, t0)

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from vllm_sgl.pair import PairError
    from vllm_sgl.reference import SGLReference, SGLSettings
    from vllm_sgl.visualize import save_keep_sets

    settings = SGLSettings(
        keep_ratio=args.keep_ratio,
        importance=args.importance,
        consistency_ratio=args.consistency_ratio,
        max_new_tokens=args.max_new_tokens,
        exit_threshold=args.exit_threshold,
    ).validate()
    _log("loading guide and target (reference, fp32 on CPU)")
    try:
        ref = SGLReference(guide_dir, target_dir)
    except PairError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    tok = ref.processor.tokenizer
    merge = int(ref.processor.image_processor.merge_size)

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, grids, keeps, titles, records = [], [], [], [], []
    for i, ex in enumerate(demo_examples(args)):
        seed, image, question = ex.seed, ex.image, ex.question
        _log(f"image {i + 1}/{args.images}: {image.width}x{image.height} px, {question!r}")
        t = time.perf_counter()
        grid = ref.prepare([image], question).image_grid_thw[0].tolist()
        r = ref.run([image], question, settings)
        dt = time.perf_counter() - t
        n, keep = r.num_visual_tokens[0], r.keep_indices[0]
        print(f"\n== image {i} ({image.width}x{image.height} px, grid t,h,w = {tuple(grid)}): {question!r}")
        print(f"  visual tokens kept: {len(keep)}/{n} (keep ratio {settings.keep_ratio}, keep rule {settings.importance}); "
              f"target prompt {r.target_prompt_len}/{r.prompt_len} tokens")
        print(f"  right answer:    {ex.answer!r}")
        print(f"  guide answer:    {decode(r.guide_answer_ids)!r} (finished={r.guide_finished})")
        print(f"  SEE: confidence {r.confidence:.4f}  consistency {r.consistency:.4g}  "
              f"exit score {r.exit_score:.4f} ({settings.fuse}) vs threshold {settings.exit_threshold}: "
              f"{'EXIT (guide answers)' if r.exit else 'no exit (target answers)'}")
        pruned_text = tok.decode(r.target_pruned_answer_ids, skip_special_tokens=True)
        full_text = tok.decode(r.target_full_answer_ids, skip_special_tokens=True)
        print(f"  target (pruned): {decode(r.target_pruned_answer_ids)!r} ({_mark(pruned_text, ex.answer)})")
        print(f"  target (full):   {decode(r.target_full_answer_ids)!r} ({_mark(full_text, ex.answer)})"
              f"{'  [same as pruned]' if r.target_pruned_answer_ids == r.target_full_answer_ids else ''}")
        print(f"  ({dt:.2f} s)", flush=True)
        images.append(image)
        grids.append(grid)
        keeps.append(keep)
        titles.append(f"#{i} {'exit' if r.exit else 'target'}")
        records.append({
            "image": i,
            "seed": seed,
            "image_size": [image.width, image.height],
            "image_grid_thw": grid,
            "question": question,
            "answer": ex.answer,
            "target_pruned_right": _mark(pruned_text, ex.answer) == "right",
            "target_full_right": _mark(full_text, ex.answer) == "right",
            "guide_answer": decode(r.guide_answer_ids),
            "target_pruned_answer": decode(r.target_pruned_answer_ids),
            "target_full_answer": decode(r.target_full_answer_ids),
            "seconds": dt,
            **r.to_json(),
        })

    picture = out / "keep_sets.png"
    save_keep_sets(images, grids, keeps, picture, titles=titles, merge_size=merge)
    results = out / "results.json"
    results.write_text(json.dumps({
        "guide": str(guide_dir),
        "target": str(target_dir),
        "settings": settings.__dict__,
        "results": records,
    }, indent=2) + "\n")
    kept = sum(map(len, keeps))
    total = sum(r["num_visual_tokens"][0] for r in records)
    exits = sum(r["exit"] for r in records)
    print(f"\n{args.images} images: target saw {kept}/{total} visual tokens; guide exited on {exits}")
    print(f"wrote {picture} and {results}")
    _log(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def _blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def run_engine(args, guide_dir: Path, target_dir: Path, t0: float) -> int:
    """Vanilla vLLM and SGL on the same batch, one engine after the other."""
    import os
    import tempfile

    from transformers import AutoProcessor

    from vllm import LLM, SamplingParams
    from vllm_sgl.engine.trace import read_trace, user_request_id
    from vllm_sgl.reference import build_prompt_text
    from vllm_sgl.visualize import save_keep_sets

    processor = AutoProcessor.from_pretrained(target_dir)
    tok = processor.tokenizer
    merge = int(processor.image_processor.merge_size)
    examples = demo_examples(args)
    cases = [(e.image, e.question) for e in examples]
    prompts = [
        {"prompt": build_prompt_text(processor, 1, q), "multi_modal_data": {"image": img}} for img, q in cases
    ]
    # One text-only request: it bypasses the guide.
    prompts.append({"prompt": build_prompt_text(processor, 0, "say hello")})
    params = SamplingParams(temperature=0, max_tokens=args.max_new_tokens)
    common = dict(dtype="float32", max_model_len=4096, kv_cache_memory_bytes=512 * 2**20, seed=0)
    trace = Path(tempfile.mkdtemp(prefix="sgl-demo-")) / "trace.jsonl"

    runs = {}
    for name, extra in (
        ("vanilla", {}),
        ("sgl", {"model_impl": "sgl", "additional_config": {"sgl": {
            "guide_model": str(guide_dir), "keep_ratio": args.keep_ratio, "importance": args.importance,
            "guide_max_tokens": args.max_new_tokens, "trace_path": str(trace),
            "draft_tokens": args.draft_tokens}}}),
    ):
        _log(f"starting the {name} engine (vLLM start-up takes 20-60 s here)")
        llm = LLM(model=str(target_dir), **common, **extra)
        block_size = llm.llm_engine.vllm_config.cache_config.block_size
        _log(f"{name}: generating {len(prompts)} requests")
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        runs[name] = {"seconds": time.perf_counter() - t, "outputs": outs, "block_size": block_size}
        llm.llm_engine.engine_core.shutdown()
        del llm

    lines = read_trace(trace)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records, images, grids, keeps, titles = [], [], [], [], []
    tot = {"vanilla_prompt": 0, "sgl_prompt": 0, "vanilla_blocks": 0, "sgl_blocks": 0}
    bs = runs["sgl"]["block_size"]
    print(f"\n{'req':>3} {'kind':>6} {'kept/N':>9} {'pruned':>6} {'prompt vanilla->sgl':>20} "
          f"{'KV blocks':>10}  question: right answer | vanilla | sgl")
    right = {"vanilla": 0, "sgl": 0}
    for i, (v, g) in enumerate(zip(runs["vanilla"]["outputs"], runs["sgl"]["outputs"])):
        rec = lines.get(user_request_id(g.request_id), {})
        n = sum(rec.get("num_visual_tokens", []))
        k = sum(len(x) for x in rec.get("keep_indices", []))
        pv, ps = len(v.prompt_token_ids), len(g.prompt_token_ids)
        bv, bsgl = _blocks(pv, bs), _blocks(ps, bs)
        for key, val in (("vanilla_prompt", pv), ("sgl_prompt", ps), ("vanilla_blocks", bv), ("sgl_blocks", bsgl)):
            tot[key] += val
        va, sa = (tok.decode(o.outputs[0].token_ids, skip_special_tokens=True) for o in (v, g))
        ex = examples[i] if i < len(examples) else None
        kind = ex.kind if ex else "text"
        marks = ""
        if ex:
            mv, ms = _mark(va, ex.answer), _mark(sa, ex.answer)
            right["vanilla"] += mv == "right"
            right["sgl"] += ms == "right"
            marks = f"{ex.question} {ex.answer!r} | {va!r} ({mv}) | {sa!r} ({ms})"
        else:
            marks = f"say hello | {va!r} | {sa!r}"
        print(f"{i:>3} {kind:>6} {f'{k}/{n}':>9} {n - k:>6} {f'{pv} -> {ps}':>20} {f'{bv} -> {bsgl}':>10}  {marks}")
        if i < len(cases) and rec.get("keep_indices"):
            grid = processor.image_processor(images=[cases[i][0]], return_tensors="pt")["image_grid_thw"][0].tolist()
            images.append(cases[i][0])
            grids.append(grid)
            keeps.append(rec["keep_indices"][0])
            titles.append(f"#{i} {ex.question} {args.importance}: {sa} ({_mark(sa, ex.answer)})")
        records.append({"request": i, "question": cases[i][1] if i < len(cases) else "say hello",
                        "answer": ex.answer if ex else None, "kind": kind,
                        "num_visual_tokens": n, "kept": k, "prompt_tokens_vanilla": pv, "prompt_tokens_sgl": ps,
                        "kv_blocks_vanilla": bv, "kv_blocks_sgl": bsgl, "answer_vanilla": va, "answer_sgl": sa,
                        "right_vanilla": bool(ex) and _mark(va, ex.answer) == "right",
                        "right_sgl": bool(ex) and _mark(sa, ex.answer) == "right",
                        "guide_answer": tok.decode(rec.get("guide_answer_ids", []), skip_special_tokens=True),
                        "target_steps_sgl": rec.get("target_steps"), "draft_proposed": rec.get("draft_proposed", 0),
                        "draft_accepted": rec.get("draft_accepted", 0), "importance": rec.get("importance")})
    print(f"\nright answers: vanilla {right['vanilla']}/{len(examples)}, SGL (keep {args.keep_ratio:g}, keep rule {args.importance}, the target "
          f"saw {tot['sgl_prompt']}/{tot['vanilla_prompt']} prompt tokens) {right['sgl']}/{len(examples)}")
    tv, ts = runs["vanilla"]["seconds"], runs["sgl"]["seconds"]
    print(f"\ntotal prompt tokens {tot['vanilla_prompt']} -> {tot['sgl_prompt']} "
          f"({tot['sgl_prompt'] / tot['vanilla_prompt']:.2f}x); KV blocks (block size {bs}) "
          f"{tot['vanilla_blocks']} -> {tot['sgl_blocks']}; batch wall time {tv:.2f} s -> {ts:.2f} s "
          f"(SGL includes the guide; tiny models, so the guide's fixed cost dominates here)")
    proposed, accepted = sum(r["draft_proposed"] for r in records), sum(r["draft_accepted"] for r in records)
    print(f"drafting with the guide's answer (draft_tokens {args.draft_tokens}): {accepted} of {proposed} proposed "
          f"tokens accepted, {accepted} target decode steps saved "
          f"({sum(r['target_steps_sgl'] or 0 for r in records)} target steps in all)")
    picture = out / "keep_sets.png"
    if images:
        save_keep_sets(images, grids, keeps, picture, titles=titles, merge_size=merge)
    (out / "results.json").write_text(json.dumps({
        "guide": str(guide_dir), "target": str(target_dir), "keep_ratio": args.keep_ratio,
        "importance": args.importance,
        "draft_tokens": args.draft_tokens, "wall_seconds": {"vanilla": tv, "sgl": ts}, "totals": tot,
        "requests": records}, indent=2) + "\n")
    print(f"wrote {picture} and {out / 'results.json'}")
    os.remove(trace)
    _log(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
