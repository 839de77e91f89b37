"""SEE (guide early exit) in the engine (../shared/SGL_METHOD.md): which requests may exit, and
whether one does once the guide has answered it. Pure functions of vLLM's request objects; the
scheduler (vllm_sgl.engine.scheduler) asks them and carries the exit out.

A request may exit only when its target output would be a greedy answer the guide can stand in
for: SEE on (the engine's see_threshold or the request's own sgl_see_threshold), greedy
(temperature 0), no logprobs, no structured output, no ignore_eos, no LoRA adapter. It exits when
the guide finished its answer (end of sequence within guide_max_tokens), the answer ends under the
request's own stop rules the way the target's would (end-of-sequence or a stop token, within
max_tokens and after min_tokens; the checks of vLLM's check_stop, applied to the guide's tokens),
and fuse(confidence, consistency) >= the threshold. Stop strings are applied to the exit's tokens
by vLLM's front end like to any output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vllm_sgl.engine.protocol import SEE_THRESHOLD_KWARG, request_field
from vllm_sgl.pruning import FUSES


@dataclass
class SeeDecision:
    confidence: float
    consistency: float | None
    score: float | None
    exit: bool
    tokens: list[int]  # what the request answers with when it exits
    stopped_by: int | None = None  # a stop token id (vLLM's stop_reason), None for end-of-sequence
    fits: bool = False  # the guide finished and its answer ends under the request's stop rules


def request_threshold(request, default: float | None) -> float | None:
    """The exit threshold that applies to `request`, or None when it may not exit."""
    threshold = default
    value = request_field(request.mm_features, SEE_THRESHOLD_KWARG)
    if value is not None:
        threshold = None if math.isnan(float(value)) else float(value)  # NaN: the request turned SEE off
    sp = request.sampling_params
    if threshold is None or sp is None:
        return None
    from vllm.sampling_params import SamplingType

    if (
        sp.sampling_type != SamplingType.GREEDY
        or sp.n != 1
        or sp.logprobs is not None
        or sp.prompt_logprobs is not None
        or sp.structured_outputs is not None
        or sp.ignore_eos
        or getattr(request, "lora_request", None) is not None
    ):
        return None
    return threshold


def answer_as_output(answer: list[int], request, max_model_len: int) -> tuple[list[int], int | None] | None:
    """The guide's answer cut as vLLM's check_stop would cut the target's output of these tokens:
    (tokens, stop token or None) when it ends by end-of-sequence or a stop token within max_tokens
    and min_tokens; None when it would not end there (cut by length, or not ended at all)."""
    sp = request.sampling_params
    prompt = request.num_prompt_tokens
    for i, tok in enumerate(answer):
        n = i + 1
        stop = tok == sp.eos_token_id or tok in (sp.stop_token_ids or ())
        if stop:
            if n < (sp.min_tokens or 0):
                return None  # the target's sampler blocks stop tokens until min_tokens: it would go on
            return answer[:n], (None if tok == sp.eos_token_id else tok)
        if n >= request.max_tokens or prompt + n >= max_model_len:
            return None  # the target would be cut by length here: no exit
    return None


def decide(request, result, threshold: float, fuse: str, max_model_len: int) -> SeeDecision:
    if result.consistency is None:
        return SeeDecision(result.confidence, None, None, False, [])
    score = FUSES[fuse](result.confidence, result.consistency)
    cut = answer_as_output(result.answer_ids, request, max_model_len) if result.finished else None
    if cut is None:
        return SeeDecision(result.confidence, result.consistency, score, False, [])
    return SeeDecision(result.confidence, result.consistency, score, score >= threshold, cut[0], cut[1], fits=True)
