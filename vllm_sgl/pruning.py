"""The SGL method's small pure pieces, one home each (../shared/SGL_METHOD.md): where the visual
tokens of a prompt are, their M-RoPE positions, how many an image keeps, which ones, and the
early-exit scores. Plain torch/numpy functions of their arguments: the reference, the guide
runtime and the engine all call these, and none of them imports vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

import numpy as np
import torch

from vllm_sgl.kernels import IMPORTANCES, keep_set_ref  # noqa: F401 - IMPORTANCES: the keep rules' names
from vllm_sgl.kernels import keep_count  # noqa: F401 - the one k formula: k = max(1, floor(r * N))

# -- where the visual tokens are -------------------------------------------------------------


def visual_spans(ids: Sequence[int] | torch.Tensor, token_ids: int | Sequence[int]) -> list[tuple[int, int]]:
    """(start, length) of every run of placeholder tokens (the image token id, or any of several
    media token ids) in a prompt, in prompt order."""
    ids = torch.as_tensor(ids)
    is_img = torch.isin(ids, torch.as_tensor(token_ids)).to(torch.int8)
    edges = torch.diff(torch.cat([is_img.new_zeros(1), is_img, is_img.new_zeros(1)]))
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = torch.nonzero(edges == -1).flatten().tolist()
    return [(s, e - s) for s, e in zip(starts, ends)]


def visual_token_count(grid_thw: Sequence[int], merge: int) -> int:
    """N of one image: its patches (t * h * w) over merge^2."""
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // (merge * merge)


# -- positions (M-RoPE) ----------------------------------------------------------------------


def media_positions(grid_thw: Sequence[int], merge: int, t_factor: float = 1.0) -> torch.Tensor:
    """(N, 4): each visual token's (t, h, w) M-RoPE offset from the media's first position, and in
    the 4th channel the offset of the text that follows (max over the grid + 1), the layout of
    vLLM's multimodal-pruning path. Matches transformers' get_rope_index for images (t_factor 1)."""
    t, h, w = int(grid_thw[0]), int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    grid = np.indices((t, h, w)).reshape(3, -1)
    if t_factor != 1.0:
        grid[0] = (grid[0] * t_factor).astype(np.int64)
    pos = torch.from_numpy(np.ascontiguousarray(grid.T)).long()
    span = int(pos.max()) + 1 if pos.numel() else 0
    return torch.cat([pos, torch.full((pos.shape[0], 1), span, dtype=torch.long)], dim=1)


def mrope_positions(num_tokens: int, spans: Sequence[tuple[int, int]], grids: Sequence[Sequence[int]],
                    merge: int, t_factors: Sequence[float] | None = None) -> torch.Tensor:
    """(3, L) M-RoPE positions of an unpruned prompt: text tokens count up one by one; an image's
    or video's tokens take (t, h, w) offsets from the position after the text before it (a video's
    t scaled by its t_factor), and the text after it continues at that position + 1 + its largest
    offset (vLLM's rule)."""
    chunks, cursor, next_pos = [], 0, 0
    for i, ((start, n), grid) in enumerate(zip(spans, grids)):
        text = start - cursor
        chunks.append(torch.arange(text).expand(3, -1) + next_pos)
        next_pos += text
        pos = media_positions(grid, merge, 1.0 if t_factors is None else t_factors[i])
        if pos.shape[0] != n:
            raise ValueError(f"an image span of {n} tokens but a grid {list(grid)} of {pos.shape[0]}")
        chunks.append(pos[:, :3].T + next_pos)
        next_pos += int(pos[0, 3])
        cursor = start + n
    chunks.append(torch.arange(num_tokens - cursor).expand(3, -1) + next_pos)
    return torch.cat(chunks, dim=1)


# -- which tokens are kept -------------------------------------------------------------------


def top_k_keep(importance: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k most important tokens, ties to the lower index, ascending."""
    # A stable sort of the negated scores puts equal scores in index order.
    order = torch.sort(-importance.to(torch.float64), stable=True).indices[:k]
    return torch.sort(order).values


def keep_set(importance: torch.Tensor, ratio: float, rule: str = "sgl",
             layout: tuple[int, int] | None = None) -> torch.Tensor:
    """The keep set of one image at a keep ratio, k = keep_count(N, ratio), by the importance rule:
    "sgl" (the paper's) top_k_keep; "sgl-sdpp" the spatial DPP of docs/importance.md, which needs the
    image's layout (grid_layout / tile_layout)."""
    k = keep_count(importance.numel(), ratio)
    if rule == "sgl":
        return top_k_keep(importance, k)
    # the kernels' definition, which checks the rule and the layout
    keep, _ = keep_set_ref(importance, [0, importance.numel()], counts=[k], rules=[rule],
                           layouts=None if layout is None else [layout])
    return keep


def grid_layout(grid: Sequence[int], merge: int) -> tuple[int, int]:
    """(width, plane) of an image's merged tokens on a (t, h, w) patch grid: t frames of h / merge
    rows of w / merge tokens, in reading order (Qwen families)."""
    _, h, w = (int(x) for x in grid)
    return w // merge, (h // merge) * (w // merge)


def tile_layout(tile_tokens: int) -> tuple[int, int]:
    """(width, plane) of a tiled image's tokens: square tiles of tile_tokens each (InternVL: 16 x 16)."""
    side = math.isqrt(tile_tokens)
    if side * side != tile_tokens:
        raise ValueError(f"a tile of {tile_tokens} tokens is not square")
    return side, tile_tokens


# -- early exit (SEE) ------------------------------------------------------------------------


def confidence(top1: Sequence[float]) -> float:
    """The guide's confidence: geometric mean over its answer steps of the top-1 probability."""
    return math.exp(sum(math.log(max(p, 1e-45)) for p in top1) / len(top1))


FUSES: dict[str, Callable[[float, float], float]] = {
    "mean": lambda conf, cons: 0.5 * (conf + cons),
    "product": lambda conf, cons: conf * cons,
    "confidence": lambda conf, cons: conf,
    "consistency": lambda conf, cons: cons,
}
