"""The kernels for the standalone kernel tools: vllm_sgl.kernels when installed, else kernels/ of
this checkout (a bare GPU machine has no vllm_sgl install)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def import_kernels():
    """(package, importance_triton module)."""
    try:
        return importlib.import_module("vllm_sgl.kernels"), importlib.import_module(
            "vllm_sgl.kernels.importance_triton")
    except ImportError:
        spec = importlib.util.spec_from_file_location("vllm_sgl_kernels", REPO / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(REPO / "kernels")])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["vllm_sgl_kernels"] = pkg
        spec.loader.exec_module(pkg)
        return pkg, importlib.import_module("vllm_sgl_kernels.importance_triton")
