"""Backend dispatch for SGL importance and keep sets.

backend="auto": the fused Triton kernel for CUDA tensors, the PyTorch definition otherwise.
Triton is imported lazily, only when the Triton backend is chosen: importing it changes what vLLM
believes is available, and engine processes must never run with TRITON_INTERPRET.
"""
from __future__ import annotations

import importlib.util
import logging
import os

import torch

from ._args import check_importance_args, check_keep_args
from .importance_ref import keep_set_ref, visual_importance_paged_ref, visual_importance_ref

logger = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "triton")
_warned_no_triton = False


def _triton_module():
    from . import importance_triton  # noqa: PLC0415 (lazy on purpose, see module docstring)
    return importance_triton


def _device_of(x, name: str) -> torch.device:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor")
    return x.device


def _pick(backend: str, device: torch.device) -> str:
    global _warned_no_triton
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        if importlib.util.find_spec("triton") is None:
            if not _warned_no_triton:
                logger.warning("triton is not installed: SGL importance falls back to the PyTorch path")
                _warned_no_triton = True
            return "torch"
        return "triton"
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # Checked before importing triton so this error path leaves the process untouched.
        raise RuntimeError(
            "backend='triton' got CPU tensors, but Triton has no CPU backend: use CUDA tensors, "
            "backend='torch' (or 'auto'), or set TRITON_INTERPRET=1 before triton is first imported "
            "(Triton's interpreter, for tests only)")
    return backend


def resolve_backend(backend: str, device) -> str:
    """The backend ("torch" or "triton") that `backend` runs as for tensors on `device`."""
    return _pick(backend, torch.device(device))


def visual_importance(queries, keys, cu_rows, row_pos, cu_keys, image_req, image_start, image_len,
                      sm_scale=None, backend: str = "auto") -> torch.Tensor:
    """fp32 importance (sum(image_len),) of every visual token; see importance_ref for the definition."""
    # Both backends validate through the same checks (kernels/_args.py): same ValueErrors either way.
    if _pick(backend, _device_of(queries, "queries")) == "triton":
        return _triton_module().visual_importance_triton(
            queries, keys, cu_rows, row_pos, cu_keys, image_req, image_start, image_len, sm_scale)
    return visual_importance_ref(queries, keys, cu_rows, row_pos, cu_keys, image_req, image_start, image_len,
                                 sm_scale)


def visual_importance_paged(queries, key_cache, block_table, seq_lens, cu_rows, row_pos, image_req, image_start,
                            image_len, sm_scale=None, backend: str = "auto") -> torch.Tensor:
    """visual_importance with keys read through a block table from key_cache (num_layers, num_blocks,
    block_size, Hkv, D); block_table (B, max_blocks); seq_lens (B,) keys per request."""
    if _pick(backend, _device_of(queries, "queries")) == "triton":
        return _triton_module().visual_importance_paged_triton(
            queries, key_cache, block_table, seq_lens, cu_rows, row_pos, image_req, image_start, image_len,
            sm_scale)
    return visual_importance_paged_ref(queries, key_cache, block_table, seq_lens, cu_rows, row_pos, image_req,
                                       image_start, image_len, sm_scale)


def keep_set(importance, cu_image, keep_ratio=None, backend: str = "auto", *, counts=None, rules=None,
             layouts=None, scratch: torch.Tensor | None = None):
    """(keep_idx, cu_keep): per image max(1, floor(keep_ratio*N)) indices (or counts[i]: the engine
    passes the target's placeholder counts), ascending, chosen by the image's rule (rules[i] in
    IMPORTANCES, default "sgl": the most important; "sgl-sdpp" also needs layouts[i] = (width, plane)).
    scratch: fp32 on importance's device, at least sdpp_scratch_elems(N, k of the "sgl-sdpp" images)
    elements: the "sgl-sdpp" rule works in it instead of allocating (None: it allocates)."""
    if _pick(backend, _device_of(importance, "importance")) == "triton":
        return _triton_module().keep_set_triton(importance, cu_image, keep_ratio, counts=counts, rules=rules,
                                                layouts=layouts, scratch=scratch)
    return keep_set_ref(importance, cu_image, keep_ratio, counts=counts, rules=rules, layouts=layouts,
                        scratch=scratch)


def importance_and_keep_set(queries, keys, cu_rows, row_pos, cu_keys, image_req, image_start, image_len,
                            keep_ratio, sm_scale=None, backend: str = "auto"):
    """Returns (importance, keep_idx, cu_keep): visual_importance followed by keep_set."""
    meta = check_importance_args(queries, keys, cu_rows, row_pos, cu_keys, image_req, image_start, image_len,
                                 sm_scale)
    cu_image = torch.as_tensor(meta.cu_image, dtype=torch.int64)
    # keep_ratio is checked before the (expensive) importance pass.
    check_keep_args(torch.zeros(meta.total_visual), cu_image, keep_ratio)
    imp = visual_importance(queries, keys, cu_rows, row_pos, cu_keys, image_req, image_start, image_len,
                            sm_scale, backend)
    keep_idx, cu_keep = keep_set(imp, cu_image, keep_ratio, backend)
    return imp, keep_idx, cu_keep
