"""Attention over packed variable-length sequences (a step's images, windows or prompts laid end to
end), described by cumulative lengths (cu_seqlens).

On CUDA with fp16/bf16 it is one call of torch's flash varlen attention
(torch.nn.attention.varlen.varlen_attn) for all sequences. Elsewhere (the CPU the tests run on,
fp32) the same result comes from scaled_dot_product_attention over the sequences grouped by
length: one batched call per distinct length, so a tower's hundreds of equal windows are one call
and there is no per-window Python loop.
"""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

try:  # torch >= 2.9; the GPU machine has 2.11, the CPU machines 2.14
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMS = set(inspect.signature(_varlen_attn).parameters)
except ImportError:  # pragma: no cover - older torch
    _varlen_attn, _VARLEN_PARAMS = None, set()


@dataclass
class Segments:
    """Packed sequences: sequence i is rows cu[i]:cu[i+1] of the packed tensor."""

    lengths: list[int]
    cu: torch.Tensor  # int32 (n + 1,), on the device
    max_len: int
    _groups: list[tuple[int, torch.Tensor]] | None = field(default=None, repr=False)

    @classmethod
    def build(cls, lengths: list[int], device: torch.device) -> "Segments":
        lengths = [int(n) for n in lengths]
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        seg = cls(lengths, cu.to(device), max(lengths, default=0))
        if not _use_varlen(device):
            seg.groups(device)  # built with the layout, off the hot path
        return seg

    def groups(self, device) -> list[tuple[int, torch.Tensor | slice]]:
        """The grouped-SDPA path's batches: (length, rows) per run of consecutive sequences of one
        length (rows: a slice, so the batch is a view) and per remaining length (rows: an index
        (n_l, length) that gathers them). A tower's equal windows are mostly such runs."""
        if self._groups is None:
            starts = list(itertools.accumulate([0, *self.lengths[:-1]]))
            runs: list[tuple[int, int, int]] = []  # (length, first start, count)
            for st, n in zip(starts, self.lengths):
                if runs and runs[-1][0] == n and runs[-1][1] + runs[-1][2] * n == st:
                    runs[-1] = (n, runs[-1][1], runs[-1][2] + 1)
                elif n:
                    runs.append((n, st, 1))
            groups, rest = [], {}
            for n, st, count in runs:
                if count > 1:
                    groups.append((n, slice(st, st + count * n)))
                else:
                    rest.setdefault(n, []).append(st)
            groups += [(n, (torch.tensor(ss)[:, None] + torch.arange(n)).to(device)) for n, ss in rest.items()]
            self._groups = groups
        return self._groups


def _use_varlen(device: torch.device) -> bool:
    return _varlen_attn is not None and torch.device(device).type == "cuda"


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments, causal: bool,
                     scale: float) -> torch.Tensor:
    """q (T, Hq, D), k and v (T, Hkv, D), Hq a multiple of Hkv -> (T, Hq, D): each sequence of
    `seg` attends within itself (causally if `causal`)."""
    if _use_varlen(q.device) and q.dtype in (torch.float16, torch.bfloat16):
        return _flash(q, k, v, seg, causal, scale)
    out = torch.empty_like(q)
    for n, rows in seg.groups(q.device):
        if isinstance(rows, slice):  # consecutive sequences: a view, no gather
            qg, kg, vg = (x[rows].unflatten(0, (-1, n)).transpose(1, 2) for x in (q, k, v))
        else:
            qg, kg, vg = (x[rows].transpose(1, 2) for x in (q, k, v))  # (n_l, H, n, D)
        o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal, scale=scale,
                                           enable_gqa=kg.shape[1] != qg.shape[1]).transpose(1, 2)
        if isinstance(rows, slice):
            out[rows] = o.reshape(-1, *q.shape[1:])
        else:
            out[rows.flatten()] = o.reshape(-1, *q.shape[1:])
    return out


def _flash(q, k, v, seg: Segments, causal: bool, scale: float) -> torch.Tensor:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # split q/k/v are strided views
    if "window_size" in _VARLEN_PARAMS:  # torch >= 2.12: GQA, scale and causal windows built in
        return _varlen_attn(q, k, v, seg.cu, seg.cu, seg.max_len, seg.max_len, scale=scale,
                            window_size=(-1, 0) if causal else (-1, -1), enable_gqa=k.shape[1] != q.shape[1])
    group = q.shape[1] // k.shape[1]
    if group > 1:  # the older API has no GQA
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if "scale" in _VARLEN_PARAMS:
        return _varlen_attn(q, k, v, seg.cu, seg.cu, seg.max_len, seg.max_len, is_causal=causal, scale=scale)
    q = q * (scale * math.sqrt(q.shape[-1]))  # its fixed scale is 1/sqrt(D)
    return _varlen_attn(q, k, v, seg.cu, seg.cu, seg.max_len, seg.max_len, is_causal=causal)
