"""SGL on Model Runner V2 (vllm/v1/worker/gpu/, GPUModelRunner; the CPU runner subclasses it): the
only runner from vLLM 0.34 on. The contract is vllm_sgl.engine.runners'.

MRv2's own extension points carry most of it:
- a model supplies its per-request state (`get_model_state_cls()`, the SGL wrappers return
  SGLModelState): it owns the worker's GuideRunner, loaded with the model (inside load_model, as
  a drafter's model is, so vLLM's memory profile sees it); gives every image its keep set before
  the encoder runs (the encode-time fallback), and then the request's M-RoPE positions again from
  it (integers, on the host, as at add_request); and runs the guide's largest call in the memory
  profile (dummy_sampler_run, after the target's dummy forward);
- drafting with the guide's answer is a registered speculative method (`sgl_guide`,
  register_speculative_method): GuideAnswerSpeculator proposes, for every decoding request, k
  tokens: the next ones of its guide answer while its output still follows the answer, its last
  token elsewhere (as vLLM's ngram speculator fills a slot it has nothing for; such a slot is
  verified like any draft). Every drafting step is then uniform (query length k + 1), the shape
  MRv2 captures FULL decode CUDA graphs for, and vLLM's scheduler needs nothing from SGL: with
  async scheduling it schedules k placeholder slots per request, without it it fetches the
  worker's drafts (and a grammar trims them) as for any speculator.

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
                                               "DefaultModelState.dummy_sampler_run",
                                               "DefaultModelState.add_request", "DefaultModelState.remove_request"),
    "vllm.v1.worker.gpu.mm.rope": ("RopeState.init_prefill_positions",),
    "vllm.v1.worker.gpu.buffer_utils": ("StagedWriteTensor.stage_write", "StagedWriteTensor.apply_write"),
    "vllm.v1.worker.gpu.spec_decode.speculator": ("BaseSpeculator.propose", "BaseSpeculator.add_request"),
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


# The worker's speculator makes the drafts; the scheduler only counts the guide's share of them.
SCHEDULER_DRAFTS = False


def configure(vllm_config, cfg) -> None:
    """Nothing to change: drafting keeps vLLM's async scheduling (the worker makes the drafts)."""


def speculative_config(draft_tokens: int) -> dict[str, Any] | None:
    if not draft_tokens:
        return None
    return {"method": METHOD, "num_speculative_tokens": int(draft_tokens)}


def is_guide_drafting(spec) -> bool:
    return spec is not None and METHOD in (getattr(spec, "custom_method", None), getattr(spec, "method", None))


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

    class SGLModelState(DefaultModelState):
        """vLLM's default per-request state, plus the guide."""

        def __init__(self, vllm_config, model, encoder_cache, device):
            super().__init__(vllm_config, model, encoder_cache, device)
            self.guide = GuideRunner(vllm_config)
            self.guide.load_model(model)
            self._prefill: dict[str, tuple[int, list[int]]] = {}  # req_id: (slot, prefill token ids)

        def add_request(self, req_index, new_req_data) -> None:
            super().add_request(req_index, new_req_data)
            self._prefill[new_req_data.req_id] = (req_index, new_req_data.prefill_token_ids)

        def remove_request(self, req_id: str) -> None:
            self._prefill.pop(req_id, None)
            super().remove_request(req_id)

        def prepare_inputs_embeds(self, scheduled_encoder_inputs, input_batch, req_states):
            if scheduled_encoder_inputs:  # every image about to be encoded has its keep set
                features = self.encoder_cache.mm_features
                attached = self.guide.assign_keep_sets(
                    {r: _Request(self.guide.prompt_of(r), features[r]) for r in scheduled_encoder_inputs},
                    scheduled_encoder_inputs)
                if attached and self.rope_state is not None:
                    # positions were made without these keep sets; make them again before the forward
                    for r in attached:
                        slot, prefill = self._prefill[r]
                        media = [f for f in features[r] if f.modality != "prompt_embeds"]
                        self.rope_state.init_prefill_positions(slot, self.model, prefill, media)
                    self.apply_staged_writes()
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


def guide_drafts(rows: torch.Tensor, prompt_len: torch.Tensor, total_len: torch.Tensor, token_ids: torch.Tensor,
                 slots: torch.Tensor, last: torch.Tensor, k: int) -> torch.Tensor:
    """The speculator's rule, on the device with no host sync (static shapes, no data-dependent
    reads): (B, k) drafts. rows (B, 1 + W): each request's [limit, answer tokens, -1 ...];
    prompt_len, total_len (B,); token_ids (max_num_reqs, max_model_len): every request's tokens by
    slot; slots (B,) the requests' slots; last (B, 1) their last sampled tokens. A request whose
    output so far equals its answer's start is proposed the next min(limit, k) answer tokens
    (draft.answer_draft_len counts them); every other slot holds its last token."""
    limit, answer = rows[:, :1], rows[:, 1:]
    width = answer.shape[1]
    cols = torch.arange(width, device=rows.device)
    steps = torch.arange(k, device=rows.device)
    prompt_len = prompt_len.long()
    n_out = total_len.long() - prompt_len
    seen = token_ids[slots[:, None], (prompt_len[:, None] + cols).clamp_(max=token_ids.shape[1] - 1)]
    follows = ((seen == answer) | (cols >= n_out[:, None])).all(dim=1, keepdim=True)
    at = n_out[:, None] + steps
    tokens = answer.gather(1, at.clamp(max=width - 1)).long()
    use = follows & (steps < limit) & (at < width) & (tokens >= 0)
    return torch.where(use, tokens, last)


def _speculator_config_cls():
    from vllm.v1.worker.gpu.spec_decode.speculator_config import SpeculatorConfig

    class GuideAnswerSpeculatorConfig(SpeculatorConfig):
        """No draft model: the guide ran in the guide phase; the target's config gives the vocab."""

        speculator_class = f"{__name__}.GuideAnswerSpeculator"

    return GuideAnswerSpeculatorConfig


def _speculator_cls():
    from vllm.v1.worker.gpu.spec_decode.speculator import BaseSpeculator

    class GuideAnswerSpeculator(BaseSpeculator):
        """Proposes k tokens for every decoding request: answer[n : n + limit] after n output
        tokens while the output equals the answer's first n tokens (limit: the request's own
        sgl_draft_tokens, at most k), its last sampled token in every other slot. The same rule
        counts the guide's share for the trace (vllm_sgl.engine.draft.answer_draft_len).

        All on the device, with no host sync: each request slot's row of `table` holds
        [limit, answer tokens, -1 ...], staged (vLLM's StagedWriteTensor: one non-blocking copy)
        when a request takes the slot or its guide result arrives; whether the output still
        follows the answer is read from the request's token history at each step."""

        def __init__(self, vllm_config, device, req_states):
            from vllm.v1.worker.gpu.buffer_utils import StagedWriteTensor

            from vllm_sgl.engine.config import SGLConfig

            self.req_states = req_states
            self.k = int(vllm_config.speculative_config.num_speculative_tokens)
            self.width = SGLConfig.from_additional_config(vllm_config.additional_config).guide_max_tokens
            n = vllm_config.scheduler_config.max_num_seqs
            self.table = StagedWriteTensor((n, 1 + self.width), dtype=torch.int32, device=device)
            self.guide: GuideRunner | None = None  # wired by the runner's first step (_execute_model)
            self._dirty: set[int] = set()  # slots whose row must be written before the next propose

        def init_cudagraph_manager(self, cudagraph_mode) -> None:
            return None

        def capture(self) -> None:
            return None

        def add_request(self, req_index: int) -> None:
            self._dirty.add(req_index)

        def _write_rows(self) -> None:
            index = self.req_states.req_id_to_index
            if self.guide is not None:
                self._dirty.update(index[r] for r in self.guide.take_answered() if r in index)
            if not self._dirty:
                return
            for slot in self._dirty:
                req_id = self.req_states.index_to_req_id.get(slot)
                answer = (self.guide.answer_of(req_id) if self.guide is not None and req_id else None) or []
                answer = answer[: self.width]
                limit = self.guide.draft_limit_of(req_id) if answer else 0
                self.table.stage_write(slot, 0, [limit, *answer] + [-1] * (self.width - len(answer)))
            self._dirty.clear()
            self.table.apply_write()

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
            self._write_rows()
            rs = self.req_states
            # total_len counts this step's sampled tokens (post_update ran before us)
            return guide_drafts(self.table.gpu[idx], rs.prompt_len.gpu[idx], rs.total_len.gpu[idx],
                                rs.all_token_ids.gpu, idx, last, self.k)

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
