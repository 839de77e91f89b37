"""Importance kernels: the PyTorch definition and the fused Triton kernel (installed as vllm_sgl.kernels).

The Triton names are resolved lazily (module __getattr__) so `import vllm_sgl.kernels` never
imports triton.
"""
from .importance import (BACKENDS, importance_and_keep_set, keep_set, resolve_backend, visual_importance,
                         visual_importance_paged)
from ._args import IMPORTANCES, keep_count, sdpp_scratch_elems
from .importance_ref import (gather_paged_keys, keep_set_ref, sdpp_keep_ref, visual_importance_paged_ref,
                             visual_importance_ref)

# The Triton functions are importable by name but kept out of __all__: a star-import must not
# import triton (see importance.py).
__all__ = [
    "BACKENDS",
    "IMPORTANCES",
    "gather_paged_keys",
    "importance_and_keep_set",
    "keep_count",
    "keep_set",
    "keep_set_ref",
    "resolve_backend",
    "sdpp_keep_ref",
    "sdpp_scratch_elems",
    "visual_importance",
    "visual_importance_paged",
    "visual_importance_paged_ref",
    "visual_importance_ref",
]

_LAZY = {"visual_importance_triton", "visual_importance_paged_triton", "keep_set_triton"}


def __getattr__(name):
    if name in _LAZY:
        from . import importance_triton
        return getattr(importance_triton, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
