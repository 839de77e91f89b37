"""Where the guide meets vLLM's model runner (V1; also the CPU runner's base).

Two hooks, both no-ops unless the runner's model is an SGL wrapper:
- before the multimodal encoder runs, the guide runs for every request whose images are about to
  be encoded and has no keep set yet (batched over those requests), and each image item gets its
  keep indices as an extra kwarg the wrapper's embed_multimodal reads;
- when requests finish, the wrapper writes their trace lines and forgets them.
The runner's multimodal-pruning path (built for video EVS) then rewrites M-RoPE positions from the
positions the wrapper appends to each kept embedding.
"""

from __future__ import annotations

import functools

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
                model.sgl_track(scheduler_output.scheduled_new_reqs)
                if scheduler_output.finished_req_ids:
                    model.sgl_finish(scheduler_output.finished_req_ids)
            return update(self, scheduler_output, *args, **kwargs)

        setattr(_update_states, _PATCHED, True)
        GPUModelRunner._update_states = _update_states
