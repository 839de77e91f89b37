"""The vLLM model runners SGL runs on: one adapter module per runner, each with the same contract,
and the one place in the engine that knows which vLLM is installed (the next vLLM change lands in
one adapter).

- v1:   vLLM's V1 model runner (vllm/v1/worker/gpu_model_runner.py, also the base of the CPU
        runner): vLLM 0.32 and 0.33, where SGL engines are kept on it.
- mrv2: Model Runner V2 (vllm/v1/worker/gpu/): the only runner from vLLM 0.34 on, GPU and CPU.

The contract, per adapter module:
    NAME                              "v1" or "mrv2"
    missing() -> list[str]            the vLLM hook points it needs that this vLLM lacks (none: usable)
    install()                         its hooks, idempotent, in every process (the plugin calls it)
    configure(vllm_config, cfg)       an SGL engine being configured (VllmConfig.__post_init__)
    speculative_config(draft_tokens)  vLLM's speculative_config that drafts with the guide's answer
    is_guide_drafting(spec) -> bool   whether a SpeculativeConfig is that one
    SCHEDULER_DRAFTS                  True: the scheduler makes each step's drafts (vllm_sgl.engine.
                                      draft) and the adapter has trim_drafts(structured_output_manager,
                                      request, draft); False: the worker makes them (vLLM schedules
                                      them as any speculator's) and the scheduler only counts them
Every hook is a no-op unless the model carries the SGL marker (`supports_sgl`).
"""

from __future__ import annotations

from importlib.util import find_spec
from types import ModuleType

# The releases SGL is tested with (README, "GPU install"): 0.32 on this CPU build and on GPUs,
# 0.33 (V1 runner), 0.34 (Model Runner V2). Another release with every hook point runs with a
# start-up warning; one that lacks a hook point gets vanilla vLLM and a refused --model-impl sgl.
TESTED_VLLM = ("0.32.0", "0.33.0", "0.34.0")

GUIDE_RUNNER_ATTR = "sgl_guide"  # on the object that owns the worker's GuideRunner
_PATCHED = "__vllm_sgl_patched__"


def patch_method(cls, name: str, make) -> None:
    """cls.name = make(original), once (plugins load more than once per process); a method the
    class does not define itself is left alone (the adapters' missing() reports it)."""
    import functools

    original = cls.__dict__.get(name)
    if original is None or getattr(original, _PATCHED, False):
        return
    patched = functools.wraps(original)(make(original))
    setattr(patched, _PATCHED, True)
    setattr(cls, name, patched)


def supports_sgl(model) -> bool:
    """The capability check, a marker attribute like vLLM's supports_multimodal_pruning."""
    if model is not None and hasattr(model, "unwrap"):  # CUDA graph wrappers
        model = model.unwrap()
    return bool(getattr(model, "supports_sgl", False))


def select() -> ModuleType:
    """The adapter of the runner SGL engines use on the installed vLLM: V1 while vLLM has it
    (SGL keeps its engines there, as before MRv2 existed), else MRv2."""
    if find_spec("vllm.v1.worker.gpu_model_runner") is not None:
        from vllm_sgl.engine.runners import v1 as adapter
    else:
        from vllm_sgl.engine.runners import mrv2 as adapter
    return adapter


def hook_points(spec: dict[str, tuple[str, ...]]) -> list[str]:
    """Of {module: (attribute path, ...)}, the ones this vLLM lacks, as "module:Class.attr"."""
    import importlib

    missing = []
    for module, paths in spec.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            missing.append(module)
            continue
        for path in paths:
            obj = mod
            for part in path.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    missing.append(f"{module}:{path}")
                    break
    return missing


def attach_guide_results(guide, output):
    """Puts the step's guide results and failures (the GuideRunner's outbox) on the step's output
    (protocol.GUIDE_RESULTS). An execute_model that returns None leaves the output to
    sample_tokens; then the results wait for that call. vLLM's shared empty output is copied."""
    import copy

    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, AsyncModelRunnerOutput, ModelRunnerOutput

    from vllm_sgl.engine.protocol import GUIDE_RESULTS

    if guide is None or not isinstance(output, (ModelRunnerOutput, AsyncModelRunnerOutput)):
        return output
    results = guide.take_outbox()
    if not results:
        return output

    def with_results(out):
        if out is EMPTY_MODEL_RUNNER_OUTPUT:
            out = copy.copy(out)
        setattr(out, GUIDE_RESULTS, results)
        return out

    if isinstance(output, ModelRunnerOutput):
        return with_results(output)
    get_output = output.get_output
    output.get_output = lambda: with_results(get_output())
    return output
