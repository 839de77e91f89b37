"""The shapes task generator follows ../shared/QUALITY_TASK.md (no engine: a few seconds)."""

import re
from collections import Counter

import numpy as np
import pytest

from vllm_sgl.tasks import shapes

N = 150


@pytest.fixture(scope="module")
def examples():
    return shapes.split_examples("test", N)


def test_scene_rules(examples):
    for e in examples:
        assert e.image.size == (448, 448) and e.image.mode == "RGB"
        assert 2 <= len(e.objects) <= 6
        cells = [(o.row, o.col) for o in e.objects]
        assert len(set(cells)) == len(cells), "one object per cell"
        assert cells == sorted(cells), "objects are listed in reading order"
        assert 100 <= e.background <= 150
        px = np.asarray(e.image, dtype=np.float32)
        for o, (cx, cy, size) in zip(e.objects, e.geometry):
            assert 34 <= size <= 46
            # centred in its cell with a jitter of at most 4 px, so it never leaves the cell
            assert abs(cx - (o.col * 56 + 28)) <= 4 and abs(cy - (o.row * 56 + 28)) <= 4
            assert o.col * 56 <= cx - size // 2 and cx + size // 2 < (o.col + 1) * 56
            # its colour at a point every shape covers (the triangle's lower middle), within the noise
            y = cy + size // 6 if o.shape == "triangle" else cy
            patch = px[y - 1:y + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)
            assert np.abs(patch - np.array(shapes.COLORS[o.color])).max() < 15, (e.seed, o)
        # background: one gray level plus noise of sigma 6 (a corner cell is empty or the object is
        # away from its corner pixel)
        corner = px[:6, :6].reshape(-1, 3) if (0, 0) not in cells else px[-6:, -6:].reshape(-1, 3)
        if (7, 7) not in cells or (0, 0) not in cells:
            assert abs(corner.mean() - e.background) < 6


def test_questions_and_unique_answers(examples):
    pattern = {
        "color": r"What color is the (\w+)\?",
        "shape": r"What shape is the (\w+) object\?",
        "exists": r"Is there a (\w+) (\w+)\?",
        "where": r"Where is the (\w+) (\w+)\?",
        "list": r"List the objects\.",
    }
    for e in examples:
        m = re.fullmatch(pattern[e.kind], e.question)
        assert m, e.question
        objs = e.objects
        if e.kind == "color":
            match = [o for o in objs if o.shape == m[1]]
            assert len(match) == 1 and e.answer == match[0].color
        elif e.kind == "shape":
            match = [o for o in objs if o.color == m[1]]
            assert len(match) == 1 and e.answer == match[0].shape
        elif e.kind == "exists":
            assert e.answer == ("yes" if any(o.name == f"{m[1]} {m[2]}" for o in objs) else "no")
        elif e.kind == "where":
            match = [o for o in objs if o.name == f"{m[1]} {m[2]}"]
            assert len(match) == 1
            o = match[0]
            assert e.answer == f"{'top' if o.row < 4 else 'bottom'} {'left' if o.col < 4 else 'right'}"
        else:
            assert e.answer == ", ".join(o.name for o in objs)
        assert e.answer == e.answer.lower() and not e.answer.endswith(".")


def test_kinds_uniform_and_exists_balanced(examples):
    kinds = Counter(e.kind for e in examples)
    assert set(kinds) == set(shapes.KINDS)
    assert all(N / 5 * 0.6 < c < N / 5 * 1.4 for c in kinds.values()), kinds
    yes = [e.answer == "yes" for e in examples if e.kind == "exists"]
    assert 0.3 < sum(yes) / len(yes) < 0.7


def test_seeds_and_splits():
    a, b = shapes.make_example(shapes.example_seed("validation", 3)), shapes.make_example(shapes.example_seed("validation", 3))
    assert (a.question, a.answer, a.objects) == (b.question, b.answer, b.objects)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    seeds = {s: {shapes.example_seed(s, i) for i in (0, 1, shapes.SPLIT_SIZE - 1)} for s in shapes.SPLITS}
    assert not (seeds["train"] & seeds["validation"] or seeds["train"] & seeds["test"]
                or seeds["validation"] & seeds["test"])
    with pytest.raises(ValueError, match="accepted: train, validation, test"):
        shapes.example_seed("dev", 0)


def test_scoring():
    assert shapes.is_correct(" Red circle, blue square. ", "red circle, blue square")
    assert shapes.is_correct("yes.", "yes")
    assert not shapes.is_correct("yes yes", "yes")


def test_training_grids():
    """Smaller grids (training curricula only): the same cells and objects on 2 x 2 or 4 x 4 cells,
    quadrants by that grid; the task's own examples do not change."""
    for grid in (2, 4):
        for i in range(40):
            e = shapes.make_example(shapes.example_seed("train", i), grid=grid)
            assert e.image.size == (grid * 56, grid * 56)
            assert 2 <= len(e.objects) <= min(6, grid * grid)
            assert all(0 <= o.row < grid and 0 <= o.col < grid for o in e.objects)
            for o in e.objects:
                assert o.quadrant == f"{'top' if o.row < grid // 2 else 'bottom'} {'left' if o.col < grid // 2 else 'right'}"
            if e.kind == "where":
                assert e.answer in {o.quadrant for o in e.objects}
    e, e8 = shapes.make_example(shapes.example_seed("test", 3)), shapes.make_example(shapes.example_seed("test", 3), grid=8)
    assert (e.question, e.answer, e.objects) == (e8.question, e8.answer, e8.objects)
    assert np.array_equal(np.asarray(e.image), np.asarray(e8.image))
