"""Running the benchmarks from a bare copy of the working tree (the GPU machine: torch, triton and
transformers, no install, no vLLM): this checkout's `vllm_sgl` first on sys.path, and
`vllm_sgl.kernels` importable whether or not the vllm_sgl/kernels -> ../kernels link travelled."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def register_kernels() -> str:
    """Puts the repo root first on sys.path and makes `vllm_sgl.kernels` importable: the link if
    it is there, else ./kernels registered under that name (one copy of each module). Returns which."""
    if str(REPO) not in sys.path[:1]:
        sys.path.insert(0, str(REPO))
    import vllm_sgl

    if "vllm_sgl.kernels" in sys.modules:
        return getattr(sys.modules["vllm_sgl.kernels"], "_registered_from", "link")
    if (REPO / "vllm_sgl" / "kernels" / "__init__.py").is_file():
        import vllm_sgl.kernels  # noqa: F401

        return "link"
    spec = importlib.util.spec_from_file_location("vllm_sgl.kernels", REPO / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(REPO / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["vllm_sgl.kernels"] = mod
    spec.loader.exec_module(mod)
    mod._registered_from = "registered ./kernels"
    vllm_sgl.kernels = mod
    return mod._registered_from
