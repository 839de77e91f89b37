"""The windowed "sgl-sdpp" keep rule's definition (CPU, no triton): single-window images keep what
the global definition kept, the batched torch path equals the per-image definition, the budgets
split the top-k, the work is bounded, and the caller's scratch. The kernel against the definition:
the sdpp_* cases of kernel_cases.py (Triton's interpreter, test_importance_kernel.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's vllm_sgl, installed or not
import vllm_sgl.kernels as K  # noqa: E402
from vllm_sgl.kernels._args import sdpp_scratch_elems  # noqa: E402
from vllm_sgl.kernels.importance_ref import sdpp_keep_ref, sdpp_windows  # noqa: E402


def _global_sdpp_keep(v, k, width, plane, sigma=1.5, theta=0.85, eps=1e-6):
    """The rule before windows (frozen copy of sdpp_keep_ref at 9af2227): the greedy MAP over the
    whole image, O(k^2 N)."""
    v = v.float()
    n = v.numel()
    if k >= n:
        return torch.arange(n)
    lo, hi = v.min(), v.max()
    q = torch.exp((theta / (2 * (1 - theta))) * ((v - lo) / (hi - lo + 1e-6)))
    t = torch.arange(n)
    pl, yy, xx = t // plane, ((t % plane) // width).float(), (t % width).float()
    d2 = q * q
    c = torch.zeros(k, n, dtype=torch.float32)
    taken = torch.zeros(n, dtype=torch.bool)
    neg_inv = -1.0 / (2.0 * sigma * sigma)
    for i in range(k):
        gain = d2.masked_fill(taken, float("-inf"))
        j = int(torch.argmax(gain))
        if float(gain[j]) <= eps:
            j = int(torch.argmax(q.masked_fill(taken, float("-inf"))))
            e = torch.zeros(n, dtype=torch.float32)
        else:
            s = torch.exp(((yy - yy[j]) ** 2 + (xx - xx[j]) ** 2) * neg_inv)
            row = q[j] * torch.where(pl == pl[j], s, torch.zeros_like(s)) * q
            for r in range(i):
                row = row - c[r, j] * c[r]
            e = row / torch.sqrt(gain[j])
        c[i] = e
        d2 = d2 - e * e
        taken[j] = True
    return torch.nonzero(taken).flatten()


def _importance(n, seed, kind="rand"):
    g = torch.Generator().manual_seed(seed)
    if kind == "levels":  # few values: ties
        return torch.randint(0, 3, (n,), generator=g).float()
    return torch.rand(n, generator=g) * 5


# (width, rows): one window each; the trained shapes pair's 16 x 16 first
@pytest.mark.parametrize("width, rows", [(16, 16), (7, 9), (16, 3), (1, 16), (13, 16), (16, 1)])
def test_single_window_images_keep_what_the_global_rule_kept(width, rows):
    n = width * rows
    for seed, kind in ((0, "rand"), (1, "rand"), (2, "levels")):
        v = _importance(n, seed + 10 * width, kind)
        for k in sorted({1, 2, max(1, n // 10), n // 4 or 1, n // 2 or 1, n - 1 or 1, n}):
            want = _global_sdpp_keep(v, k, width, n).tolist()
            assert sdpp_keep_ref(v, k, width, n).tolist() == want, (width, rows, k, kind)
            got = K.keep_set_ref(v, [0, n], counts=[k], rules=["sgl-sdpp"], layouts=[(width, n)])[0]
            assert got.tolist() == want, (width, rows, k, kind)


def test_single_window_eps_fallback_as_the_global_rule():
    v = _importance(36, 3)
    for k in (10, 30):
        want = _global_sdpp_keep(v, k, 6, 36, eps=2.0).tolist()
        assert want != _global_sdpp_keep(v, k, 6, 36).tolist() or k == 10
        assert sdpp_keep_ref(v, k, 6, 36, eps=2.0).tolist() == want
        assert K.keep_set_ref(v, [0, 36], counts=[k], rules=["sgl-sdpp"], layouts=[(6, 36)], _sdpp_eps=2.0)[0].tolist() \
            == want


# (N, width, plane): Qwen-like grids (edge windows), InternVL-like tiles, video-like frames, a column
IMAGES = [(40 * 23, 40, 40 * 23), (3 * 256, 16, 256), (2 * 17 * 33, 17, 17 * 33), (5 * 20, 1, 20), (31 * 18, 31, 31 * 18)]


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.9])
def test_batch_equals_the_per_image_definition(ratio):
    """keep_set_ref (every window of every image at once) = sdpp_keep_ref per image, bit for bit,
    in a batch that mixes the two rules."""
    vals = [_importance(n, 20 + i, "levels" if i == 2 else "rand") for i, (n, _, _) in enumerate(IMAGES)]
    vals[1][:256] += 50  # the first tile is all in the top-k at 0.3 and 0.9: a window kept whole
    imp = torch.cat(vals)
    cu = [0, *np.cumsum([n for n, _, _ in IMAGES]).tolist()]
    rules = ["sgl-sdpp", "sgl-sdpp", "sgl-sdpp", "sgl", "sgl-sdpp"]
    idx, cu_keep = K.keep_set_ref(imp, cu, ratio, rules=rules, layouts=[(w, p) for _, w, p in IMAGES])
    for i, (n, w, p) in enumerate(IMAGES):
        k = K.keep_count(n, ratio)
        want = sdpp_keep_ref(vals[i], k, w, p) if rules[i] == "sgl-sdpp" else K.importance_ref.top_k_ref(vals[i], k)
        assert idx[cu_keep[i]:cu_keep[i + 1]].tolist() == want.tolist(), (i, ratio)


def test_budgets_split_the_top_k():
    n, width = 40 * 23, 40
    v = _importance(n, 5)
    for k in (1, 46, 460, 919, 920):
        wins, kw = sdpp_windows(v, [0, n], [k], [(width, n)])
        assert wins.shape == (6, 6) and kw.shape == (6,)
        assert wins[:, 4].tolist() == [16, 16, 16, 16, 16, 16][:3] + [7, 7, 7]  # rows 16 + 7
        assert wins[:, 5].tolist() == [16, 16, 8] * 2  # columns 16 + 16 + 8
        top = K.importance_ref.top_k_ref(v, k)
        y, x = top // width, top % width
        want = [int(((y // 16 == a) & (x // 16 == b)).sum()) for a in range(2) for b in range(3)]
        assert kw.tolist() == want and int(kw.sum()) == k


def test_work_is_bounded_at_16384_tokens_keep_099():
    """A 128 x 128 grid at keep 0.99: 64 windows of 256 tokens, each at most 256 greedy steps (the
    global rule would run 16220 steps over 16384 tokens); the torch path finishes it."""
    n, side = 16384, 128
    v = _importance(n, 7)
    k = K.keep_count(n, 0.99)
    wins, kw = sdpp_windows(v, [0, n], [k], [(side, n)])
    size = torch.as_tensor(wins[:, 4] * wins[:, 5])
    assert len(wins) == 64 and int(size.max()) == 256
    assert int(kw.max()) <= 256 and int(kw.sum()) == k
    steps = torch.where(kw < size, kw, 0)  # a window kept whole runs no greedy
    assert int(steps.max()) <= 255
    assert int((steps * steps * 256).sum()) <= n * 256 * 256  # the work bound: k_w^2 x 256 lanes per window
    idx, cu_keep = K.keep_set_ref(v, [0, n], 0.99, rules=["sgl-sdpp"], layouts=[(side, n)])
    assert cu_keep.tolist() == [0, k] and bool((idx[1:] > idx[:-1]).all()) and 0 <= int(idx[0])
    assert int(idx[-1]) < n


def test_scratch_is_used_and_checked():
    lens, counts = [920, 64, 768], [46, 64, 768]
    imp = torch.cat([_importance(n, 30 + i) for i, n in enumerate(lens)])
    cu = [0, *np.cumsum(lens).tolist()]
    rules, lay = ["sgl-sdpp"] * 3, [(40, 920), (8, 64), (16, 256)]
    need = sdpp_scratch_elems(lens, counts)
    assert need == 4 + 452 + 920 + 256 * 46  # only the image with k < N needs any
    assert sdpp_scratch_elems([64], [64]) == 0
    want = K.keep_set_ref(imp, cu, counts=counts, rules=rules, layouts=lay)[0]
    scratch = torch.full((need + 1,), float("nan"))[1:]
    got = K.keep_set(imp, cu, counts=counts, rules=rules, layouts=lay, scratch=scratch)[0]
    assert torch.equal(got, want) and not bool(scratch.isnan().all())
    for bad in (torch.zeros(need - 1), torch.zeros(need, dtype=torch.float64), torch.zeros(need, 2)):
        with pytest.raises(ValueError, match="sdpp_scratch_elems"):
            K.keep_set(imp, cu, counts=counts, rules=rules, layouts=lay, scratch=bad)
