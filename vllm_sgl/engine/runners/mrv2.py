"""SGL on Model Runner V2 (vllm/v1/worker/gpu/, GPUModelRunner; the CPU runner subclasses it): the
only runner from vLLM 0.34 on. The contract is vllm_sgl.engine.runners'.

MRv2's own extension points carry most of it:
- a model supplies its per-request state (`get_model_state_cls()`, the SGL wrappers return
  SGLModelState): it owns the worker's GuideRunner, loaded with the model (inside load_model, as
  a drafter's model is, so vLLM's memory profile sees it); opens the multimodal-pruning path
  (MultiModalPruner, which vLLM builds only for video EVS) so the kept tokens' own M-RoPE positions
  replace the placeholders'; gives every image its keep set before the encoder runs (the
  encode-time fallback); and runs the guide's largest call in the memory profile
  (dummy_sampler_run, after the target's dummy forward);
- drafting with the guide's answer is a registered speculative method (`sgl_guide`,
  register_speculative_method): GuideAnswerSpeculator proposes the next tokens of each request's
  guide answer, which MRv2's rejection sampler verifies.

One place is patched (`_step`): GPUModelRunner.execute_model and sample_tokens, the step's entry
and exit. MRv2 has no hook that runs on every step (a step with guide work may schedule no target
token, and then execute_model returns before any model-state hook) and no way to put extra fields on
the step's output: the guide phase runs at the step's entry, and its results ride back on the
step's output (vllm_sgl.engine.protocol). A pluggable-component RFC for MRv2 (vLLM #51212) would
make this an extension point.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from vllm_sgl.engine.guide_runner import GuideRunner
from vllm_sgl.engine.runners import GUIDE_RUNNER_ATTR, attach_guide_results, hook_points, patch_method

NAME = "mrv2"
METHOD = "sgl_guide"  # the registered speculative method
_HOOK_POINTS = {
    "vllm.v1.worker.gpu.model_runner": ("GPUModelRunner.execute_model", "GPUModelRunner.sample_tokens"),
    "vllm.v1.worker.gpu.model_states.default": ("DefaultModelState.prepare_inputs_embeds",
                                               "DefaultModelState.dummy_sampler_run"),
    "vllm.v1.worker.gpu.model_states.mm_pruning": ("MultiModalPruner.recompute",),
    "vllm.v1.worker.gpu.spec_decode.speculator": ("BaseSpeculator.propose",),
    "vllm.v1.worker.gpu.spec_decode.speculator_config": ("register_speculative_method", "SpeculatorConfig"),
    "vllm.v1.core.sched.scheduler": ("Scheduler.update_from_output",),
}


def missing() -> list[str]:
    return hook_points(_HOOK_POINTS)


def install() -> None:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    from vllm.v1.worker.gpu.spec_decode.speculator_config import register_speculative_method

    register_speculative_method(METHOD, f"{__name__}.GuideAnswerSpeculatorConfig")  # idempotent for one class
    _step(GPUModelRunner)


def configure(vllm_config, cfg) -> None:
    """Drafting with the guide's answer needs each step's output before the next step's drafts are
    counted (the scheduler makes them, vllm_sgl.engine.draft): such engines schedule synchronously,
    as vLLM's V1 runner did with any proposer of its own."""
    if cfg.draft_tokens and vllm_config.scheduler_config.async_scheduling:
        vllm_config.scheduler_config.async_scheduling = False


def speculative_config(draft_tokens: int) -> dict[str, Any] | None:
    if not draft_tokens:
        return None
    return {"method": METHOD, "num_speculative_tokens": int(draft_tokens)}


def is_guide_drafting(spec) -> bool:
    return spec is not None and METHOD in (getattr(spec, "custom_method", None), getattr(spec, "method", None))


def trim_drafts(structured_output_manager, request, draft: list[int]) -> list[int]:
    return structured_output_manager.trim_spec_tokens(request, draft)


# -- the model's state -------------------------------------------------------------------------


class _Request(NamedTuple):
    """What GuideRunner.assign_keep_sets reads of a request (V1 passes its CachedRequestState)."""

    prompt_token_ids: list[int]
    mm_features: list[Any]


def model_state_cls():
    """SGLModelState, built on first use: its base class is vLLM's (imported only on MRv2)."""
    global _MODEL_STATE_CLS
    if _MODEL_STATE_CLS is None:
        _MODEL_STATE_CLS = _make_model_state_cls()
    return _MODEL_STATE_CLS


_MODEL_STATE_CLS = None


def _make_model_state_cls():
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState
    from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner

    class SGLModelState(DefaultModelState):
        """vLLM's default per-request state, plus the guide."""

        def __init__(self, vllm_config, model, encoder_cache, device):
            super().__init__(vllm_config, model, encoder_cache, device)
            if self.mm_pruner is None and encoder_cache is not None and self.rope_state is not None:
                # vLLM builds the pruner only with video_pruning_rate > 0 (EVS); SGL prunes images
                self.mm_pruner = MultiModalPruner(model, self.rope_state, encoder_cache,
                                                  self.model_config.get_inputs_embeds_size())
            self.guide = GuideRunner(vllm_config)
            self.guide.load_model(model)

        def prepare_inputs_embeds(self, scheduled_encoder_inputs, input_batch, req_states):
            if scheduled_encoder_inputs:  # every image about to be encoded has its keep set
                features = self.encoder_cache.mm_features
                self.guide.assign_keep_sets(
                    {r: _Request(self.guide.prompt_of(r), features[r]) for r in scheduled_encoder_inputs},
                    scheduled_encoder_inputs)
            return super().prepare_inputs_embeds(scheduled_encoder_inputs, input_batch, req_states)

        def dummy_sampler_run(self, sampler, hidden_states) -> bool:
            # inside vLLM's profile_run, after the target's dummy forward: the guide's peak counts
            self.guide.profile_run()
            return super().dummy_sampler_run(sampler, hidden_states)

    return SGLModelState


# -- the patched place: the step's entry and exit ----------------------------------------------


def _guide(runner) -> GuideRunner | None:
    return getattr(getattr(runner, "model_state", None), "guide", None)


def _step(cls) -> None:
    """execute_model: the guide phase and request bookkeeping before vLLM's step, the speculator
    wired to the guide; execute_model and sample_tokens: the step's guide results on its output."""
    patch_method(cls, "execute_model", _execute_model)
    patch_method(cls, "sample_tokens", _sample_tokens)


def _execute_model(original):
    def execute_model(self, scheduler_output, *args, **kwargs):
        guide = _guide(self)
        if guide is not None:
            if getattr(self, GUIDE_RUNNER_ATTR, None) is None:
                setattr(self, GUIDE_RUNNER_ATTR, guide)
                if isinstance(self.speculator, globals().get("GuideAnswerSpeculator", ())):
                    self.speculator.guide = guide
            guide.begin_step(scheduler_output)
        return attach_guide_results(guide, original(self, scheduler_output, *args, **kwargs))

    return execute_model


def _sample_tokens(original):
    def sample_tokens(self, *args, **kwargs):
        return attach_guide_results(_guide(self), original(self, *args, **kwargs))

    return sample_tokens


# -- drafting with the guide's answer ----------------------------------------------------------


def _speculator_config_cls():
    from vllm.v1.worker.gpu.spec_decode.speculator_config import SpeculatorConfig

    class GuideAnswerSpeculatorConfig(SpeculatorConfig):
        """No draft model: the guide ran in the guide phase; the target's config gives the vocab."""

        speculator_class = f"{__name__}.GuideAnswerSpeculator"

    return GuideAnswerSpeculatorConfig


def _speculator_cls():
    from vllm.v1.worker.gpu.spec_decode.speculator import BaseSpeculator

    class GuideAnswerSpeculator(BaseSpeculator):
        """Proposes, per request, the guide's answer from the target's current output length on:
        answer[n : n + k] after n output tokens. The scheduler decides how many of them each
        request verifies (0 once the output left the answer; vllm_sgl.engine.draft), so only
        answer tokens that follow an output equal to the answer's start are ever checked; the rest
        of a row is the last sampled token, a valid id that is never scheduled.

        All on the device: the answers sit in a (max_num_reqs, guide_max_tokens + k) table by
        request slot, filled when a request first drafts in a slot."""

        def __init__(self, vllm_config, device, req_states):
            from vllm_sgl.engine.config import SGLConfig

            self.req_states = req_states
            self.k = int(vllm_config.speculative_config.num_speculative_tokens)
            width = SGLConfig.from_additional_config(vllm_config.additional_config).guide_max_tokens + self.k
            n = vllm_config.scheduler_config.max_num_seqs
            self.answers = torch.full((n, width), -1, dtype=torch.int64, device=device)
            self.owner: list[str | None] = [None] * n  # the request whose answer a row holds
            self.steps = torch.arange(self.k, device=device)
            self.guide: GuideRunner | None = None  # wired by the runner's first step (_execute_model)

        def init_cudagraph_manager(self, cudagraph_mode) -> None:
            return None

        def capture(self) -> None:
            return None

        def _fill(self, req_ids, idx) -> None:
            for req_id, row in zip(req_ids, idx):
                if self.owner[row] == req_id:
                    continue
                self.owner[row] = req_id
                answer = self.guide.answer_of(req_id) if self.guide is not None else None
                self.answers[row].fill_(-1)
                if answer:
                    a = torch.tensor(answer[: self.answers.shape[1]], dtype=torch.int64)
                    self.answers[row, : len(a)] = a.to(self.answers.device)

        @torch.inference_mode()
        def propose(self, input_batch, attn_metadata, slot_mappings, last_hidden_states, aux_hidden_states,
                    num_sampled, num_rejected, last_sampled, next_prefill_tokens, temperature, seeds,
                    dp_sync_state=None, dummy_run=False, skip_attn_for_dummy_run=False, mm_inputs=None,
                    is_profile=False, num_speculative_tokens=None) -> torch.Tensor:
            num_reqs = input_batch.num_reqs
            idx = input_batch.idx_mapping[:num_reqs]
            last = last_sampled[idx].reshape(num_reqs, -1)[:, :1]  # (B, 1)
            if dummy_run:
                return last.expand(num_reqs, self.k).clone()
            self._fill(input_batch.req_ids[:num_reqs], input_batch.idx_mapping_np[:num_reqs].tolist())
            rs = self.req_states
            # output tokens so far, this step's sampled ones included (post_update ran before us)
            n_out = (rs.total_len.gpu[idx] - rs.prompt_len.gpu[idx]).long()
            cols = (n_out[:, None] + self.steps[None, :]).clamp_(max=self.answers.shape[1] - 1)
            drafts = self.answers[idx[:, None], cols]
            return torch.where(drafts >= 0, drafts, last)

    return GuideAnswerSpeculator


def __getattr__(name):
    # vLLM resolves the registered names by qualified name; their bases are vLLM 0.34's, imported
    # only when vLLM asks (this module is also imported on vLLMs without MRv2, for the contract).
    if name == "GuideAnswerSpeculatorConfig":
        cls = _speculator_config_cls()
    elif name == "GuideAnswerSpeculator":
        cls = _speculator_cls()
    else:
        raise AttributeError(name)
    globals()[name] = cls
    return cls
