"""Argument checking and host-side metadata shared by the PyTorch definition and the Triton kernel.

Both backends validate through here so a bad call fails the same way whichever backend runs.
The metadata (offsets, image descriptors) is small and is copied to the host once: the kernel
needs it to size its launch grids, and validation needs it anyway.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IntArg = Union[torch.Tensor, Sequence[int]]
RatioArg = Union[float, torch.Tensor, Sequence[float]]


def _host_ints(x: IntArg, name: str, ndim: int = 1) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got dtype {x.dtype}")
        arr = x.detach().to("cpu", torch.int64).numpy()
    else:
        try:
            arr = np.asarray(x, dtype=np.int64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be an integer tensor or a sequence of ints") from e
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(arr.shape)}")
    return arr


def _check_offsets(cu: np.ndarray, name: str, total: int, total_name: str) -> None:
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must have B+1 >= 1 entries")
    if cu[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(cu[0])}")
    if np.any(np.diff(cu) < 0):
        raise ValueError(f"{name} must be non-decreasing")
    if cu[-1] != total:
        raise ValueError(f"{name}[-1] must equal {total_name} = {total}, got {int(cu[-1])}")


@dataclass
class ImportanceMeta:
    """Validated sizes and host copies of the metadata of one visual_importance call."""

    num_layers: int
    num_rows: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    num_keys: int
    sm_scale: float
    cu_rows: np.ndarray  # (B+1,)
    cu_keys: np.ndarray  # (B+1,)
    row_pos: np.ndarray  # (R,)
    image_req: np.ndarray  # (I,)
    image_start: np.ndarray  # (I,)
    image_len: np.ndarray  # (I,)
    cu_image: np.ndarray  # (I+1,)
    # Global row range [lo, hi) that holds every row of Q(image); rows inside it that are not in
    # Q(image) are masked. Lets the kernel skip the text before an image without assuming sorted rows.
    image_row_lo: np.ndarray
    image_row_hi: np.ndarray

    @property
    def num_requests(self) -> int:
        return int(self.cu_rows.shape[0] - 1)

    @property
    def num_images(self) -> int:
        return int(self.image_len.shape[0])

    @property
    def total_visual(self) -> int:
        return int(self.cu_image[-1])

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads


def check_importance_args(queries, keys, cu_rows, row_pos, cu_keys, image_req, image_start, image_len,
                          sm_scale=None) -> ImportanceMeta:
    if not isinstance(keys, torch.Tensor):
        raise ValueError("keys must be a torch tensor")
    if keys.dim() != 4:
        raise ValueError(f"keys must be 4-D (num_layers, T, Hkv, D), got shape {tuple(keys.shape)}")
    L, T, Hkv, D = keys.shape
    return _check_core(queries, "keys", (L, Hkv, D), keys.dtype, keys.device, T, "keys.shape[1]",
                       _host_ints(cu_keys, "cu_keys"), cu_rows, row_pos, image_req, image_start, image_len,
                       sm_scale)


def check_paged_args(queries, key_cache, block_table, seq_lens, cu_rows, row_pos, image_req, image_start,
                     image_len, sm_scale=None) -> tuple[ImportanceMeta, np.ndarray]:
    """Paged keys: request b's key t lives at key_cache[:, block_table[b, t // block_size],
    t % block_size]. Returns the metadata (cu_keys = cumsum(seq_lens)) and the host block table."""
    if not isinstance(key_cache, torch.Tensor):
        raise ValueError("key_cache must be a torch tensor")
    if key_cache.dim() != 5:
        raise ValueError("key_cache must be 5-D (num_layers, num_blocks, block_size, Hkv, D), got shape "
                         f"{tuple(key_cache.shape)}")
    L, num_blocks, block_size, Hkv, D = key_cache.shape
    lens = _host_ints(seq_lens, "seq_lens")
    table = _host_ints(block_table, "block_table", ndim=2)
    n_req = len(cu_rows) - 1
    if lens.shape[0] != n_req:
        raise ValueError(f"seq_lens must have one entry per request ({n_req} = len(cu_rows) - 1), "
                         f"got {lens.shape[0]}")
    if table.shape[0] != lens.shape[0]:
        raise ValueError(f"block_table has {table.shape[0]} rows but seq_lens has {lens.shape[0]} requests")
    if np.any(lens < 0):
        raise ValueError("seq_lens entries must be >= 0")
    need = -(-lens // max(block_size, 1))
    if lens.shape[0] and need.max(initial=0) > table.shape[1]:
        raise ValueError(f"block_table has {table.shape[1]} columns but a request of "
                         f"{int(lens.max())} tokens needs {int(need.max())} blocks of {block_size}")
    for b in range(lens.shape[0]):
        used = table[b, :need[b]]
        if np.any(used < 0) or np.any(used >= num_blocks):
            raise ValueError(f"block_table[{b}] refers to blocks outside [0, {num_blocks})")
    cu_keys = np.zeros(lens.shape[0] + 1, dtype=np.int64)
    np.cumsum(lens, out=cu_keys[1:])
    meta = _check_core(queries, "key_cache", (L, Hkv, D), key_cache.dtype, key_cache.device, int(cu_keys[-1]),
                       "sum(seq_lens)", cu_keys, cu_rows, row_pos, image_req, image_start, image_len, sm_scale)
    return meta, table


def _check_core(queries, kname, key_lhd, key_dtype, key_device, T, T_name, cu_k, cu_rows, row_pos,
                image_req, image_start, image_len, sm_scale) -> ImportanceMeta:
    if not isinstance(queries, torch.Tensor):
        raise ValueError("queries must be a torch tensor")
    if queries.dim() != 4:
        raise ValueError(f"queries must be 4-D (num_layers, R, Hq, D), got shape {tuple(queries.shape)}")
    if queries.dtype not in FLOAT_DTYPES:
        raise ValueError(f"queries dtype must be one of float32/float16/bfloat16, got {queries.dtype}")
    if key_dtype != queries.dtype:
        raise ValueError(f"{kname} dtype {key_dtype} must match queries dtype {queries.dtype}")
    if key_device != queries.device:
        raise ValueError(f"{kname} ({key_device}) and queries ({queries.device}) must be on the same device")
    L, R, Hq, D = queries.shape
    Lk, Hkv, Dk = key_lhd
    if Lk != L:
        raise ValueError(f"queries and {kname} must have the same num_layers, got {L} and {Lk}")
    if Dk != D:
        raise ValueError(f"queries and {kname} must have the same head_dim, got {D} and {Dk}")
    if D < 1 or Hq < 1 or Hkv < 1:
        raise ValueError(f"head_dim, Hq and Hkv must be >= 1, got {D}, {Hq}, {Hkv}")
    if Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")

    cu_r = _host_ints(cu_rows, "cu_rows")
    pos = _host_ints(row_pos, "row_pos")
    i_req = _host_ints(image_req, "image_req")
    i_start = _host_ints(image_start, "image_start")
    i_len = _host_ints(image_len, "image_len")
    if cu_k.shape[0] != cu_r.shape[0]:
        raise ValueError(f"cu_rows ({cu_r.shape[0]}) and cu_keys ({cu_k.shape[0]}) must both have B+1 entries")
    _check_offsets(cu_r, "cu_rows", R, "queries.shape[1]")
    _check_offsets(cu_k, "cu_keys", T, T_name)
    if pos.shape[0] != R:
        raise ValueError(f"row_pos must have one entry per query row ({R}), got {pos.shape[0]}")
    B = cu_r.shape[0] - 1
    row_req = np.repeat(np.arange(B), np.diff(cu_r))
    keys_per_req = np.diff(cu_k)
    if R and (np.any(pos < 0) or np.any(pos >= keys_per_req[row_req])):
        bad = int(np.nonzero((pos < 0) | (pos >= keys_per_req[row_req]))[0][0])
        raise ValueError(f"row_pos[{bad}] = {int(pos[bad])} is outside its request's key sequence "
                         f"[0, {int(keys_per_req[row_req[bad]])})")
    I = i_req.shape[0]
    if i_start.shape[0] != I or i_len.shape[0] != I:
        raise ValueError(f"image_req, image_start, image_len must have the same length, got "
                         f"{I}, {i_start.shape[0]}, {i_len.shape[0]}")
    if I:
        if np.any(i_req < 0) or np.any(i_req >= B):
            raise ValueError(f"image_req entries must be request indices in [0, {B})")
        if np.any(i_len < 1):
            raise ValueError("image_len entries must be >= 1")
        if np.any(i_start < 0) or np.any(i_start + i_len > keys_per_req[i_req]):
            bad = int(np.nonzero((i_start < 0) | (i_start + i_len > keys_per_req[i_req]))[0][0])
            raise ValueError(f"image {bad} (tokens [{int(i_start[bad])}, {int(i_start[bad] + i_len[bad])})) "
                             f"is outside request {int(i_req[bad])}'s key sequence of "
                             f"{int(keys_per_req[i_req[bad]])} keys")
        order = np.lexsort((i_start, i_req))
        same = i_req[order][1:] == i_req[order][:-1]
        overlap = i_start[order][1:] < (i_start + i_len)[order][:-1]
        if np.any(same & overlap):
            raise ValueError("images of the same request must not overlap")
    cu_image = np.zeros(I + 1, dtype=np.int64)
    np.cumsum(i_len, out=cu_image[1:])

    lo = np.zeros(I, dtype=np.int64)
    hi = np.zeros(I, dtype=np.int64)
    for i in range(I):
        b = int(i_req[i])
        r0, r1 = int(cu_r[b]), int(cu_r[b + 1])
        hit = np.nonzero(pos[r0:r1] > i_start[i] + i_len[i] - 1)[0]
        if hit.size:
            lo[i], hi[i] = r0 + hit[0], r0 + hit[-1] + 1
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    sm_scale = float(sm_scale)
    if not math.isfinite(sm_scale):
        raise ValueError(f"sm_scale must be finite, got {sm_scale}")
    return ImportanceMeta(L, R, Hq, Hkv, D, T, sm_scale, cu_r, cu_k, pos, i_req, i_start, i_len,
                          cu_image, lo, hi)


def check_keep_args(importance, cu_image, keep_ratio=None, counts=None) -> tuple[np.ndarray, np.ndarray]:
    """Returns host (cu_image, k per image): k = max(1, floor(keep_ratio * N + 1e-9)) in float64, or
    `counts` (one k per image, 1 <= k <= N) when given instead of a ratio."""
    if not isinstance(importance, torch.Tensor) or importance.dim() != 1:
        raise ValueError("importance must be a 1-D tensor")
    if not importance.is_floating_point():
        raise ValueError(f"importance must be a floating tensor, got {importance.dtype}")
    cu = _host_ints(cu_image, "cu_image")
    _check_offsets(cu, "cu_image", importance.shape[0], "importance.shape[0]")
    n = np.diff(cu)
    if np.any(n < 1):
        raise ValueError("every image must have at least one visual token (cu_image must be increasing)")
    I = n.shape[0]
    if (keep_ratio is None) == (counts is None):
        raise ValueError("give exactly one of keep_ratio and counts")
    if counts is not None:
        k = _host_ints(counts, "counts")
        if k.shape[0] != I:
            raise ValueError(f"counts must have one entry per image ({I}), got {k.shape[0]}")
        if np.any(k < 1) or np.any(k > n):
            bad = int(np.nonzero((k < 1) | (k > n))[0][0])
            raise ValueError(f"counts[{bad}] = {int(k[bad])} is outside [1, N = {int(n[bad])}]")
        return cu, k
    if isinstance(keep_ratio, torch.Tensor):
        ratios = keep_ratio.detach().to("cpu", torch.float64).reshape(-1).numpy()
        if keep_ratio.dim() == 0:
            ratios = np.full(I, ratios[0])
    elif isinstance(keep_ratio, (int, float)) and not isinstance(keep_ratio, bool):
        ratios = np.full(I, float(keep_ratio))
    else:
        try:
            ratios = np.asarray(keep_ratio, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as e:
            raise ValueError("keep_ratio must be a float in (0, 1] or one ratio per image") from e
    if ratios.shape[0] != I:
        raise ValueError(f"keep_ratio must be a float or have one entry per image ({I}), got {ratios.shape[0]}")
    if not np.all((ratios > 0.0) & (ratios <= 1.0)):  # also rejects NaN
        bad = ratios[~((ratios > 0.0) & (ratios <= 1.0))][0]
        raise ValueError(f"keep_ratio must be in (0, 1], got {bad}")
    k = np.array([keep_count(int(m), float(r)) for r, m in zip(ratios, n)], dtype=np.int64)
    return cu, k


def keep_count(num_visual: int, ratio: float) -> int:
    """k = max(1, floor(ratio * N)): the one formula for how many visual tokens an image keeps
    (reference, kernel, engine placeholders). The epsilon keeps e.g. 0.29 * 100 at 29, not 28."""
    return max(1, min(num_visual, math.floor(ratio * num_visual + 1e-9)))


# -- keep rules --------------------------------------------------------------------------------
# How an image's k kept tokens are chosen from its importance (docs/importance.md):
#   "sgl"       the paper's: the k most important tokens.
#   "sgl-sdpp"  the greedy MAP of a DPP whose quality is the importance and whose similarity is
#               spatial, so k tokens cover every attended region instead of piling up on one.
IMPORTANCES = ("sgl", "sgl-sdpp")
# The spatial DPP's constants (chosen on the shapes task's validation split, benchmarks/README.md):
# the Gaussian's width in merged tokens, and theta, the weight of importance against spread
# (CDPruner's: quality exp(alpha * min-max importance), alpha = theta / (2 (1 - theta))).
SDPP_SIGMA = 1.5
SDPP_THETA = 0.85
# A candidate whose remaining gain is at most this is spent (the kernel's rank is used up): the
# rest of the budget then follows importance alone.
SDPP_EPS = 1e-6
# The windows the spatial DPP runs in: each plane is cut into SDPP_WINDOW x SDPP_WINDOW token tiles,
# and the greedy runs in each tile alone (docs/importance.md).
SDPP_WINDOW = 16
SDPP_LANES = SDPP_WINDOW * SDPP_WINDOW
# exp(-d / (2 sigma^2)) for every squared distance d inside a window, 0 .. 2 (SDPP_WINDOW - 1)^2.
SDPP_SIM_LEN = 2 * (SDPP_WINDOW - 1) ** 2 + 1


def check_keep_rules(cu: np.ndarray, rules, layouts) -> tuple[np.ndarray, np.ndarray]:
    """Returns host (indices of the images whose rule is "sgl-sdpp", their (width, plane) layouts).

    rules: None (every image "sgl") or one name of IMPORTANCES per image. layouts: per image
    (width, plane): token t of the image lies in plane t // plane (a frame, or an InternVL tile),
    row (t % plane) // width, column t % width; needed for the images whose rule is "sgl-sdpp"."""
    n = np.diff(cu)
    if rules is None:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.int64)
    rules = list(rules)
    if len(rules) != n.shape[0]:
        raise ValueError(f"rules must have one entry per image ({n.shape[0]}), got {len(rules)}")
    bad = [r for r in rules if r not in IMPORTANCES]
    if bad:
        raise ValueError(f"unknown keep rule {bad[0]!r}; accepted: {', '.join(IMPORTANCES)}")
    sdpp = np.array([i for i, r in enumerate(rules) if r == "sgl-sdpp"], dtype=np.int64)
    if sdpp.size == 0:
        return sdpp, np.zeros((0, 2), dtype=np.int64)
    if layouts is None:
        raise ValueError('rule "sgl-sdpp" needs layouts: (width, plane) per image')
    lay = _host_ints(layouts, "layouts", ndim=2)
    if lay.shape != (n.shape[0], 2):
        raise ValueError(f"layouts must have shape ({n.shape[0]}, 2), got {tuple(lay.shape)}")
    for i in sdpp:
        w, p = int(lay[i, 0]), int(lay[i, 1])
        if w < 1 or p < w or p % w or n[i] % p:
            raise ValueError(f"layouts[{int(i)}] = ({w}, {p}) does not tile an image of {int(n[i])} tokens "
                             "(width >= 1, plane a multiple of width, N a multiple of plane)")
    return sdpp, lay[sdpp]


def _round4(x: int) -> int:
    return -(-int(x) // 4) * 4


def sdpp_scratch_elems(lens, counts) -> int:
    """fp32 elements of the "sgl-sdpp" rule's scratch for images of lens[i] tokens keeping counts[i]
    (only the images whose rule is "sgl-sdpp"): 256 per kept token of the images with k < N (the
    windows' Cholesky rows), their quality q, the similarity table, and 4 to align the start to 16
    bytes. 0 when no such image has k < N (no greedy runs)."""
    n, k = np.asarray(lens, dtype=np.int64).reshape(-1), np.asarray(counts, dtype=np.int64).reshape(-1)
    spread = k < n
    if not spread.any():
        return 0
    return 4 + _round4(SDPP_SIM_LEN) + _round4(n[spread].sum()) + SDPP_LANES * int(k[spread].sum())


def check_sdpp_scratch(scratch, need: int, device) -> None:
    if scratch is None:
        return
    if not isinstance(scratch, torch.Tensor) or scratch.dtype != torch.float32 or scratch.dim() != 1 \
            or not scratch.is_contiguous() or scratch.device != torch.device(device) or scratch.numel() < need:
        raise ValueError(f"scratch must be a contiguous 1-D float32 tensor on {device} of at least {need} "
                         "elements (sdpp_scratch_elems)")


@dataclass
class SdppWindows:
    """Host geometry of the "sgl-sdpp" windows of some images, in (image, plane, a, b) order.

    Per window: `image` (index into the images given), `plane`, `y0`, `x0` (its first token's row
    and column), `height`, `width` (the window's size), `tok0` (its first token's index within the
    image). Per image: `win0` (its first window), `wpp` (windows per plane), `nwx` (windows per row
    of windows), `layout_width`, `layout_plane` (its layout)."""

    image: np.ndarray
    plane: np.ndarray
    y0: np.ndarray
    x0: np.ndarray
    height: np.ndarray
    width: np.ndarray
    tok0: np.ndarray
    win0: np.ndarray
    wpp: np.ndarray
    nwx: np.ndarray
    layout_width: np.ndarray
    layout_plane: np.ndarray

    @property
    def num(self) -> int:
        return int(self.image.shape[0])


def sdpp_window_grid(lens, layouts) -> SdppWindows:
    """The windows of images of lens[i] tokens with layouts[i] = (width, plane): the tokens of plane
    p with row in [16a, 16a + 16) and column in [16b, 16b + 16) form window (p, a, b)."""
    n = np.asarray(lens, dtype=np.int64).reshape(-1)
    lay = np.asarray(layouts, dtype=np.int64).reshape(-1, 2)
    wid, pl = lay[:, 0], lay[:, 1]
    rows = pl // np.maximum(wid, 1)
    nwy, nwx = -(-rows // SDPP_WINDOW), -(-wid // SDPP_WINDOW)
    wpp = nwy * nwx
    count = (n // np.maximum(pl, 1)) * wpp
    win0 = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    image = np.repeat(np.arange(n.shape[0], dtype=np.int64), count)
    u = np.arange(image.shape[0], dtype=np.int64) - win0[image]
    plane = u // wpp[image]
    y0 = (u % wpp[image]) // nwx[image] * SDPP_WINDOW
    x0 = u % nwx[image] * SDPP_WINDOW
    height = np.minimum(SDPP_WINDOW, rows[image] - y0)
    width = np.minimum(SDPP_WINDOW, wid[image] - x0)
    tok0 = plane * pl[image] + y0 * wid[image] + x0
    return SdppWindows(image, plane, y0, x0, height, width, tok0, win0, wpp, nwx, wid, pl)


def sdpp_scratch_views(scratch: torch.Tensor, num_q: int):
    """(similarity table, q, Cholesky rows) views of a scratch of sdpp_scratch_elems, each starting
    on a 16-byte boundary (Triton specialises pointers on it: a misaligned one compiles a variant)."""
    off = (-scratch.data_ptr() % 16) // 4
    q0 = off + _round4(SDPP_SIM_LEN)
    c0 = q0 + _round4(num_q)
    return scratch[off:off + SDPP_SIM_LEN], scratch[q0:q0 + num_q], scratch[c0:]
