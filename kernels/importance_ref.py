"""The PyTorch definition of SGL visual-token importance and keep sets (the spec the kernel matches).

importance[image][j] = sum over layers l, query heads h, rows q in Q(image) of
    softmax_t( (q . k_t) * sm_scale  for t in 0..pos(q) )[key of visual token j]
where Q(image) = the given rows of the image's request with pos(q) > image_start + N - 1, the
softmax is the real causal one (over every key the row attends to, text and visual alike), query
head h reads KV head h // (Hq // Hkv), and everything is computed in fp32 from the (upcast) inputs.

Plain and readable on purpose: it materialises one (Hq, rows, keys) score matrix per layer and
request. Use the Triton kernel (importance_triton) for speed.
"""
from __future__ import annotations

import torch

from ._args import (SDPP_EPS, SDPP_SIGMA, SDPP_THETA, check_importance_args, check_keep_args,  # noqa: F401
                    check_keep_rules, check_paged_args, keep_count)


def visual_importance_ref(queries, keys, cu_rows, row_pos, cu_keys, image_req, image_start, image_len,
                          sm_scale=None) -> torch.Tensor:
    """Returns fp32 importance of shape (sum(image_len),); image i at cu_image[i]:cu_image[i+1]."""
    meta = check_importance_args(queries, keys, cu_rows, row_pos, cu_keys, image_req, image_start,
                                 image_len, sm_scale)
    device = queries.device
    out = torch.zeros(meta.total_visual, dtype=torch.float32, device=device)
    pos_all = torch.as_tensor(meta.row_pos, device=device)
    for b in range(meta.num_requests):
        images = [i for i in range(meta.num_images) if meta.image_req[i] == b]
        r0, r1 = int(meta.cu_rows[b]), int(meta.cu_rows[b + 1])
        k0, k1 = int(meta.cu_keys[b]), int(meta.cu_keys[b + 1])
        if not images or r1 == r0:
            continue
        pos = pos_all[r0:r1]
        causal = torch.arange(k1 - k0, device=device)[None, :] <= pos[:, None]  # (rows, keys)
        for layer in range(meta.num_layers):
            q = queries[layer, r0:r1].float()  # (rows, Hq, D)
            k = keys[layer, k0:k1].float().repeat_interleave(meta.group, dim=1)  # (keys, Hq, D)
            logits = torch.einsum("rhd,thd->hrt", q, k) * meta.sm_scale
            probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
            for i in images:
                start, n = int(meta.image_start[i]), int(meta.image_len[i])
                in_q = pos > start + n - 1
                c = int(meta.cu_image[i])
                out[c:c + n] += probs[:, in_q, start:start + n].sum(dim=(0, 1))
    return out


def gather_paged_keys(key_cache, block_table, seq_lens) -> torch.Tensor:
    """Dense (num_layers, sum(seq_lens), Hkv, D) keys from a paged cache: request b's key t is
    key_cache[:, block_table[b, t // block_size], t % block_size]."""
    block_size = key_cache.shape[2]
    table = torch.as_tensor(block_table, device="cpu").long()
    parts = []
    for b, n in enumerate(torch.as_tensor(seq_lens).tolist()):
        t = torch.arange(n)
        blocks, offs = table[b, t // block_size], t % block_size
        parts.append(key_cache[:, blocks.to(key_cache.device), offs.to(key_cache.device)])
    if not parts:
        return key_cache.new_zeros((key_cache.shape[0], 0) + tuple(key_cache.shape[3:]))
    return torch.cat(parts, dim=1)


def visual_importance_paged_ref(queries, key_cache, block_table, seq_lens, cu_rows, row_pos, image_req,
                                image_start, image_len, sm_scale=None) -> torch.Tensor:
    """visual_importance_ref with keys read from a paged cache (see gather_paged_keys)."""
    meta, table = check_paged_args(queries, key_cache, block_table, seq_lens, cu_rows, row_pos, image_req,
                                   image_start, image_len, sm_scale)
    keys = gather_paged_keys(key_cache, table, seq_lens)
    return visual_importance_ref(queries, keys, cu_rows, row_pos, meta.cu_keys, image_req, image_start,
                                 image_len, sm_scale)


def keep_set_ref(importance, cu_image, keep_ratio=None, *, counts=None, rules=None, layouts=None,
                 _sdpp_eps: float = SDPP_EPS):
    """Per image, k = max(1, floor(keep_ratio * N)) (or counts[i]) token indices (within the image),
    ascending, chosen by the image's rule (rules[i], default "sgl": the k most important, ties to
    the lower index; "sgl-sdpp": sdpp_keep_ref, which needs layouts[i]). Returns (keep_idx int64
    flat, cu_keep int64 (I+1,)). _sdpp_eps: tests only (reaches the spent-gain fallback)."""
    cu, k = check_keep_args(importance, cu_image, keep_ratio, counts)
    sdpp, lay = check_keep_rules(cu, rules, layouts)
    spread = {int(i): (int(w), int(p)) for i, (w, p) in zip(sdpp, lay)}
    device = importance.device
    parts = []
    for i in range(k.shape[0]):
        v = importance[int(cu[i]):int(cu[i + 1])].float()
        if i in spread:
            parts.append(sdpp_keep_ref(v, int(k[i]), *spread[i], eps=_sdpp_eps))
            continue
        # A stable descending sort keeps equal values in index order: ties go to the lower index.
        top = torch.sort(v, descending=True, stable=True).indices[: int(k[i])]
        parts.append(torch.sort(top).values)
    keep_idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)
    cu_keep = torch.zeros(k.shape[0] + 1, dtype=torch.int64)
    cu_keep[1:] = torch.as_tensor(k).cumsum(0)
    return keep_idx.to(torch.int64), cu_keep.to(device)


def sdpp_quality(v: torch.Tensor, theta: float = SDPP_THETA) -> torch.Tensor:
    """The DPP's quality of each token: exp(alpha * importance scaled to [0, 1]), alpha = theta / (2 (1 - theta))."""
    v = v.float()
    lo, hi = v.min(), v.max()
    return torch.exp((theta / (2 * (1 - theta))) * ((v - lo) / (hi - lo + 1e-6)))


def sdpp_keep_ref(v: torch.Tensor, k: int, width: int, plane: int, sigma: float = SDPP_SIGMA,
                  theta: float = SDPP_THETA, eps: float = SDPP_EPS) -> torch.Tensor:
    """The "sgl-sdpp" keep set of one image (ascending indices): the greedy MAP of the DPP with kernel
    L_ij = q_i S_ij q_j, q = sdpp_quality(importance), S_ij = exp(-|p_i - p_j|^2 / (2 sigma^2)) for
    tokens i, j of the same plane at grid points p (row, column; 0 across planes). Each step takes
    the token of largest remaining gain d_j^2 (ties: lower index) and conditions the others on it
    (incremental Cholesky, Chen et al. 2018, as CDPruner); once every gain is <= eps the rest go
    by quality (a guard: with the shipped sigma fp32 gains stay far above it). fp32, in the order the Triton kernel computes it."""
    v = v.float()
    n = v.numel()
    if k >= n:  # every token: no choice to make (and no O(N^3) greedy)
        return torch.arange(n, device=v.device)
    q = sdpp_quality(v, theta)
    t = torch.arange(n, device=v.device)
    pl, yy, xx = t // plane, ((t % plane) // width).float(), (t % width).float()
    d2 = q * q
    c = torch.zeros(k, n, dtype=torch.float32, device=v.device)
    taken = torch.zeros(n, dtype=torch.bool, device=v.device)
    neg_inv = -1.0 / (2.0 * sigma * sigma)
    for i in range(k):
        gain = d2.masked_fill(taken, float("-inf"))
        j = int(torch.argmax(gain))  # torch.argmax returns the first maximal index
        if float(gain[j]) <= eps:
            j = int(torch.argmax(q.masked_fill(taken, float("-inf"))))
            e = torch.zeros(n, dtype=torch.float32, device=v.device)
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
