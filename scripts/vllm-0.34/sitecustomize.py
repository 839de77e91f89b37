"""Loaded by Python at start-up from the vLLM 0.34 test environment's site folder (.vllm-0.34/site,
first on PYTHONPATH; scripts/with-vllm-0.34.sh). 0.34 has no CPU build: its x86 CPU platform wants
a Triton with a CPU backend (triton-cpu, not on PyPI). Triton's interpreter (TRITON_INTERPRET=1)
runs Model Runner V2's kernels instead, once vLLM believes Triton is usable:

- vllm.triton_utils.importing.HAS_TRITON is set true after that module's own check;
- vllm.v1.sample.ops.topk_topp_sampler keeps HAS_TRITON false: its top-k/top-p kernel fails in the
  interpreter (InterpreterError: 'int' object has no attribute 'to'); its PyTorch path runs.

A test environment for the newest vLLM on these CPU machines, not a user install (see README).
"""

import importlib.abc
import importlib.machinery
import sys

_SET = {"vllm.triton_utils.importing": True, "vllm.v1.sample.ops.topk_topp_sampler": False}


class _SetHasTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _SET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_set(module):
            exec_module(module)
            module.HAS_TRITON = _SET[name]

        spec.loader.exec_module = exec_and_set
        return spec


sys.meta_path.insert(0, _SetHasTriton())
