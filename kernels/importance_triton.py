"""Fused Triton kernels for SGL visual-token importance and keep sets.

Same quantity and signatures as importance_ref (read that file for the definition). No rows x keys
matrix is ever written to memory:

  phase 1  _lse_kernel         per (row tile, KV head, layer): streams the row tile's causal keys
                               flash-attention style (online max / sum, no V) and writes one
                               log-sum-exp per (layer, row, query head): (L, R, Hq) fp32.
  phase 2  _importance_kernel  per (visual key tile, split of the layer x KV-head pairs): loads the
                               tile's keys once per pair, sweeps every Q row tile of the image's
                               request, recomputes the logits and adds exp(s - lse) column sums
                               into registers; one plain store per program (no atomics, so the
                               result is deterministic).
  (reduce) _sum_splits_kernel  only when phase 2 splits the pairs over several programs to fill
                               the GPU (few visual tiles): sums the per-split partials in order.
  top-k    _keep_kernel        one program per image: bisects the k-th largest value over the bits
                               of an order-preserving integer key (32 counting passes), then one
                               pass writes the kept indices in ascending order, ties to the lower
                               index.
  sgl-sdpp _sdpp_window_kernel one program per 16 x 16 window of the "sgl-sdpp" images: the greedy
                               DPP MAP in the window, its budget k_w counted on the device from the
                               top-k; then _sdpp_compact_kernel, one program per such image, writes
                               its kept tokens ascending over the top-k's slots.

Query heads of one KV group are packed into the M dimension of each tile (row-major: tile row m is
row m // GROUP, head m % GROUP), so each K tile feeds one tl.dot for the whole group; a tile holds
BLOCK_M // GROUP rows.
Written for triton >= 3.0 (tested under the 3.8 interpreter; the GPU target runs 3.6).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from ._args import (SDPP_EPS, SDPP_LANES, SDPP_WINDOW, check_importance_args, check_keep_args, check_keep_rules,
                    check_paged_args, check_sdpp_scratch, sdpp_scratch_elems, sdpp_scratch_views, sdpp_window_grid)
from .importance_ref import sdpp_budgets, sdpp_geometry, sdpp_quality_batch, sdpp_similarity

LOG2E = 1.4426950408889634


@triton.jit
def _key_offsets(t, ok, req, key0, bt_ptr, stride_bt, stride_kb, stride_kt, page, PAGED: tl.constexpr):
    # Element offset (before layer and head) of key t of request req: dense varlen, or through the
    # request's block table (paged KV cache, `page` keys per block: a runtime value, so a new block
    # size, e.g. the guide's next KV capacity bucket, reuses the compiled kernel).
    if PAGED:
        blk = tl.load(bt_ptr + req * stride_bt + t // page, mask=ok, other=0).to(tl.int64)
        off = blk * stride_kb + (t % page) * stride_kt
    else:
        off = (key0 + t) * stride_kt
    return off


# Runtime integers that must not be specialised on their value (Triton compiles a variant for an
# argument equal to 1 or divisible by 16): they change from call to call in serving.
@triton.jit(do_not_specialize=["stride_ll", "page"])
def _lse_kernel(
    q_ptr, k_ptr, lse_ptr, row_pos_ptr, cu_rows_ptr, cu_keys_ptr, tile_req_ptr, tile_row_ptr, bt_ptr,
    stride_ql, stride_qr, stride_qh,
    stride_kl, stride_kb, stride_kt, stride_kh,
    stride_ll, stride_lr, stride_bt,
    qk_scale,  # sm_scale * log2(e): the kernel works in base 2
    page,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, PAGED: tl.constexpr,
):
    ROWS: tl.constexpr = BLOCK_M // GROUP
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    layer = tl.program_id(2).to(tl.int64)
    req = tl.load(tile_req_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    row_end = tl.load(cu_rows_ptr + req + 1)
    key0 = tl.load(cu_keys_ptr + req)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # head_dim 80 etc. is padded to a power of two
    rows = row0 + offs_m // GROUP
    heads = kvh * GROUP + offs_m % GROUP
    # A GQA group that does not divide BLOCK_M (e.g. 7) leaves the last BLOCK_M % GROUP tile rows idle.
    row_ok = (rows < row_end) & (offs_m < ROWS * GROUP)
    pos = tl.load(row_pos_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    q = tl.load(q_ptr + layer * stride_ql + rows[:, None] * stride_qr + heads[:, None] * stride_qh
                + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    # Finite start so padded rows (no key at all) never compute inf - inf.
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    hi = tl.max(pos, 0) + 1  # causal: no row of the tile reads past its largest position
    k_base = k_ptr + layer * stride_kl + kvh * stride_kh
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        k_off = _key_offsets(offs_n, n_ok, req, key0, bt_ptr, stride_bt, stride_kb, stride_kt, page, PAGED)
        k = tl.load(k_base + k_off[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        s = tl.where(offs_n[None, :] <= pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    lse = m_i + tl.log2(tl.maximum(l_i, 1.0e-30))
    tl.store(lse_ptr + layer * stride_ll + rows * stride_lr + heads, lse, mask=row_ok)


@triton.jit(do_not_specialize=["stride_ll", "stride_part", "num_kv_heads", "num_pairs", "pairs_per_split", "page"])
def _importance_kernel(
    q_ptr, k_ptr, lse_ptr, row_pos_ptr, part_ptr, cu_keys_ptr,
    vt_image_ptr, vt_off_ptr,
    img_req_ptr, img_start_ptr, img_len_ptr, cu_image_ptr, img_row_lo_ptr, img_row_hi_ptr, bt_ptr,
    stride_ql, stride_qr, stride_qh,
    stride_kl, stride_kb, stride_kt, stride_kh,
    stride_ll, stride_lr, stride_bt,
    stride_part,
    qk_scale, num_kv_heads, num_pairs, pairs_per_split, page,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, PAGED: tl.constexpr,
):
    ROWS: tl.constexpr = BLOCK_M // GROUP
    vt = tl.program_id(0)
    split = tl.program_id(1)
    img = tl.load(vt_image_ptr + vt)
    off = tl.load(vt_off_ptr + vt)
    req = tl.load(img_req_ptr + img)
    start = tl.load(img_start_ptr + img)
    n_len = tl.load(img_len_ptr + img)
    out0 = tl.load(cu_image_ptr + img)
    row_lo = tl.load(img_row_lo_ptr + img).to(tl.int32)
    row_hi = tl.load(img_row_hi_ptr + img).to(tl.int32)
    key0 = tl.load(cu_keys_ptr + req)
    last_vis = (start + n_len - 1).to(tl.int32)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n = off + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_len
    k_off = _key_offsets(start + offs_n, n_ok, req, key0, bt_ptr, stride_bt, stride_kb, stride_kt, page, PAGED)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)

    pair_lo = split * pairs_per_split
    pair_hi = tl.minimum(pair_lo + pairs_per_split, num_pairs)
    for pair in range(pair_lo, pair_hi):
        layer = (pair // num_kv_heads).to(tl.int64)
        kvh = pair % num_kv_heads
        # The tile's visual keys are read once per (layer, KV head) and reused by every row tile.
        k = tl.load(k_ptr + layer * stride_kl + kvh * stride_kh + k_off[:, None] + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        heads = kvh * GROUP + offs_m % GROUP
        for r0 in range(row_lo, row_hi, ROWS):
            rows = r0 + offs_m // GROUP
            in_range = (rows < row_hi) & (offs_m < ROWS * GROUP)
            pos = tl.load(row_pos_ptr + rows, mask=in_range, other=-1).to(tl.int32)
            # Q(image): rows strictly after the image's last visual token. Every visual key is
            # then causally visible to the row, so no causal mask is needed here.
            row_ok = in_range & (pos > last_vis)
            q = tl.load(q_ptr + layer * stride_ql + rows[:, None].to(tl.int64) * stride_qr
                        + heads[:, None] * stride_qh + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_FP32:
                q = q.to(tl.float32)
            lse = tl.load(lse_ptr + layer * stride_ll + rows.to(tl.int64) * stride_lr + heads,
                          mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
            p = tl.exp2(s - lse[:, None])
            p = tl.where(row_ok[:, None] & n_ok[None, :], p, 0.0)
            acc += tl.sum(p, 0)
    tl.store(part_ptr + split * stride_part + out0 + offs_n, acc, mask=n_ok)


@triton.jit(do_not_specialize=["total", "num_splits"])
def _sum_splits_kernel(part_ptr, out_ptr, total, num_splits, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, num_splits):  # fixed order: deterministic
        acc += tl.load(part_ptr + s * total + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc, mask=ok)


@triton.jit
def _ordered_key(x):
    # int64 in [0, 2^32) ordered like the float32 values (-0.0 folded into +0.0 first, so equal
    # floats get equal keys and the tie rule decides between them).
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(bits >= 0, bits + 2147483648, -1 - bits)


@triton.jit
def _keep_kernel(imp_ptr, cu_image_ptr, num_keep_ptr, cu_keep_ptr, out_ptr, BLOCK: tl.constexpr):
    img = tl.program_id(0)
    base = tl.load(cu_image_ptr + img)
    n = (tl.load(cu_image_ptr + img + 1) - base).to(tl.int32)
    k = tl.load(num_keep_ptr + img).to(tl.int32)
    out0 = tl.load(cu_keep_ptr + img)
    lanes = tl.arange(0, BLOCK)

    # thr = the largest key with count(key >= thr) >= k, i.e. the k-th largest key, built bit by
    # bit from the top. O(32 N) per image with no sort and no scratch memory.
    thr = (k * 0).to(tl.int64)
    step = thr + 2147483648
    for _ in range(0, 32):
        cand = thr + step
        cnt = k * 0
        for s in range(0, n, BLOCK):
            offs = s + lanes
            ok = offs < n
            key = _ordered_key(tl.load(imp_ptr + base + offs, mask=ok, other=0.0).to(tl.float32))
            cnt += tl.sum((ok & (key >= cand)).to(tl.int32), 0)
        thr = tl.where(cnt >= k, cand, thr)
        step = step // 2

    n_gt = k * 0
    for s in range(0, n, BLOCK):
        offs = s + lanes
        ok = offs < n
        key = _ordered_key(tl.load(imp_ptr + base + offs, mask=ok, other=0.0).to(tl.float32))
        n_gt += tl.sum((ok & (key > thr)).to(tl.int32), 0)
    ties_needed = k - n_gt  # how many of the values equal to thr are kept: the lowest-index ones

    written = k * 0
    ties_seen = k * 0
    for s in range(0, n, BLOCK):
        offs = s + lanes
        ok = offs < n
        key = _ordered_key(tl.load(imp_ptr + base + offs, mask=ok, other=0.0).to(tl.float32))
        tie = (ok & (key == thr)).to(tl.int32)
        tie_rank = ties_seen + tl.cumsum(tie, 0) - tie
        sel = (ok & (key > thr)) | ((tie != 0) & (tie_rank < ties_needed))
        sel_i = sel.to(tl.int32)
        dst = written + tl.cumsum(sel_i, 0) - sel_i
        tl.store(out_ptr + out0 + dst, offs.to(tl.int64), mask=sel)
        written += tl.sum(sel_i, 0)
        ties_seen += tl.sum(tie, 0)


@triton.jit(do_not_specialize=["num_windows", "eps"])
def _sdpp_window_kernel(q_ptr, sim_ptr, win_ptr, num_windows, kw_ptr, c_off_ptr, c_ptr, eps,
                        WINDOW: tl.constexpr):
    # One program per window of an "sgl-sdpp" image: importance_ref.sdpp_keep_ref's greedy in that
    # window, step for step. Lane l is the token at row l // WINDOW, column l % WINDOW of the window
    # (lane order = image index order, so argmax's first maximum is the lower index). q, the gains
    # (-inf once taken) and the taken set stay in registers; Cholesky row r of this window is
    # c[c_off + r * WINDOW^2 ...]. The barrier orders each lane's store of row i before other lanes
    # read c[r, j]. IEEE division and square root, FMA contraction off at launch: the reference's
    # operations. On return, q's slot of every kept token holds -1 (the kept mask).
    # win (int64): q's slot of lane 0, the image's width, the window's height, its width.
    w = tl.program_id(0)
    q0 = tl.load(win_ptr + w)
    width = tl.load(win_ptr + num_windows + w)
    hw = tl.load(win_ptr + 2 * num_windows + w).to(tl.int32)
    ww = tl.load(win_ptr + 3 * num_windows + w).to(tl.int32)
    kw = tl.load(kw_ptr + w).to(tl.int32)
    c0 = tl.load(c_off_ptr + w)
    LANES: tl.constexpr = WINDOW * WINDOW
    lanes = tl.arange(0, LANES)
    ly, lx = lanes // WINDOW, lanes % WINDOW
    ok = (ly < hw) & (lx < ww)
    slot = q0 + ly * width + lx
    neg_inf = float("-inf")
    q = tl.load(q_ptr + slot, mask=ok, other=0.0)
    d2 = tl.where(ok, q * q, neg_inf)
    full = kw >= hw * ww  # keeps the whole window: no choice to make
    for i in range(0, tl.where(full, 0, kw)):
        best = tl.max(d2, 0)
        j = tl.argmax(d2, 0).to(tl.int32)
        spent = best <= eps
        if spent:  # the rest go by quality
            j = tl.argmax(tl.where(d2 != neg_inf, q, neg_inf), 0).to(tl.int32)
        jy, jx = j // WINDOW, j % WINDOW
        qj = tl.load(q_ptr + q0 + jy * width + jx)
        dy, dx = ly - jy, lx - jx
        sim = tl.load(sim_ptr + dy * dy + dx * dx)
        row = qj * sim * q
        for r in range(0, i):
            c_r = c_ptr + c0 + r * LANES
            row = row - tl.load(c_r + j) * tl.load(c_r + lanes)
        e = tl.where(spent, 0.0, tl.math.div_rn(row, tl.math.sqrt_rn(tl.where(spent, 1.0, best))))
        tl.store(c_ptr + c0 + i * LANES + lanes, e)
        tl.debug_barrier()
        d2 = tl.where(lanes == j, neg_inf, d2 - e * e)
    tl.store(q_ptr + slot, tl.full([LANES], -1.0, tl.float32), mask=ok & ((d2 == neg_inf) | full))


@triton.jit(do_not_specialize=["num_images"])
def _sdpp_compact_kernel(q_ptr, img_ptr, num_images, out_ptr, BLOCK: tl.constexpr):
    # One program per "sgl-sdpp" image: its kept tokens (q's slot = -1), ascending, into its k slots.
    # img (int64): q's slot of its first token, N, its first output slot.
    s = tl.program_id(0)
    q0 = tl.load(img_ptr + s)
    n = tl.load(img_ptr + num_images + s).to(tl.int32)
    out0 = tl.load(img_ptr + 2 * num_images + s)
    lanes = tl.arange(0, BLOCK)
    written = n * 0
    for start in range(0, n, BLOCK):
        offs = start + lanes
        ok = offs < n
        sel = ok & (tl.load(q_ptr + q0 + offs, mask=ok, other=0.0) < 0.0)
        sel_i = sel.to(tl.int32)
        dst = written + tl.cumsum(sel_i, 0) - sel_i
        tl.store(out_ptr + out0 + dst, offs.to(tl.int64), mask=sel)
        written += tl.sum(sel_i, 0)


KEEP_BLOCK = 1024


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def is_interpreter() -> bool:
    """True when these kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_lse_kernel).__name__ == "InterpretedFunction"


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not is_interpreter():
        raise RuntimeError(
            "the Triton importance kernel got CPU tensors, but Triton has no CPU backend: move the "
            "tensors to a GPU, use backend='torch', or set TRITON_INTERPRET=1 before triton is first "
            "imported (interpreter, for tests only)")


def _default_config(meta, dtype: torch.dtype, device: torch.device) -> dict:
    group = meta.group
    block_d = max(16, _next_pow2(meta.head_dim))
    big = dtype == torch.float32 or block_d > 128  # keep fp32 / wide-head tiles within shared memory
    max_rows = int(np.diff(meta.cu_rows).max()) if meta.num_requests else 1
    # Enough packed (row, head) pairs to fill the tile without wasting it on padding rows;
    # tl.dot needs M >= 16.
    block_m = min(64, max(16, _next_pow2(max_rows * group)), max(16, 128 // max(1, block_d // 64)))
    block_m = max(block_m, _next_pow2(group))
    cfg = dict(BLOCK_M=block_m, BLOCK_N1=32 if big else 64, BLOCK_N2=64 if big else 128, BLOCK_D=block_d,
               num_warps=4, num_stages=2, splits=None)
    if device.type == "cpu":  # interpreter: fewer, larger blocks are much faster
        cfg.update(BLOCK_N1=128, BLOCK_N2=128, splits=1)
    return cfg


def visual_importance_triton(queries, keys, cu_rows, row_pos, cu_keys, image_req, image_start, image_len,
                             sm_scale=None, *, out: torch.Tensor | None = None,
                             _config: dict | None = None) -> torch.Tensor:
    """Fused Triton version of importance_ref.visual_importance_ref (same arguments and result).

    out: optional fp32 buffer of shape (sum(image_len),) to write into (every element is written).
    Copies the small metadata to the host once (validation and grid sizes need it)."""
    meta = check_importance_args(queries, keys, cu_rows, row_pos, cu_keys, image_req, image_start,
                                 image_len, sm_scale)
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    # Dense keys: key t of request b is row cu_keys[b] + t; the block stride is unused.
    key_strides = (keys.stride(0), 0, keys.stride(1), keys.stride(2))
    return _launch(meta, queries, keys, key_strides, None, 1, out, _config)


def visual_importance_paged_triton(queries, key_cache, block_table, seq_lens, cu_rows, row_pos, image_req,
                                   image_start, image_len, sm_scale=None, *, out: torch.Tensor | None = None,
                                   _config: dict | None = None) -> torch.Tensor:
    """Like visual_importance_triton, with keys read through a block table: request b's key t is
    key_cache[:, block_table[b, t // block_size], t % block_size]. key_cache: (num_layers, num_blocks,
    block_size, Hkv, D) (any strides with a contiguous last dim); block_table (B, max_blocks);
    seq_lens (B,): keys per request."""
    meta, _ = check_paged_args(queries, key_cache, block_table, seq_lens, cu_rows, row_pos, image_req,
                               image_start, image_len, sm_scale)
    if key_cache.stride(-1) != 1:
        key_cache = key_cache.contiguous()
    table = torch.as_tensor(block_table).to(device=queries.device, dtype=torch.int32)
    key_strides = (key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), key_cache.stride(3))
    return _launch(meta, queries, key_cache, key_strides, table, key_cache.shape[2], out, _config)


def _launch(meta, queries, keys, key_strides, block_table, page, out, _config):
    _check_device(queries)
    device = queries.device
    if out is None:
        out = torch.empty(meta.total_visual, dtype=torch.float32, device=device)
    elif out.shape != (meta.total_visual,) or out.dtype != torch.float32 or out.device != device \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape ({meta.total_visual},) on {device}")
    if meta.num_images == 0 or meta.num_rows == 0:
        return out.zero_()
    cfg = _default_config(meta, queries.dtype, device)
    cfg.update(_config or {})
    poison = bool(cfg.get("poison"))  # tests: NaN-fill scratch so a read of an unwritten entry shows
    group, block_m = meta.group, cfg["BLOCK_M"]
    if block_m < max(16, group) or block_m & (block_m - 1):
        raise ValueError(f"BLOCK_M ({block_m}) must be a power of two >= max(16, GQA group {group})")
    if queries.stride(-1) != 1:
        queries = queries.contiguous()
    paged = block_table is not None
    if not paged:
        block_table = torch.zeros(1, 1, dtype=torch.int32, device=device)  # unused placeholder
    L, R, Hq, Hkv = meta.num_layers, meta.num_rows, meta.num_q_heads, meta.num_kv_heads
    # Triton 3.8's interpreter multiplies bf16 tiles as their raw uint16 bits: give it fp32 copies
    # (exact, bf16 products fit in fp32). Compiled kernels keep the native bf16 tensor-core dot.
    dot_fp32 = is_interpreter() and queries.dtype == torch.bfloat16
    # ieee: fp32 inputs are not rounded to TF32 (it would cost ~1e-3 relative on the logits).
    precision = "ieee" if queries.dtype == torch.float32 or dot_fp32 else "tf32"
    qk_scale = meta.sm_scale * LOG2E

    # Phase 1 tiles: only rows some image's Q can read (per request, the union of its images' row
    # ranges); the lse of other rows is never read.
    rows_per_tile = block_m // group
    tile_req, tile_row = [], []
    for b in range(meta.num_requests):
        mine = meta.image_req == b
        if not mine.any() or not (meta.image_row_hi[mine] > meta.image_row_lo[mine]).any():
            continue
        used = meta.image_row_hi[mine] > meta.image_row_lo[mine]
        lo, hi = int(meta.image_row_lo[mine][used].min()), int(meta.image_row_hi[mine][used].max())
        starts = np.arange(lo, hi, rows_per_tile)
        tile_req.append(np.full(starts.shape, b))
        tile_row.append(starts)
    block_n = cfg["BLOCK_N2"]
    n_tiles = -(-meta.image_len // block_n)
    vt_image = np.repeat(np.arange(meta.num_images), n_tiles)
    vt_off = (np.arange(vt_image.shape[0]) - np.repeat(np.cumsum(n_tiles) - n_tiles, n_tiles)) * block_n
    lse = torch.empty((L, R, Hq), dtype=torch.float32, device=device)
    if poison:
        lse.fill_(float("nan"))
    if not tile_req:  # no image has a row after it: every importance is 0
        return out.zero_()
    tile_req, tile_row = np.concatenate(tile_req), np.concatenate(tile_row)

    # One host-to-device copy for all the small metadata.
    parts = dict(cu_rows=meta.cu_rows, cu_keys=meta.cu_keys, row_pos=meta.row_pos, tile_req=tile_req,
                 tile_row=tile_row, vt_image=vt_image, vt_off=vt_off, image_req=meta.image_req,
                 image_start=meta.image_start, image_len=meta.image_len, cu_image=meta.cu_image,
                 image_row_lo=meta.image_row_lo, image_row_hi=meta.image_row_hi)
    d = _one_copy(parts, device)

    _lse_kernel[(tile_req.shape[0], Hkv, L)](
        queries, keys, lse, d["row_pos"], d["cu_rows"], d["cu_keys"], d["tile_req"], d["tile_row"], block_table,
        queries.stride(0), queries.stride(1), queries.stride(2),
        *key_strides,
        lse.stride(0), lse.stride(1), block_table.stride(0),
        qk_scale, page,
        HEAD_DIM=meta.head_dim, GROUP=group, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N1"],
        BLOCK_D=cfg["BLOCK_D"], INPUT_PRECISION=precision, DOT_FP32=dot_fp32, PAGED=paged,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )

    num_pairs = L * Hkv
    splits = cfg["splits"]
    if splits is None:  # enough programs to fill the GPU about twice
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        splits = max(1, min(num_pairs, math.ceil(2 * sms / vt_image.shape[0])))
    splits = max(1, min(int(splits), num_pairs))
    pairs_per_split = math.ceil(num_pairs / splits)
    splits = math.ceil(num_pairs / pairs_per_split)  # no empty split
    part = out if splits == 1 else torch.empty((splits, meta.total_visual), dtype=torch.float32, device=device)
    if poison and splits > 1:
        part.fill_(float("nan"))
    _importance_kernel[(vt_image.shape[0], splits)](
        queries, keys, lse, d["row_pos"], part, d["cu_keys"], d["vt_image"], d["vt_off"],
        d["image_req"], d["image_start"], d["image_len"], d["cu_image"], d["image_row_lo"], d["image_row_hi"],
        block_table,
        queries.stride(0), queries.stride(1), queries.stride(2),
        *key_strides,
        lse.stride(0), lse.stride(1), block_table.stride(0),
        meta.total_visual,
        qk_scale, Hkv, num_pairs, pairs_per_split, page,
        HEAD_DIM=meta.head_dim, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=cfg["BLOCK_D"], INPUT_PRECISION=precision, DOT_FP32=dot_fp32, PAGED=paged,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(meta.total_visual, block),)](
            part, out, meta.total_visual, splits, BLOCK=block)
    return out


def keep_set_triton(importance, cu_image, keep_ratio=None, *, counts=None, rules=None, layouts=None,
                    out: torch.Tensor | None = None, scratch: torch.Tensor | None = None, _block: int | None = None,
                    _sdpp_eps: float = SDPP_EPS):
    """Triton version of importance_ref.keep_set_ref (same arguments and result).

    out: optional int64 buffer of shape (sum(k),) for keep_idx (every element is written).
    scratch: optional fp32 buffer of at least sdpp_scratch_elems(N, k of the "sgl-sdpp" images)
    elements, used instead of allocating the rule's scratch. One host-to-device copy (the metadata);
    everything after it is queued on the device without a sync."""
    cu, k = check_keep_args(importance, cu_image, keep_ratio, counts)
    sdpp, lay = check_keep_rules(cu, rules, layouts)
    _check_device(importance)
    device = importance.device
    n = np.diff(cu)
    check_sdpp_scratch(scratch, sdpp_scratch_elems(n[sdpp], k[sdpp]), device)
    cu_keep = np.zeros(k.shape[0] + 1, dtype=np.int64)
    np.cumsum(k, out=cu_keep[1:])
    if out is None:
        out = torch.empty(int(cu_keep[-1]), dtype=torch.int64, device=device)
    elif out.shape != (int(cu_keep[-1]),) or out.dtype != torch.int64 or out.device != device \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous int64 tensor of shape ({int(cu_keep[-1])},) on {device}")
    keep_idx = out
    if k.shape[0] == 0:
        return keep_idx, torch.as_tensor(cu_keep).to(device)
    imp = importance.contiguous()
    spread = k[sdpp] < n[sdpp]  # keeping every token needs no choice: the top-k below writes them
    imgs = sdpp[spread]
    arrays = dict(cu_image=cu, k=k, cu_keep=cu_keep)
    if imgs.size:
        win = sdpp_window_grid(n[imgs], lay[spread])
        qbase = np.concatenate([[0], np.cumsum(n[imgs])[:-1]])  # each image's first slot in q
        kbase = np.concatenate([[0], np.cumsum(k[imgs])[:-1]])
        arrays.update(
            win=np.concatenate([qbase[win.image] + win.tok0, win.layout_width[win.image], win.height, win.width]),
            img=np.concatenate([qbase, n[imgs], cu_keep[imgs]]), shift=cu[imgs] - qbase, lens=n[imgs], ks=k[imgs],
            slot_shift=cu_keep[imgs] - kbase, geo=sdpp_geometry(win).reshape(-1))
    d = _one_copy(arrays, device)
    # One block size for every image size: a size-dependent block compiled a variant per power of
    # two of the largest image inside serving; lanes past N are masked, at no measurable cost.
    _keep_kernel[(k.shape[0],)](imp, d["cu_image"], d["k"], d["cu_keep"], keep_idx, BLOCK=_block or KEEP_BLOCK)
    if imgs.size:  # those images' slots are written again, by their rule
        total, total_k = int(n[imgs].sum()), int(k[imgs].sum())
        if scratch is None:
            scratch = torch.empty(sdpp_scratch_elems(n[imgs], k[imgs]), dtype=torch.float32, device=device)
        sim, q, c = sdpp_scratch_views(scratch, total)
        sdpp_similarity(sim)
        sdpp_quality_batch(imp, d["shift"], d["lens"], total, q)
        # k_w from the top-k just written; each window's Cholesky rows start at 256 x (k of the windows before)
        kw = sdpp_budgets(keep_idx, d["slot_shift"], d["ks"], d["geo"].view(-1, 5), win.num, total_k)
        c_off = (kw.cumsum(0) - kw) * SDPP_LANES
        _sdpp_window_kernel[(win.num,)](q, sim, d["win"], win.num, kw, c_off, c, _sdpp_eps, WINDOW=SDPP_WINDOW,
                                        enable_fp_fusion=False)
        _sdpp_compact_kernel[(imgs.size,)](q, d["img"], imgs.size, keep_idx, BLOCK=KEEP_BLOCK)
    return keep_idx, d["cu_keep"]


def _one_copy(arrays: dict, device) -> dict:
    """The int64 host arrays as device tensors from one host-to-device copy; each starts 16-byte
    aligned (Triton specialises pointers on that, so unaligned slices compiled new variants as batch
    sizes changed)."""
    arrays = {name: np.asarray(v, dtype=np.int64).reshape(-1) for name, v in arrays.items()}
    flat = torch.from_numpy(np.concatenate([np.pad(a, (0, (-len(a)) % 2)) for a in arrays.values()]))
    flat = flat.to(device, non_blocking=False)
    d, o = {}, 0
    for name, a in arrays.items():
        d[name] = flat[o:o + len(a)]
        o += len(a) + (-len(a)) % 2
    return d


KERNELS = {"_lse_kernel": _lse_kernel, "_importance_kernel": _importance_kernel,
           "_sum_splits_kernel": _sum_splits_kernel, "_keep_kernel": _keep_kernel,
           "_sdpp_window_kernel": _sdpp_window_kernel, "_sdpp_compact_kernel": _sdpp_compact_kernel}


def compiled_variants() -> dict[str, int] | None:
    """How many compiled variants each kernel holds in this process (None under the interpreter,
    which compiles nothing). Reads the JIT's per-device cache (triton 3.x `device_caches`, older
    `cache`)."""
    if is_interpreter():
        return None
    out = {}
    for name, fn in KERNELS.items():
        caches = getattr(fn, "device_caches", None)
        if caches is not None:
            out[name] = sum(len(c[0]) for c in caches.values())
        else:  # pragma: no cover - triton < 3.2
            out[name] = sum(len(c) for c in getattr(fn, "cache", {}).values())
    return out


def warm_up(num_layers: int, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
            device: torch.device) -> None:
    """Compiles, before serving, every variant a guide of this geometry uses: the paged kernels at
    each tile height the default config picks (it depends on the rows per request: 1, 2-3, 4+ for
    GQA 8), the split reduction, the keep kernel and the "sgl-sdpp" rule's two kernels. Block sizes
    are runtime values, so later KV capacities reuse these (guide/runtime.py: Guide.warm_up calls this
    at load)."""
    device = torch.device(device)
    group = q_heads // kv_heads
    heights = {}
    for rows in (1, 2, 3, 4, 8, 16, 32, 64):
        meta = type("Meta", (), dict(group=group, head_dim=head_dim, num_requests=1,
                                     cu_rows=np.array([0, rows])))
        heights.setdefault(_default_config(meta, dtype, device)["BLOCK_M"], rows)
    page, n_img = 64, 48
    cache = torch.zeros(num_layers, 1, page, kv_heads, head_dim, dtype=dtype, device=device)
    for rows in heights.values():
        queries = torch.zeros(num_layers, rows, q_heads, head_dim, dtype=dtype, device=device)
        imp = visual_importance_paged_triton(
            queries, cache, torch.zeros(1, 1, dtype=torch.int32), torch.tensor([page]), torch.tensor([0, rows]),
            torch.arange(page - rows, page), torch.tensor([0]), torch.tensor([1]), torch.tensor([n_img]))
        keep_set_triton(imp, [0, n_img], counts=[4])
    keep_set_triton(imp, [0, n_img], counts=[4], rules=["sgl-sdpp"], layouts=[(24, n_img)])  # two windows
