"""The engine's own bookkeeping that needs no engine (milliseconds)."""

import dataclasses
from types import SimpleNamespace

import torch

from vllm_sgl.engine.protocol import KEEP_KWARG, ResultsByImages, embed_runs, first_tokens, keep_counts, kept_per_run, kept_tokens


def _images(*ids):
    return [SimpleNamespace(identifier=i) for i in ids]


def test_results_by_images_identical_requests_only():
    cache = ResultsByImages(entries=3)
    a, b = object(), object()
    cache.put(_images("x1", "x2"), a)
    cache.put(_images("y1"), b)
    assert cache.get(_images("x1", "x2")) is a and cache.get(_images("y1")) is b
    # images of two different requests are not one request; nothing is not a request
    assert cache.get(_images("x1", "y1")) is None and cache.get(_images("z")) is None and cache.get([]) is None
    # the least recently used image goes first: x1, x2 were read after y1, so y1 is evicted
    cache.get(_images("x1", "x2"))
    cache.put(_images("w1"), object())
    assert len(cache) == 3 and cache.get(_images("y1")) is None and cache.get(_images("x1", "x2")) is a


def _field(value):
    return SimpleNamespace(data=torch.as_tensor(value))


def test_embed_runs_and_keep_counts_per_frame():
    """A placeholder's runs of embeddings: one for an image or a Qwen2.5-VL video, one per frame
    where text sits between frames; the kept counts follow the family's video layout."""
    from transformers import AutoConfig

    from vllm_sgl.engine.guide_runner import _per_item

    mask = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)  # text, frame, text, frame, text
    two_frames = SimpleNamespace(mm_position=SimpleNamespace(is_embed=mask, length=10))
    assert embed_runs(two_frames) == [(2, 2), (6, 3)] and kept_tokens(two_frames) == 5
    assert embed_runs(SimpleNamespace(mm_position=SimpleNamespace(is_embed=None, length=7))) == [(0, 7)]
    qwen3 = AutoConfig.for_model("qwen3_vl")
    qwen25 = AutoConfig.for_model("qwen2_5_vl")
    video = {"video_grid_thw": _field([3, 8, 12])}  # 3 temporal patches of 24 tokens: N = 72
    assert keep_counts(video, "video", qwen3, 0.1) == [2, 2, 2]  # per frame: floor(0.1 x 24)
    assert keep_counts(video, "video", qwen25, 0.1) == [7]  # per video: floor(0.1 x 72)
    assert keep_counts({"image_grid_thw": _field([1, 8, 12])}, "image", qwen3, 0.1) == [2]
    # a failed request's placeholder keep set: the first k of each frame, as many as its runs hold
    two_frames.data = {"video_grid_thw": _field([2, 8, 12])}
    assert first_tokens(two_frames, qwen3).tolist() == [0, 1, 24, 25, 26]
    assert [r.tolist() for r in kept_per_run(two_frames, 24)] == [[0, 1], [0, 1, 2]]  # no keep set yet
    two_frames.data[KEEP_KWARG] = SimpleNamespace(data=torch.tensor([5, 20, 24, 30, 47]))
    assert [r.tolist() for r in kept_per_run(two_frames, 24)] == [[5, 20], [0, 6, 23]]  # each frame's own
    internvl = AutoConfig.for_model("internvl")
    assert keep_counts({"video_num_patches": _field(4)}, "video", internvl, 0.25) == [64] * 4
    assert keep_counts({"image_num_patches": _field(3)}, "image", internvl, 0.25) == [192]
    # the guide's per-frame keep sets become one per video, each frame's offset by the frames before it
    @dataclasses.dataclass
    class Result:
        keep_indices: list
        importance: list
        num_visual_tokens: list

    spans = Result([torch.tensor([1]), torch.tensor([0, 3]), torch.tensor([2]), torch.tensor([5])], [], [4, 4, 4, 6])
    folded = _per_item(spans, [3, 1])  # a video of 3 frames, then an image
    assert [k.tolist() for k in folded.keep_indices] == [[1, 4, 7, 10], [5]] and folded.num_visual_tokens == [12, 6]
