"""SGL on vLLM's V1 model runner (GPUModelRunner, vllm/v1/worker/gpu_model_runner.py, also the
base of the CPU runner): vLLM 0.32 and 0.33. The contract is vllm_sgl.engine.runners'. Hooks,
installed in every process, each a no-op unless the runner's model carries the SGL marker:

- load_model: after the target loads, the runner gets a GuideRunner (vllm_sgl.engine.guide_runner)
  and loads the guide, inside load_model so vLLM's memory profiling counts it;
- profile_run: after the target's dummy forward, the guide's largest call (CUDA), so the profile's
  peak includes the guide's transient memory;
- state update (every step, even one without target tokens): the guide runs on the step's
  guide-phase work (vllm_sgl.engine.scheduler) before the target's forward; new and finished
  requests are tracked;
- before the multimodal encoder runs: every image to be encoded gets its keep set (fallback), and
  a request whose keep sets were attached there gets its M-RoPE positions again from them
  (integers, on the host, as when it was added), before the step's forward;
- execute_model / sample_tokens: the guide's results and failures ride back to the scheduler on
  the step's ModelRunnerOutput.
vLLM would pick Model Runner V2 on GPUs in 0.33; SGL engines declare themselves unsupported there
(configure), so vLLM keeps them on V1.

Drafting (draft_tokens) is vLLM's out-of-tree `custom_class` proposer, GuideAnswerProposer, which
proposes nothing in the worker: the scheduler makes the drafts (vllm_sgl.engine.draft).
"""

from __future__ import annotations

from typing import Any

from vllm_sgl.engine.guide_runner import GuideRunner
from vllm_sgl.engine.runners import GUIDE_RUNNER_ATTR, attach_guide_results, hook_points, patch_method, supports_sgl

NAME = "v1"
PROPOSER = "vllm_sgl.engine.runners.v1.GuideAnswerProposer"
_HOOK_POINTS = {
    "vllm.v1.worker.gpu_model_runner": ("GPUModelRunner.load_model", "GPUModelRunner.profile_run",
                                        "GPUModelRunner._update_states", "GPUModelRunner._execute_mm_encoder",
                                        "GPUModelRunner._init_mrope_positions",
                                        "GPUModelRunner._calc_mrope_positions",
                                        "GPUModelRunner.execute_model", "GPUModelRunner.sample_tokens"),
    "vllm.config": ("VllmConfig._get_v2_model_runner_unsupported_features",),
    "vllm.v1.core.sched.scheduler": ("Scheduler.update_from_output",),
}


def missing() -> list[str]:
    return hook_points(_HOOK_POINTS)


def _guide(runner) -> GuideRunner | None:
    return getattr(runner, GUIDE_RUNNER_ATTR, None)


def install() -> None:
    from vllm.config import VllmConfig
    from vllm.platforms import current_platform
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runners = [GPUModelRunner]
    if current_platform.is_cpu():  # the CPU runner has its own load_model
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)
    for cls in runners:
        patch_method(cls, "load_model", _load_model)
    patch_method(GPUModelRunner, "profile_run", _profile_run)
    patch_method(GPUModelRunner, "_update_states", _update_states)
    patch_method(GPUModelRunner, "_execute_mm_encoder", _execute_mm_encoder)
    for name in ("execute_model", "sample_tokens"):
        patch_method(GPUModelRunner, name, _returning_guide_results)
    patch_method(VllmConfig, "_get_v2_model_runner_unsupported_features", _v2_unsupported)


# The scheduler makes the drafts: the worker's proposer proposes nothing (vllm_sgl.engine.draft).
SCHEDULER_DRAFTS = True


def configure(vllm_config, cfg) -> None:
    """Nothing beyond install's hooks: the MRv2 opt-out is read per config (_v2_unsupported)."""


def speculative_config(draft_tokens: int) -> dict[str, Any] | None:
    if not draft_tokens:
        return None
    return {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": int(draft_tokens)}


def is_guide_drafting(spec) -> bool:
    return (spec is not None and getattr(spec, "method", None) == "custom_class"
            and getattr(spec, "model", None) == PROPOSER)


def trim_drafts(structured_output_manager, request, draft: list[int]) -> list[int]:
    """A draft as vLLM's scheduler keeps it for a request (its grammar may cut it)."""
    return structured_output_manager.validate_tokens(request, draft)


class GuideAnswerProposer:
    """The worker's side of vLLM's custom_class interface: no drafts come from the worker (the
    scheduler makes them), so it proposes nothing."""

    def __init__(self, vllm_config):
        pass

    def load_model(self, *args, **kwargs) -> None:  # no model: the guide is the GuideRunner's
        pass

    def propose(self, sampled_token_ids, *args, **kwargs) -> list[list[int]]:
        return [[] for _ in sampled_token_ids]


def _v2_unsupported(original):
    def unsupported(self):
        out = original(self)
        if getattr(self.model_config, "model_impl", None) == "sgl":
            out = [*out, "--model-impl sgl"]  # its hooks are this module's, on the V1 runner
        return out

    return unsupported


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
            guide.begin_step(scheduler_output)
        return original(self, scheduler_output, *args, **kwargs)

    return _update_states


def _execute_mm_encoder(original):
    def _execute_mm_encoder(self, scheduler_output, *args, **kwargs):
        guide = _guide(self)
        if guide is not None and scheduler_output.scheduled_encoder_inputs:
            attached = guide.assign_keep_sets(self.requests, scheduler_output.scheduled_encoder_inputs)
            if attached and self.uses_mrope:
                # positions were made without these keep sets: again, before the step's forward (as
                # vLLM's own multimodal-pruning path recomputes them at this point)
                for req_id in attached:
                    self._init_mrope_positions(self.requests[req_id])
                self._calc_mrope_positions(scheduler_output)
                self.mrope_positions.copy_to_gpu(scheduler_output.total_num_scheduled_tokens)
        return original(self, scheduler_output, *args, **kwargs)

    return _execute_mm_encoder


def _returning_guide_results(original):
    def wrapper(self, *args, **kwargs):
        return attach_guide_results(_guide(self), original(self, *args, **kwargs))

    return wrapper
