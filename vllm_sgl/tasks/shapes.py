"""The shapes task (`../shared/QUALITY_TASK.md`): coloured shapes on an invisible 8 x 8 grid, and
questions whose answers depend on a few of the image's 256 visual tokens.

One example is drawn from one integer seed, and the splits draw from disjoint seed ranges, so
train, validation and test never share a scene. The engine never imports this module: it is a tool
around the method (training, the quality benchmark, the demo), like the data a user evaluates on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 448
GRID = 8
CELL = IMAGE_SIZE // GRID  # 56 px: 2 x 2 merged visual tokens of Qwen2.5-VL
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 210, 40),
    "white": (245, 245, 245),
}
KINDS = ("color", "shape", "exists", "where", "list")
# Seed ranges per split: an example's seed is SPLITS[split] + index, index < SPLIT_SIZE.
SPLIT_SIZE = 10**8
SPLITS = {"train": 0, "validation": SPLIT_SIZE, "test": 2 * SPLIT_SIZE}


@dataclass(frozen=True)
class Obj:
    row: int
    col: int
    color: str
    shape: str
    grid: int = GRID  # cells per image side: the task's 8; smaller only in training curricula

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def quadrant(self) -> str:
        half = self.grid // 2
        return f"{'top' if self.row < half else 'bottom'} {'left' if self.col < half else 'right'}"


@dataclass(frozen=True)
class Example:
    seed: int
    kind: str
    question: str
    answer: str
    objects: tuple[Obj, ...]  # in reading order of their cells
    background: int
    # per object: (cx, cy, size) in pixels, the drawn geometry (tests check it against the page)
    geometry: tuple[tuple[int, int, int], ...]
    image: Image.Image

    def messages(self) -> list[dict]:
        """The prompt as one user turn: the image, then the question (the family's chat template)."""
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question}]}]


def normalize(reply: str) -> str:
    """A reply as the page compares it: stripped, one final period dropped, lowercase."""
    s = reply.strip()
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s.lower()


def is_correct(reply: str, answer: str) -> bool:
    return normalize(reply) == normalize(answer)


def example_seed(split: str, index: int) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"index {index} outside [0, {SPLIT_SIZE})")
    return SPLITS[split] + index


def _scene(rng: random.Random, max_objects: int = 6, grid: int = GRID) -> list[Obj]:
    max_objects = min(max_objects, grid * grid)
    n = rng.randint(min(2, max_objects), max_objects)
    cells = rng.sample(range(grid * grid), n)
    objs = [Obj(c // grid, c % grid, rng.choice(list(COLORS)), rng.choice(SHAPES), grid) for c in cells]
    return sorted(objs, key=lambda o: (o.row, o.col))


def _question(kind: str, objs: list[Obj], rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) of this kind for the scene, or None when the scene cannot ask it."""
    shapes = [o.shape for o in objs]
    colors = [o.color for o in objs]
    names = [o.name for o in objs]
    if kind == "color":
        unique = [s for s in SHAPES if shapes.count(s) == 1]
        if not unique:
            return None
        s = rng.choice(unique)
        return f"What color is the {s}?", objs[shapes.index(s)].color
    if kind == "shape":
        unique = [c for c in COLORS if colors.count(c) == 1]
        if not unique:
            return None
        c = rng.choice(unique)
        return f"What shape is the {c} object?", objs[colors.index(c)].shape
    if kind == "exists":
        want_yes = rng.random() < 0.5
        pool = sorted(set(names)) if want_yes else [
            f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in names]
        name = rng.choice(pool)
        return f"Is there a {name}?", "yes" if want_yes else "no"
    if kind == "where":
        unique = [n for n in dict.fromkeys(names) if names.count(n) == 1]
        if not unique:
            return None
        name = rng.choice(unique)
        return f"Where is the {name}?", objs[names.index(name)].quadrant
    if kind == "list":
        return "List the objects.", ", ".join(names)
    raise ValueError(f"unknown kind {kind!r}; accepted: {', '.join(KINDS)}")


def _draw(objs: list[Obj], rng: random.Random, np_rng: np.random.Generator, grid: int = GRID):
    side = grid * CELL
    background = rng.randint(100, 150)
    img = Image.new("RGB", (side, side), (background,) * 3)
    draw = ImageDraw.Draw(img)
    geometry = []
    for o in objs:
        size = rng.randint(34, 46)
        cx = o.col * CELL + CELL // 2 + rng.randint(-4, 4)
        cy = o.row * CELL + CELL // 2 + rng.randint(-4, 4)
        geometry.append((cx, cy, size))
        fill = COLORS[o.color]
        x0, y0 = cx - size / 2, cy - size / 2
        x1, y1 = x0 + size - 1, y0 + size - 1
        if o.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif o.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif o.shape == "triangle":  # point up: base and height both `size`
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # cross: a plus sign, arms spanning `size`, bars a third of it wide
            bar = size / 3
            draw.rectangle([x0, cy - bar / 2, x1, cy + bar / 2 - 1], fill=fill)
            draw.rectangle([cx - bar / 2, y0, cx + bar / 2 - 1, y1], fill=fill)
    noise = np_rng.normal(0.0, 6.0, (side, side, 3))
    pixels = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels), background, tuple(geometry)


def make_example(seed: int, kind: str | None = None, max_objects: int = 6, grid: int = GRID) -> Example:
    """The example of one seed. The kind is drawn uniformly unless given; the scene is re-drawn
    until it can ask a question of that kind. `max_objects` below 6 and `grid` below 8 are for
    training curricula only (the task's scenes have 2 to 6 objects on 8 x 8 cells; 1 gives
    single-object scenes; a grid of 4 gives 224 px images of 64 visual tokens, the same cells and
    objects)."""
    rng = random.Random(seed)
    kind = kind or rng.choice(KINDS)
    while True:
        objs = _scene(rng, max_objects, grid)
        qa = _question(kind, objs, rng)
        if qa is not None:
            break
    image, background, geometry = _draw(objs, rng, np.random.default_rng(seed), grid)
    return Example(seed, kind, qa[0], qa[1], tuple(objs), background, geometry, image)


def split_examples(split: str, count: int, start: int = 0, kind: str | None = None) -> list[Example]:
    return [make_example(example_seed(split, start + i), kind) for i in range(count)]


def extra_questions(example: Example, count: int, seed: int) -> list[tuple[str, str]]:
    """More (question, answer) pairs about the same scene, for training several turns on one image.
    Kinds the scene cannot ask are skipped."""
    rng = random.Random(seed)
    out = []
    for _ in range(count * 4):
        if len(out) == count:
            break
        qa = _question(rng.choice(KINDS), list(example.objects), rng)
        if qa is not None and qa[0] != example.question and qa[0] not in (q for q, _ in out):
            out.append(qa)
    return out


def vocabulary() -> list[str]:
    """Every word the task's prompts and answers use (the shapes pair's tokenizer is trained on them)."""
    words = {"What", "color", "is", "the", "shape", "object", "Is", "there", "a", "Where", "List", "objects",
             "yes", "no", "top", "bottom", "left", "right", "You", "are", "helpful", "assistant"}
    return sorted(words | set(SHAPES) | set(COLORS))


def export(split: str, count: int, out_dir, start: int = 0) -> "Path":
    """Write examples as PNG files and a JSONL of {"images", "question", "answer", "kind"} (the
    format `vllm-sgl calibrate --data` reads; paths relative to the file). Returns the JSONL path."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, e in enumerate(split_examples(split, count, start)):
        name = f"images/{split}-{start + i:06d}.png"
        e.image.save(out / name)
        lines.append(json.dumps({"images": [name], "question": e.question, "answer": e.answer, "kind": e.kind}))
    path = out / f"{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="write shapes examples as PNGs + JSONL (calibrate's data format)")
    p.add_argument("out_dir")
    p.add_argument("--split", choices=list(SPLITS), default="validation")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--start", type=int, default=0)
    a = p.parse_args()
    print(export(a.split, a.count, a.out_dir, a.start))
