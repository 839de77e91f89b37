"""Attention over packed variable-length sequences (a step's images, windows or prompts laid end to
end), described by cumulative lengths (cu_seqlens).

On CUDA with fp16/bf16 it is one call of torch's flash varlen attention
(torch.nn.attention.varlen.varlen_attn) for all sequences. Elsewhere (the CPU the tests run on,
fp32) the same result comes from scaled_dot_product_attention over the sequences grouped by
length: one batched call per distinct length, so a tower's hundreds of equal windows are one call
and there is no per-window Python loop.

varlen_attn's keywords differ between torch releases, so each is checked on its own
(`FlashPlan.of`); what is read from torch's source and what is assumed:
- causal: torch 2.11+ takes `window_size` ((-1, 0) is causal; read in 2.11-era main and 2.14),
  2.10 `is_causal` (assumed from 2.10's wrapper, which had no window_size);
- scale: 2.11+ take `scale`; without it the queries are pre-scaled (its fixed scale is 1/sqrt(D));
- grouped K/V (GQA): 2.12+ take `enable_gqa` (pytorch#179468; 2.14 raises without it when the
  head counts differ). 2.11 has no flag; its wrapper does not check head counts and hands K/V to
  aten's flash forward, which reads grouped heads natively (read in 2.11-era main, not run). Whether
  the installed torch really does is not assumed: the first call per device and dtype runs a small
  probe (`_probe`) against the SDPA path and passes grouped K/V only if that gives the right result,
  else repeats them (and inputs are made contiguous only if strided views are refused). If no form
  works, the SDPA path is used (with a warning), so the guide stays correct.
`flash_plans()` says what was chosen (benchmarks/gpu_check.py prints it).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

try:  # torch >= 2.10; the GPU machine has 2.11, the CPU machines 2.14
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - older torch
    _varlen_attn = None

logger = logging.getLogger("vllm_sgl")


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
        plan = flash_plan(q.device, q.dtype)
        if plan.usable:
            return plan(q, k, v, seg, causal, scale)
    return sdpa_varlen(q, k, v, seg, causal, scale)


def sdpa_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments, causal: bool,
                scale: float) -> torch.Tensor:
    """varlen_attention through scaled_dot_product_attention, one batched call per length group."""
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


@dataclass
class FlashPlan:
    """How one varlen_attn function is called, keyword by keyword (see the module docstring)."""

    fn: object
    causal_kw: str  # "window_size" or "is_causal"
    scale_kw: bool  # takes `scale`; else the queries are pre-scaled
    gqa: str = "repeat"  # grouped K/V: "flag" (enable_gqa=True), "native" (as they are), "repeat"
    contiguous: bool = False  # copy strided q/k/v first (only if the kernel refused views)
    usable: bool = True  # False: no form gave the right result; the SDPA path is used

    @classmethod
    def of(cls, fn) -> "FlashPlan":
        params = set(inspect.signature(fn).parameters)
        return cls(fn, "window_size" if "window_size" in params else "is_causal", "scale" in params,
                   "flag" if "enable_gqa" in params else "native")

    def __call__(self, q, k, v, seg: Segments, causal: bool, scale: float) -> torch.Tensor:
        kw = {}
        if self.causal_kw == "window_size":
            kw["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            kw["is_causal"] = causal
        if self.scale_kw:
            kw["scale"] = scale
        else:
            q = q * (scale * math.sqrt(q.shape[-1]))
        group = q.shape[1] // k.shape[1]
        if group > 1:
            if self.gqa == "flag":
                kw["enable_gqa"] = True
            elif self.gqa == "repeat":
                k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        # Split q/k/v are strided views with a contiguous last dim, which flash reads as they are.
        if self.contiguous:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        elif any(x.stride(-1) != 1 for x in (q, k, v)):
            q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        return self.fn(q, k, v, seg.cu, seg.cu, seg.max_len, seg.max_len, **kw)

    def describe(self) -> dict:
        return dict(causal=self.causal_kw, scale=self.scale_kw, gqa=self.gqa, contiguous=self.contiguous,
                    usable=self.usable)


_PLANS: dict[tuple[str, torch.dtype, int], FlashPlan] = {}  # (device, dtype, id(fn))


def flash_plan(device, dtype: torch.dtype, fn=None) -> FlashPlan:
    """The plan for `fn` (default torch's varlen_attn) on this device and dtype, probed once."""
    fn = _varlen_attn if fn is None else fn
    key = (str(torch.device(device)), dtype, id(fn))
    if key not in _PLANS:
        _PLANS[key] = _probe(FlashPlan.of(fn), torch.device(device), dtype)
        logger.info("SGL: varlen attention on %s %s: %s", device, dtype, _PLANS[key].describe())
    return _PLANS[key]


def flash_plans() -> dict[str, dict]:
    """What every probed plan chose, e.g. {"cuda:0 torch.bfloat16": {"gqa": "native", ...}}."""
    return {f"{d} {t}": p.describe() for (d, t, _), p in _PLANS.items()}


def _probe(plan: FlashPlan, device: torch.device, dtype: torch.dtype) -> FlashPlan:
    """Tries the plan's forms in order of preference (grouped K/V before repeated ones, views before
    copies) on a small grouped, causal case with strided views, as the guide passes them, against
    the SDPA path in fp32; keeps the first that gives the right result."""
    g = torch.Generator().manual_seed(0)
    lengths, hq, hkv, d = [160, 96, 1], 4, 2, 64  # > 128 rows: where torch 2.14 may pick cuDNN
    qkv = torch.randn(sum(lengths), hq + 2 * hkv, d, generator=g)
    want = sdpa_varlen(qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :], Segments.build(lengths, "cpu"),
                       True, 0.3)
    x = qkv.to(device, dtype)
    seg = Segments.build(lengths, device)
    tol = 1e-4 if dtype == torch.float32 else 5e-2  # a wrong head mapping is off by ~0.5
    errors = []
    for gqa, contiguous in itertools.product([plan.gqa, "repeat"], [False, True]):
        trial = FlashPlan(plan.fn, plan.causal_kw, plan.scale_kw, gqa, contiguous)
        try:
            got = trial(x[:, :hq], x[:, hq : hq + hkv], x[:, hq + hkv :], seg, True, 0.3).float().cpu()
        except Exception as exc:  # noqa: BLE001 - a refused form: try the next
            errors.append(f"{trial.describe()}: {type(exc).__name__}: {exc}")
            continue
        if got.shape == want.shape and torch.allclose(got, want, atol=tol, rtol=tol):
            return trial
        errors.append(f"{trial.describe()}: wrong result")
    logger.warning("SGL: varlen_attn gave no correct result on %s %s; using SDPA instead (%s)", device, dtype,
                   "; ".join(errors))
    return FlashPlan(plan.fn, plan.causal_kw, plan.scale_kw, "repeat", True, usable=False)
