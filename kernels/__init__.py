"""Importance kernels: the PyTorch definition and the fused Triton kernel (installed as vllm_sgl.kernels).

The Triton names are resolved lazily (module __getattr__) so `import vllm_sgl.kernels` never
imports triton.
"""
from .importance import BACKENDS, importance_and_keep_set, keep_set, visual_importance
from .importance_ref import keep_set_ref, visual_importance_ref

__all__ = [
    "BACKENDS",
    "importance_and_keep_set",
    "keep_set",
    "keep_set_ref",
    "keep_set_triton",
    "visual_importance",
    "visual_importance_ref",
    "visual_importance_triton",
]

_LAZY = {"visual_importance_triton", "keep_set_triton"}


def __getattr__(name):
    if name in _LAZY:
        from . import importance_triton
        return getattr(importance_triton, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
