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


def trace_line(request) -> dict:
    g = getattr(request, "sgl_guide", None)
    d = getattr(request, "sgl_see", None)
    reason = request.get_finished_reason()
    return {
        "request_id": user_request_id(request.request_id),
        "num_visual_tokens": g.num_visual_tokens if g else [],
        "keep_indices": [k.tolist() for k in g.keep_indices] if g else [],
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
    def __init__(self, path: str | None):
        self.path = os.path.expanduser(path) if path else None

    def write(self, request) -> None:
        if self.path is None:
            return
        try:
            line = json.dumps(trace_line(request))
            with open(self.path, "a") as f:
                f.write(line + "\n")
        except (OSError, TypeError, ValueError) as exc:  # a trace must never take the engine down
            logger.warning("SGL: no trace line for request %s: %s", request.request_id, exc)
