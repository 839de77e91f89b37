"""Where the guide meets vLLM's model runner (V1; also the CPU runner's base).

Hooks, all no-ops unless the runner's model is an SGL wrapper:
- state update (every step, even one without target tokens): the guide runs on the step's guide
  phase work (vllm_sgl.scheduler) before the target's forward; the results ride back to the
  scheduler on the step's ModelRunnerOutput (execute_model, or sample_tokens when the forward's
  output comes from there); finished requests get their trace lines;
- before the multimodal encoder runs: the fallback for requests that skipped the guide phase (the
  guide runs batched over those whose images lack a keep set).
The runner's multimodal-pruning path (built for video EVS) then rewrites M-RoPE positions from the
positions the wrapper appends to each kept embedding.
"""

from __future__ import annotations

import copy
import functools

from vllm_sgl.protocol import GUIDE_RESULTS, GUIDE_WORK

_PATCHED = "__vllm_sgl_patched__"


def _sgl_model(runner):
    from vllm_sgl.model import SGLModelMixin

    model = getattr(runner, "model", None)
    if model is None:
        return None
    if hasattr(model, "unwrap"):  # CUDA graph wrappers
        model = model.unwrap()
    return model if isinstance(model, SGLModelMixin) else None


def install() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    encode = GPUModelRunner._execute_mm_encoder
    if not getattr(encode, _PATCHED, False):

        @functools.wraps(encode)
        def _execute_mm_encoder(self, scheduler_output, *args, **kwargs):
            model = _sgl_model(self)
            if model is not None and scheduler_output.scheduled_encoder_inputs:
                # The CPU runner never sets this flag, and the GPU runner ties it to video EVS.
                self.is_multimodal_pruning_enabled = True
                model.sgl_assign_keep_sets(self.requests, scheduler_output.scheduled_encoder_inputs)
            return encode(self, scheduler_output, *args, **kwargs)

        setattr(_execute_mm_encoder, _PATCHED, True)
        GPUModelRunner._execute_mm_encoder = _execute_mm_encoder

    update = GPUModelRunner._update_states
    if not getattr(update, _PATCHED, False):

        @functools.wraps(update)
        def _update_states(self, scheduler_output, *args, **kwargs):
            model = _sgl_model(self)
            if model is not None:
                self.is_multimodal_pruning_enabled = True
                work = getattr(scheduler_output, GUIDE_WORK, None)
                if work:
                    model.sgl_guide_phase(work)
                model.sgl_track(scheduler_output.scheduled_new_reqs)
                if scheduler_output.finished_req_ids:
                    model.sgl_finish(scheduler_output.finished_req_ids)
            return update(self, scheduler_output, *args, **kwargs)

        setattr(_update_states, _PATCHED, True)
        GPUModelRunner._update_states = _update_states

    for name in ("execute_model", "sample_tokens"):
        original = getattr(GPUModelRunner, name)
        if not getattr(original, _PATCHED, False):
            wrapped = _returning_guide_results(original)
            setattr(wrapped, _PATCHED, True)
            setattr(GPUModelRunner, name, wrapped)


def _returning_guide_results(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return _attach_guide_results(self, method(self, *args, **kwargs))

    return wrapper


def _attach_guide_results(runner, output):
    """Puts this step's guide results and failures (the model's outbox) on the step's output.
    execute_model returns None when sample_tokens will return the output; then the results wait
    for that call."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, AsyncModelRunnerOutput, ModelRunnerOutput

    model = _sgl_model(runner)
    if model is None or not isinstance(output, (ModelRunnerOutput, AsyncModelRunnerOutput)):
        return output
    results = model.sgl_take_outbox()
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
