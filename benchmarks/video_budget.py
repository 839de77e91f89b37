"""Per video or per frame: how a video's keep budget should be spent, measured on the trained shapes
pair (docs/VIDEO.md, "The budget").

A clip is F shapes scenes (each held for two frames, so each temporal patch of Qwen2.5-VL is one
scene), and the question is one scene's question (which scene is drawn at random). The guide runtime
ranks the clip's tokens; at each keep ratio the same importance gives two keep sets:
- per video: the top k = keep_count(N, r) over all the clip's N tokens (what SGL does);
- per frame: the top keep_count(N / F, r) of each scene's tokens (the same number, spread evenly).
Printed per ratio, over the clips: the share of kept tokens in the asked scene (per frame: 1 / F by
construction; also over the clips whose asked scene is not the last) and in the last scene (the one
next to the question in the prompt), the share of the asked object's tokens kept (recall) under each budget with a paired
sign test, and the share of the guide's importance each keeps. A picture of one clip's keep sets
goes to --out. The guide alone, no vLLM: about a minute on 2 CPU cores.

    .venv/bin/python benchmarks/video_budget.py --clips 60 --out benchmarks/figures/video-2026-12-06
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_sgl.guide import Guide, GuideRequest  # noqa: E402
from vllm_sgl.images import as_video  # noqa: E402
from vllm_sgl.pruning import keep_count, top_k_keep  # noqa: E402
from vllm_sgl.reference import prepare_input  # noqa: E402
from vllm_sgl.tasks.shapes import CELL, make_example  # noqa: E402

RATIOS = (0.25, 0.1, 0.05)
TOKEN_PX = CELL // 2  # a merged visual token covers 28 x 28 px (2 x 2 patches of 14 px)


def object_tokens(geometry, side_tokens: int) -> list[int]:
    """Indices (within a scene's tokens, reading order) of the tokens the object's box touches."""
    cx, cy, size = geometry
    x0, x1 = int((cx - size / 2) // TOKEN_PX), int((cx + size / 2 - 1) // TOKEN_PX)
    y0, y1 = int((cy - size / 2) // TOKEN_PX), int((cy + size / 2 - 1) // TOKEN_PX)
    return [r * side_tokens + c for r in range(max(0, y0), min(side_tokens, y1 + 1))
            for c in range(max(0, x0), min(side_tokens, x1 + 1))]


def asked_object(example) -> int | None:
    """The object the question is about (color / shape / where questions name one), else None."""
    q = example.question
    for i, o in enumerate(example.objects):
        if (f"the {o.shape}?" in q and example.kind == "color") or (f"the {o.color} object" in q) or \
                (f"the {o.name}?" in q and example.kind == "where"):
            return i
    return None


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=60)
    ap.add_argument("--scenes", type=int, default=4, help="scenes per clip (each two frames)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="folder for the keep-set picture")
    args = ap.parse_args()
    torch.set_num_threads(2)

    from transformers import AutoProcessor

    from vllm_sgl.tiny import SHAPES_SPEC, default_pair_dir, ensure_tiny_pair

    guide_dir, target_dir = ensure_tiny_pair(default_pair_dir("shapes-pair"), SHAPES_SPEC)
    processor = AutoProcessor.from_pretrained(target_dir)
    guide = Guide.load(guide_dir, "cpu", torch.float32, 8, importance_backend="torch")
    tokens_per_second = getattr(guide.config.vision_config, "tokens_per_second", None)
    rng = random.Random(args.seed)
    # per clip: (asked scene's share, recall per video, per frame, importance per video, per frame,
    # last scene's share, asked scene is the last)
    rows = {r: [] for r in RATIOS}
    picture = None
    start = time.perf_counter()
    for c in range(args.clips):
        while True:  # scenes of questions that name one object
            scenes = [make_example(10**9 + args.seed * 10**6 + c * 100 + j + rng.randrange(10**4),
                                   kind=rng.choice(("color", "shape", "where"))) for j in range(args.scenes)]
            asked = rng.randrange(args.scenes)
            obj = asked_object(scenes[asked])
            if obj is not None:
                break
        frames = np.stack([np.asarray(s.image) for s in scenes for _ in range(2)])
        clip = as_video(frames, fps=2.0)
        prep = prepare_input(processor, [], scenes[asked].question, [clip])
        (_, n), = prep.visual_spans
        per_scene = n // args.scenes
        side = int(math.isqrt(per_scene))
        req = GuideRequest("clip", prep.input_ids.tolist(), prep.pixel_values_videos, torch.tensor(prep.grids),
                           [n], t_factors=prep.t_factors(tokens_per_second))
        imp = guide.run([req])[0].importance[0]
        target = {asked * per_scene + i for i in object_tokens(scenes[asked].geometry[obj], side)}
        for r in RATIOS:
            video = top_k_keep(imp, keep_count(n, r))
            frame = torch.cat([j * per_scene + top_k_keep(imp[j * per_scene : (j + 1) * per_scene],
                                                          keep_count(per_scene, r)) for j in range(args.scenes)])
            in_asked = ((video // per_scene) == asked).float().mean().item()
            in_last = ((video // per_scene) == args.scenes - 1).float().mean().item()
            recall = [len(target & set(k.tolist())) / len(target) for k in (video, frame)]
            mass = [float(imp[k].sum() / imp.sum()) for k in (video, frame)]
            rows[r].append((in_asked, *recall, *mass, in_last, asked == args.scenes - 1))
            if picture is None and r == 0.1 and args.out is not None:
                picture = (scenes, asked, obj, video, frame, per_scene)
        if (c + 1) % 10 == 0:
            print(f"  {c + 1}/{args.clips} clips, {time.perf_counter() - start:.0f} s", flush=True)

    print(f"\n{args.clips} clips of {args.scenes} scenes (each 2 frames, {per_scene} tokens a scene); "
          f"the asked scene is 1 of {args.scenes}")
    print("| keep | per video: kept tokens in the asked scene (asked not last) | in the last scene | asked object "
          "kept: per video | per frame | video > frame / < / = (sign test p) | importance kept: per video | per frame |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in RATIOS:
        a = np.array(rows[r])
        wins, losses = int((a[:, 1] > a[:, 2]).sum()), int((a[:, 1] < a[:, 2]).sum())
        not_last = a[a[:, 6] == 0]
        print(f"| {r} | {a[:, 0].mean():.3f} ({not_last[:, 0].mean():.3f}) | {a[:, 5].mean():.3f} | {a[:, 1].mean():.3f} | "
              f"{a[:, 2].mean():.3f} | {wins} / {losses} / {len(a) - wins - losses} (p = {sign_test(wins, losses):.2g}) | "
              f"{a[:, 3].mean():.3f} | {a[:, 4].mean():.3f} |")
    if picture is not None:
        from vllm_sgl.visualize import draw_keep_set, tile

        scenes, asked, obj, video, frame, per_scene = picture
        pics = []
        for name, keep in (("per video", video), ("per frame", frame)):
            for j, s in enumerate(scenes):
                mine = [int(i) - j * per_scene for i in keep.tolist() if j * per_scene <= i < (j + 1) * per_scene]
                mark = " (asked)" if j == asked else ""
                pics.append(draw_keep_set(s.image, (1, 32, 32), 2, mine, f"{name}: scene {j + 1}{mark}"))
        args.out.mkdir(parents=True, exist_ok=True)
        tile(pics, columns=len(scenes)).save(args.out / "video_keep_sets.png")
        print(f"\nkeep sets of clip 1 at keep 0.1 (question: {scenes[asked].question!r} about scene {asked + 1}): "
              f"{args.out / 'video_keep_sets.png'}")


if __name__ == "__main__":
    main()
