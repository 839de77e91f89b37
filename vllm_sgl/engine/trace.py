"""The SGL trace: one JSON line per finished request (`trace_path`), written by the scheduler,
which sees every request finish (aborted ones too) and holds its guide result and SEE decision.

Fields: request_id (the id the user sees: RequestOutput.request_id / the OpenAI id),
num_visual_tokens, keep_indices, guide_answer_ids, guide_finished, guide_confidence,
guide_step_seconds, guide_rank (the tensor-parallel rank that ran the guide for it,
vllm_sgl.engine.parallel), guide_ran, guide_phase ("scheduler": before the target's prefill; "encode":
the worker's fallback; "reused": an identical earlier request's result), target_prompt_len (text + kept visual tokens), target_steps (engine
steps in which the target computed tokens for the request: 0 when SEE answered it),
see_confidence, see_consistency, see_score, see_exit, see_fits (the guide finished and its answer
ends under the request's stop rules: it would exit at a low enough threshold), draft_proposed and
draft_accepted (guide-answer tokens proposed to the target and accepted by it: vllm_sgl.engine.draft),
finish_reason.
"""

from __future__ import annotations

import json
import logging
import os
import re

logger = logging.getLogger("vllm_sgl")

# vLLM's front end makes a request's internal id unique by appending "-" and 8 hex characters
# (InputProcessor.assign_request_id) unless VLLM_DISABLE_REQUEST_ID_RANDOMIZATION is set.
_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def user_request_id(internal_id: str) -> str:
    if os.environ.get("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", "0") not in ("", "0", "false", "False"):
        return internal_id
    return _SUFFIX.sub("", internal_id)


def read_trace(path) -> dict[str, dict]:
    """A trace file's lines keyed by request id (the id the user sees)."""
    with open(path) as f:
        return {rec["request_id"]: rec for rec in map(json.loads, filter(str.strip, f))}


def trace_line(request, reason=None) -> dict:
    g = getattr(request, "sgl_guide", None)
    d = getattr(request, "sgl_see", None)
    reason = request.get_finished_reason() if reason is None else reason
    return {
        "request_id": user_request_id(request.request_id),
        "num_visual_tokens": g.num_visual_tokens if g else [],
        "keep_indices": [k.tolist() for k in g.keep_indices] if g else [],
        "importance": g.importance_rule if g else None,
        "guide_answer_ids": g.answer_ids if g else [],
        "guide_finished": g.finished if g else None,
        "guide_confidence": g.confidence if g else None,
        "guide_step_seconds": g.step_seconds if g else None,
        "guide_rank": g.rank if g else None,
        "guide_ran": g is not None,
        "guide_phase": getattr(request, "sgl_guide_phase", None),
        "target_prompt_len": request.num_prompt_tokens,
        "target_steps": getattr(request, "sgl_target_steps", 0),
        "see_confidence": d.confidence if d else None,
        "see_consistency": d.consistency if d else None,
        "see_score": d.score if d else None,
        "see_exit": bool(d and d.exit),
        "see_fits": bool(d and d.fits),
        "draft_proposed": getattr(request, "sgl_draft_proposed", 0),
        "draft_accepted": getattr(request, "sgl_draft_accepted", 0),
        "finish_reason": str(reason) if reason is not None else None,
    }


class TraceWriter:
    def __init__(self, path: str | None, tokenizer: str | None = None):
        self.path = os.path.expanduser(path) if path else None
        self._tokenizer_name = tokenizer
        self._tokenizer = None

    def _finish_reason(self, request):
        """vLLM's own reason, except for a stop string: the front end finds those in the text and
        then aborts the request in the engine, which the engine cannot tell from a client's abort.
        The client sees "stop", and so does the trace: the output's text holds a stop string."""
        reason = request.get_finished_reason()
        params = request.sampling_params
        if str(reason) != "abort" or params is None or not params.stop or self._tokenizer_name is None:
            return reason
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_name)
        text = self._tokenizer.decode(list(request.output_token_ids), skip_special_tokens=params.skip_special_tokens)
        stops = [params.stop] if isinstance(params.stop, str) else params.stop
        return "stop" if any(s and s in text for s in stops) else reason

    def write(self, request) -> None:
        if self.path is None:
            return
        try:
            line = json.dumps(trace_line(request, self._finish_reason(request)))
            with open(self.path, "a") as f:
                f.write(line + "\n")
        except Exception as exc:  # noqa: BLE001 - a trace must never take the engine down
            logger.warning("SGL: no trace line for request %s: %s", request.request_id, exc)
