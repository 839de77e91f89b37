"""SGL end to end on the tiny checkpoint pair: `python -m vllm_sgl.demo`.

Builds (or reuses) the default tiny guide/target pair, runs the SGL reference on a few synthetic
images with questions, prints per image what the guide kept, what it answered, the early-exit
scores and what the target answered with and without pruning, and saves a picture of the kept
visual tokens (OUT/keep_sets.png) and the results (OUT/results.json).

The models are tiny and random, so the answers are arbitrary words: the demo shows the mechanics
(token pruning, importance, SEE scores), not answer quality.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _ratio(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number in (0, 1], got {text!r}") from None
        if not 0.0 < value <= 1.0:
            raise argparse.ArgumentTypeError(f"{name} must be in (0, 1], got {value}")
        return value

    return parse


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
    p.add_argument("--images", type=_positive, default=4, help="number of synthetic images (default 4)")
    p.add_argument("--keep-ratio", type=_ratio("--keep-ratio"), default=0.25)
    p.add_argument("--consistency-ratio", type=_ratio("--consistency-ratio"), default=0.05)
    p.add_argument("--max-new-tokens", type=_positive, default=16)
    p.add_argument("--exit-threshold", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0, help="first synthetic image/question seed")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the tiny models gain nothing from more, and "
                        "on a busy machine spinning threads slow them down many times; 0: torch's default)")
    return p


def resolve_pair(pair_dir: str | None) -> tuple[Path, Path]:
    """An existing guide/target pair in pair_dir, else the default tiny pair built there."""
    from vllm_sgl.tiny import TinyPairSpec, default_pair_dir, ensure_tiny_pair

    if pair_dir is not None:
        d = Path(pair_dir)
        guide, target = d / "guide", d / "target"
        # A pair that is already there is used as it is (whatever spec or family built it).
        if (guide / "config.json").exists() and (target / "config.json").exists():
            return guide, target
        _log(f"no pair in {d}: building the default tiny pair there")
        return ensure_tiny_pair(d, TinyPairSpec())
    d = default_pair_dir()
    guide, target = ensure_tiny_pair(d, TinyPairSpec())
    return guide, target


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    guide_dir, target_dir = resolve_pair(args.pair_dir)
    _log(f"pair: guide {guide_dir}, target {target_dir}")

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from vllm_sgl.images import synthetic_image, synthetic_question
    from vllm_sgl.pair import PairError
    from vllm_sgl.reference import SGLReference, SGLSettings
    from vllm_sgl.visualize import save_keep_sets

    settings = SGLSettings(
        keep_ratio=args.keep_ratio,
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
    for i in range(args.images):
        seed = args.seed + i
        image, question = synthetic_image(seed), synthetic_question(seed)
        _log(f"image {i + 1}/{args.images}: {image.width}x{image.height} px, {question!r}")
        t = time.perf_counter()
        grid = ref.prepare([image], question).image_grid_thw[0].tolist()
        r = ref.run([image], question, settings)
        dt = time.perf_counter() - t
        n, keep = r.num_visual_tokens[0], r.keep_indices[0]
        print(f"\n== image {i} ({image.width}x{image.height} px, grid t,h,w = {tuple(grid)}): {question!r}")
        print(f"  visual tokens kept: {len(keep)}/{n} (keep ratio {settings.keep_ratio}); "
              f"target prompt {r.target_prompt_len}/{r.prompt_len} tokens")
        print(f"  guide answer:    {decode(r.guide_answer_ids)!r} (finished={r.guide_finished})")
        print(f"  SEE: confidence {r.confidence:.4f}  consistency {r.consistency:.4g}  "
              f"exit score {r.exit_score:.4f} ({settings.fuse}) vs threshold {settings.exit_threshold}: "
              f"{'EXIT (guide answers)' if r.exit else 'no exit (target answers)'}")
        print(f"  target (pruned): {decode(r.target_pruned_answer_ids)!r}")
        print(f"  target (full):   {decode(r.target_full_answer_ids)!r}"
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


if __name__ == "__main__":
    sys.exit(main())
