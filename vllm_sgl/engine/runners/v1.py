"""Where the guide meets vLLM's model runner: the one place that knows the V1 runner's methods
(GPUModelRunner, also the base of the CPU runner). Installed by the plugin in every process;
every hook is a no-op unless the runner's model carries the SGL marker (`supports_sgl`).

- load_model: after the target loads, the runner gets a GuideRunner (vllm_sgl.engine.guide_runner)
  and loads the guide, inside load_model so vLLM's memory profiling counts it;
- profile_run: after the target's dummy forward, the guide's largest call (CUDA), so the profile's
  peak includes the guide's transient memory;
- state update (every step, even one without target tokens): the guide runs on the step's
  guide-phase work (vllm_sgl.engine.scheduler) before the target's forward; new and finished
  requests are tracked;
- before the multimodal encoder runs: every image to be encoded gets its keep set (fallback);
- execute_model / sample_tokens: the guide's results and failures ride back to the scheduler on
  the step's ModelRunnerOutput.
The runner's multimodal-pruning path (built for video EVS) then rewrites M-RoPE positions from the
positions the wrapper appends to each kept embedding.
"""

from __future__ import annotations

import copy
import functools

from vllm_sgl.engine.guide_runner import GuideRunner
from vllm_sgl.engine.protocol import GUIDE_RESULTS, GUIDE_WORK

_PATCHED = "__vllm_sgl_patched__"
GUIDE_RUNNER_ATTR = "sgl_guide"  # on the model runner: its GuideRunner


def supports_sgl(model) -> bool:
    """The capability check, a marker attribute like vLLM's supports_multimodal_pruning."""
    if model is not None and hasattr(model, "unwrap"):  # CUDA graph wrappers
        model = model.unwrap()
    return bool(getattr(model, "supports_sgl", False))


def _guide(runner) -> GuideRunner | None:
    return getattr(runner, GUIDE_RUNNER_ATTR, None)


def _patch(cls, name: str, make) -> None:
    original = cls.__dict__.get(name)
    if original is None or getattr(original, _PATCHED, False):
        return
    patched = functools.wraps(original)(make(original))
    setattr(patched, _PATCHED, True)
    setattr(cls, name, patched)


def install() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runners = [GPUModelRunner]
    if current_platform.is_cpu():  # the CPU runner has its own load_model
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)
    for cls in runners:
        _patch(cls, "load_model", _load_model)
    _patch(GPUModelRunner, "profile_run", _profile_run)
    _patch(GPUModelRunner, "_update_states", _update_states)
    _patch(GPUModelRunner, "_execute_mm_encoder", _execute_mm_encoder)
    for name in ("execute_model", "sample_tokens"):
        _patch(GPUModelRunner, name, _returning_guide_results)


def _load_model(original):
    def load_model(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if supports_sgl(getattr(self, "model", None)) and _guide(self) is None:
            guide = GuideRunner(self.vllm_config)
            guide.load_model(self.model)
            setattr(self, GUIDE_RUNNER_ATTR, guide)
        return out

    return load_model


def _profile_run(original):
    def profile_run(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        guide = _guide(self)
        if guide is not None:
            guide.profile_run()
        return out

    return profile_run


def _update_states(original):
    def _update_states(self, scheduler_output, *args, **kwargs):
        guide = _guide(self)
        if guide is not None:
            # The CPU runner never sets this flag, and the GPU runner ties it to video EVS.
            self.is_multimodal_pruning_enabled = True
            work = getattr(scheduler_output, GUIDE_WORK, None)
            if work:
                guide.guide_phase(work)
            guide.track(scheduler_output.scheduled_new_reqs)
            if scheduler_output.finished_req_ids:
                guide.finish(scheduler_output.finished_req_ids)
        return original(self, scheduler_output, *args, **kwargs)

    return _update_states


def _execute_mm_encoder(original):
    def _execute_mm_encoder(self, scheduler_output, *args, **kwargs):
        guide = _guide(self)
        if guide is not None and scheduler_output.scheduled_encoder_inputs:
            self.is_multimodal_pruning_enabled = True
            guide.assign_keep_sets(self.requests, scheduler_output.scheduled_encoder_inputs)
        return original(self, scheduler_output, *args, **kwargs)

    return _execute_mm_encoder


def _returning_guide_results(original):
    def wrapper(self, *args, **kwargs):
        return _attach_guide_results(self, original(self, *args, **kwargs))

    return wrapper


def _attach_guide_results(runner, output):
    """Puts this step's guide results and failures (the guide runner's outbox) on the step's output.
    execute_model returns None when sample_tokens will return the output; then the results wait
    for that call."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, AsyncModelRunnerOutput, ModelRunnerOutput

    guide = _guide(runner)
    if guide is None or not isinstance(output, (ModelRunnerOutput, AsyncModelRunnerOutput)):
        return output
    results = guide.take_outbox()
    if not results:
        return output

    def with_results(out):
        if out is EMPTY_MODEL_RUNNER_OUTPUT:  # a shared instance
            out = copy.copy(out)
        setattr(out, GUIDE_RESULTS, results)
        return out

    if isinstance(output, ModelRunnerOutput):
        return with_results(output)
    get_output = output.get_output
    output.get_output = lambda: with_results(get_output())
    return output
