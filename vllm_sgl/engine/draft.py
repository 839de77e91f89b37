"""Speculative decoding with the guide's answer as the draft (the SGL setting draft_tokens).

Before the target's prefill is scheduled, the guide has written its whole greedy answer to the
same question with the same tokenizer (the guide phase). For every request the target then
decodes, that answer is a draft that cost nothing. vLLM's speculative decoding does the rest: the
scheduler gives each draft token a slot in the target's next forward, the rejection sampler keeps
the longest prefix the target agrees with (greedy: exactly its own tokens; sampled: exactly its
own distribution), and rejected slots are rolled back.

The rule, per request: while the target's output so far equals the start of the guide's answer,
the next tokens of the answer are proposed. After the first disagreement the answer has nothing
more to offer (the prefix test fails at every later step). The draft stops before the request's
own first stop token (its end-of-sequence included, unless it ignores it): the step that would
accept it yields the target's own next token, that same stop token, anyway; so each accepted draft
token is exactly one target step saved. Requests
without a guide answer (no images, guide failed) and requests whose answer is spent propose
nothing; exited requests never reach the target.

Where the drafts are made: in the scheduler (vllm_sgl.engine.scheduler), which holds each
request's guide answer, its output tokens and its own sgl_draft_tokens. vLLM's speculative decoding
still needs a proposer in the worker, so the engine runs vLLM's out-of-tree `custom_class`
interface with GuideAnswerProposer, which proposes nothing there; and the engine core is told not
to fetch drafts from the workers after every step (vllm_sgl.engine.plugin), an RPC per step that
would only ever bring back empty lists (measured: about half of what drafting costs on this CPU
when it never helps, benchmarks/README.md).
"""

from __future__ import annotations

from typing import Any

PROPOSER = "vllm_sgl.engine.draft.GuideAnswerProposer"


def speculative_config(draft_tokens: int) -> dict[str, Any] | None:
    """vLLM's speculative_config for draft_tokens (None: drafting off)."""
    if not draft_tokens:
        return None
    return {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": int(draft_tokens)}


def is_guide_drafting(speculative_config) -> bool:
    return (
        speculative_config is not None
        and getattr(speculative_config, "method", None) == "custom_class"
        and getattr(speculative_config, "model", None) == PROPOSER
    )


def next_draft(answer, output, k: int, stops=()) -> list[int]:
    """The draft for one request: the k answer tokens after `output` if `output` is a prefix of
    `answer`, else none; cut before the first of the request's stop tokens."""
    n = len(output)
    if k <= 0 or n >= len(answer) or list(answer[:n]) != list(output):
        return []
    draft = []
    for t in answer[n:n + k]:
        if t in stops:
            break
        draft.append(int(t))
    return draft


class GuideAnswerProposer:
    """The worker's side of vLLM's custom_class interface: no drafts come from the worker (the
    scheduler makes them), so it proposes nothing."""

    def __init__(self, vllm_config):
        pass

    def load_model(self, *args, **kwargs) -> None:  # no model: the guide is the GuideRunner's
        pass

    def propose(self, sampled_token_ids, *args, **kwargs) -> list[list[int]]:
        return [[] for _ in sampled_token_ids]
