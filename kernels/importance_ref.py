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

import numpy as np
import torch

from ._args import (SDPP_EPS, SDPP_LANES, SDPP_SIGMA, SDPP_SIM_LEN, SDPP_THETA, SDPP_WINDOW,  # noqa: F401
                    check_importance_args, check_keep_args, check_keep_rules, check_paged_args, check_sdpp_scratch,
                    keep_count, sdpp_scratch_elems, sdpp_scratch_views, sdpp_window_grid)


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
                 scratch: torch.Tensor | None = None, _sdpp_eps: float = SDPP_EPS):
    """Per image, k = max(1, floor(keep_ratio * N)) (or counts[i]) token indices (within the image),
    ascending, chosen by the image's rule (rules[i], default "sgl": the k most important, ties to
    the lower index; "sgl-sdpp": sdpp_keep_ref, which needs layouts[i], computed for all such images
    at once by sdpp_keep_batch). Returns (keep_idx int64 flat, cu_keep int64 (I+1,)).
    scratch: fp32, at least sdpp_scratch_elems of the "sgl-sdpp" images, used instead of allocating.
    _sdpp_eps: tests only (reaches the spent-gain fallback)."""
    cu, k = check_keep_args(importance, cu_image, keep_ratio, counts)
    sdpp, lay = check_keep_rules(cu, rules, layouts)
    device = importance.device
    n = np.diff(cu)
    check_sdpp_scratch(scratch, sdpp_scratch_elems(n[sdpp], k[sdpp]), device)
    parts = [top_k_ref(importance[int(cu[i]):int(cu[i + 1])], int(k[i])) for i in range(k.shape[0])]
    spread = k[sdpp] < n[sdpp]  # keeping every token needs no choice
    if spread.any():
        imgs = sdpp[spread]
        kept = sdpp_keep_batch(importance, cu[imgs], n[imgs], k[imgs], lay[spread], [parts[i] for i in imgs],
                               scratch=scratch, eps=_sdpp_eps)
        for i, part in zip(imgs, kept):
            parts[i] = part
    keep_idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)
    cu_keep = torch.zeros(k.shape[0] + 1, dtype=torch.int64)
    cu_keep[1:] = torch.as_tensor(k).cumsum(0)
    return keep_idx.to(torch.int64), cu_keep.to(device)


def top_k_ref(v: torch.Tensor, k: int) -> torch.Tensor:
    """The "sgl" keep set of one image: its k most important tokens, ascending, ties to the lower index."""
    # A stable descending sort keeps equal values in index order: ties go to the lower index.
    top = torch.sort(v.float(), descending=True, stable=True).indices[:k]
    return torch.sort(top).values


def _alpha(theta: float) -> float:
    return theta / (2 * (1 - theta))


def sdpp_quality(v: torch.Tensor, theta: float = SDPP_THETA) -> torch.Tensor:
    """The DPP's quality of each token of one image: exp(alpha * importance scaled to [0, 1] by the
    image's min and max), alpha = theta / (2 (1 - theta))."""
    v = v.float()
    lo, hi = v.min(), v.max()
    return torch.exp(_alpha(theta) * ((v - lo) / (hi - lo + 1e-6)))


def sdpp_quality_batch(importance: torch.Tensor, shift: torch.Tensor, lens: torch.Tensor, total: int,
                       out: torch.Tensor) -> torch.Tensor:
    """sdpp_quality of several images back to back into out (total elements): image j's tokens are
    importance[s + shift[j]] for its slots s, lens[j] of them. The same fp32 operations per element as
    sdpp_quality, and sync-free (both backends compute q with it)."""
    seg = torch.repeat_interleave(lens, output_size=total)
    v = importance.index_select(0, torch.arange(total, device=out.device) + shift.index_select(0, seg)).float()
    lo = torch.full(lens.shape, float("inf"), device=out.device).scatter_reduce_(0, seg, v, "amin")
    hi = torch.full(lens.shape, float("-inf"), device=out.device).scatter_reduce_(0, seg, v, "amax")
    lo, hi = lo.index_select(0, seg), hi.index_select(0, seg)
    return torch.sub(v, lo, out=out).div_(hi - lo + 1e-6).mul_(_alpha(SDPP_THETA)).exp_()


def sdpp_similarity(out: torch.Tensor, sigma: float = SDPP_SIGMA) -> torch.Tensor:
    """S by squared distance d = dy^2 + dx^2 inside a window: out[d] = exp(-d / (2 sigma^2)), as
    sdpp_keep_ref computes it."""
    d = torch.arange(SDPP_SIM_LEN, dtype=torch.float32, device=out.device)
    return torch.mul(d, -1.0 / (2.0 * sigma * sigma), out=out).exp_()


def sdpp_budgets(keep_idx: torch.Tensor, slot_shift: torch.Tensor, ks: torch.Tensor, geo: torch.Tensor,
                 num_windows: int, total_k: int) -> torch.Tensor:
    """k_w of every window: how many of its image's top-k tokens it holds. Image j's top-k indices are
    keep_idx[s + slot_shift[j]] for its slots s (ks[j] of them); geo[j] = (plane, width, first window,
    windows per plane, windows per window row). int64, sync-free (scatter_add_ into zeros)."""
    img = torch.repeat_interleave(ks, output_size=total_k)
    t = keep_idx.index_select(0, torch.arange(total_k, device=keep_idx.device) + slot_shift.index_select(0, img))
    plane, width, win0, wpp, nwx = geo.index_select(0, img).unbind(1)
    wid = win0 + t // plane * wpp + (t % plane) // width // SDPP_WINDOW * nwx + t % width // SDPP_WINDOW
    return torch.zeros(num_windows, dtype=torch.int64, device=keep_idx.device).scatter_add_(0, wid, torch.ones_like(wid))


def sdpp_geometry(win) -> np.ndarray:
    """geo of sdpp_budgets, per image, from sdpp_window_grid's windows."""
    return np.stack([win.layout_plane, win.layout_width, win.win0, win.wpp, win.nwx], 1).astype(np.int64)


def sdpp_windows(importance: torch.Tensor, cu_image, counts, layouts):
    """The windows of every image (all taken as "sgl-sdpp") and their budgets: (windows, k_w), windows
    an (W, 6) int64 array of (image, plane, y0, x0, height, width) in (image, plane, a, b) order,
    k_w an int64 tensor (W,) whose sum over an image's windows is its k. Its greedy runs max(k_w)
    dependent steps at most (0 steps in a window with k_w = its size)."""
    cu, k = check_keep_args(importance, cu_image, counts=counts)
    n = np.diff(cu)
    lay = check_keep_rules(cu, ["sgl-sdpp"] * n.shape[0], layouts)[1]
    win = sdpp_window_grid(n, lay)
    tops = torch.cat([top_k_ref(importance[int(cu[i]):int(cu[i + 1])], int(k[i])) for i in range(n.shape[0])])
    kw = sdpp_budgets(tops, torch.zeros(n.shape[0], dtype=torch.int64, device=importance.device),
                      torch.as_tensor(k, device=importance.device), torch.as_tensor(sdpp_geometry(win), device=importance.device),
                      win.num, int(k.sum()))
    return np.stack([win.image, win.plane, win.y0, win.x0, win.height, win.width], 1), kw


def sdpp_keep_batch(importance: torch.Tensor, starts, lens, ks, layouts, tops, *, scratch=None,
                    eps: float = SDPP_EPS) -> list[torch.Tensor]:
    """sdpp_keep_ref of several images at once (image j: importance[starts[j]:starts[j] + lens[j]],
    ks[j] < lens[j] kept, layouts[j], tops[j] its top-k): every window of every image in one (W, 256)
    tensor, lane l at row l // 16, column l % 16 of its window, greedy step i for the windows that
    still take a token. Each element sees the fp32 operations of sdpp_keep_ref in its order, so the
    result is bitwise sdpp_keep_ref's (and the Triton kernel's). Returns each image's keep set."""
    dev = importance.device
    lens, ks = np.asarray(lens, dtype=np.int64), np.asarray(ks, dtype=np.int64)
    total, total_k = int(lens.sum()), int(ks.sum())
    win = sdpp_window_grid(lens, layouts)
    qbase = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    if scratch is None:
        scratch = torch.empty(sdpp_scratch_elems(lens, ks), dtype=torch.float32, device=dev)
    sim, q, c = sdpp_scratch_views(scratch, total)
    sdpp_similarity(sim)
    sdpp_quality_batch(importance, torch.as_tensor(np.asarray(starts) - qbase, device=dev),
                       torch.as_tensor(lens, device=dev), total, q)
    kw = sdpp_budgets(torch.cat(tops), torch.zeros(len(lens), dtype=torch.int64, device=dev),
                      torch.as_tensor(ks, device=dev), torch.as_tensor(sdpp_geometry(win), device=dev),
                      win.num, total_k).cpu().numpy()

    # windows in order of decreasing steps: step i runs on a prefix of them
    size = win.height * win.width
    steps = np.where(kw < size, kw, 0)
    order = np.argsort(-steps, kind="stable")
    w_of = lambda a: torch.as_tensor(a[order], device=dev)[:, None]  # noqa: E731
    lane = torch.arange(SDPP_LANES, device=dev)
    ly, lx = lane // SDPP_WINDOW, lane % SDPP_WINDOW
    ok = (ly < w_of(win.height)) & (lx < w_of(win.width))
    slot = w_of(qbase[win.image] + win.tok0) + ly * w_of(win.layout_width[win.image]) + lx  # q's slot of each lane
    slot = torch.where(ok, slot, 0)
    qw = torch.where(ok, q[slot], 0.0)
    d2 = torch.where(ok, qw * qw, float("-inf"))  # -inf: taken or no token
    rows, c_at = [], 0
    for i in range(int(steps.max(initial=0))):
        a = int((steps > i).sum())
        g = d2[:a]
        best, j = g.max(1).values, g.argmax(1)  # argmax: the first maximum, the lower index
        spent = best <= eps  # the rest go by quality
        j = torch.where(spent, torch.where(g != float("-inf"), qw[:a], float("-inf")).argmax(1), j)[:, None]
        dist = (ly - j // SDPP_WINDOW) ** 2 + (lx - j % SDPP_WINDOW) ** 2
        row = qw[:a].gather(1, j) * sim[dist] * qw[:a]
        for r in range(i):
            c_r = rows[r][:a]
            row = row - c_r.gather(1, j) * c_r
        e = c[c_at:c_at + a * SDPP_LANES].view(a, SDPP_LANES)
        torch.div(row, sqrt_rn(best)[:, None], out=e).masked_fill_(spent[:, None], 0.0)
        c_at += a * SDPP_LANES
        rows.append(e)
        d2[:a] = torch.where(lane == j, float("-inf"), g - e * e)
    kept = ok & ((d2 == float("-inf")) | w_of(kw >= size))  # k_w = |w|: the whole window
    at = torch.sort(slot[kept]).values  # q's slots: images back to back, each ascending
    return [part - int(b) for part, b in zip(torch.split(at, ks.tolist()), qbase)]


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """The IEEE (correctly rounded) fp32 square root on every device, as the kernel's sqrt_rn:
    torch.sqrt of fp32 on the CPU (MKL) is 1 ulp off for ~1 input in 6; through fp64 it is exact."""
    return torch.sqrt(x.double()).float()


def _greedy_window(q: torch.Tensor, yy: torch.Tensor, xx: torch.Tensor, k: int, sigma: float,
                   eps: float) -> torch.Tensor:
    """The greedy MAP of L = diag(q) S diag(q) on one window's tokens (ascending image index): which
    of them it takes (bool)."""
    n = q.numel()
    taken = torch.zeros(n, dtype=torch.bool, device=q.device)
    if k >= n:
        return ~taken
    d2 = q * q
    c = torch.zeros(k, n, dtype=torch.float32, device=q.device)
    neg_inv = -1.0 / (2.0 * sigma * sigma)
    for i in range(k):
        gain = d2.masked_fill(taken, float("-inf"))
        j = int(torch.argmax(gain))  # torch.argmax returns the first maximal index
        if float(gain[j]) <= eps:
            j = int(torch.argmax(q.masked_fill(taken, float("-inf"))))
            e = torch.zeros(n, dtype=torch.float32, device=q.device)
        else:
            row = q[j] * torch.exp(((yy - yy[j]) ** 2 + (xx - xx[j]) ** 2) * neg_inv) * q
            for r in range(i):
                row = row - c[r, j] * c[r]
            e = row / sqrt_rn(gain[j])
        c[i] = e
        d2 = d2 - e * e
        taken[j] = True
    return taken


def sdpp_keep_ref(v: torch.Tensor, k: int, width: int, plane: int, sigma: float = SDPP_SIGMA,
                  theta: float = SDPP_THETA, eps: float = SDPP_EPS) -> torch.Tensor:
    """The "sgl-sdpp" keep set of one image (ascending indices), fp32, the plain definition.

    q = sdpp_quality(importance) over the whole image. Each plane (token t: plane t // plane, row
    (t % plane) // width, column t % width) is cut into windows of 16 x 16 tokens (smaller at the
    edges); window w keeps k_w tokens, k_w = how many of the image's top-k ("sgl") it holds. In each
    window alone: the greedy MAP of the DPP with kernel L_ij = q_i S_ij q_j, S_ij = exp(-|p_i - p_j|^2
    / (2 sigma^2)) at grid points p (row, column): k_w steps, each takes the token of largest
    remaining gain d_j^2 (ties: lower index) and conditions the others on it (incremental Cholesky,
    Chen et al. 2018, as CDPruner); once the best gain is <= eps the rest go by quality. k_w = the
    window's size keeps it whole."""
    v = v.float()
    n = v.numel()
    if k >= n:
        return torch.arange(n, device=v.device)
    q = sdpp_quality(v, theta)
    t = torch.arange(n, device=v.device)
    pl, yy, xx = t // plane, (t % plane) // width, t % width
    window = pl * plane + yy // SDPP_WINDOW * SDPP_WINDOW * width + xx // SDPP_WINDOW * SDPP_WINDOW  # its first token
    top = torch.zeros(n, dtype=torch.bool, device=v.device)
    top[top_k_ref(v, k)] = True
    taken = torch.zeros(n, dtype=torch.bool, device=v.device)
    for w in torch.unique(window).tolist():  # the order of windows does not matter: they are independent
        m = torch.nonzero(window == w).flatten()
        taken[m] = _greedy_window(q[m], yy[m].float(), xx[m].float(), int(top[m].sum()), sigma, eps)
    return torch.nonzero(taken).flatten()
