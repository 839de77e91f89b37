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
request's guide answer, its output tokens and its own sgl_draft_tokens: it sets how many draft
tokens each request verifies in the next step. vLLM's speculative decoding also needs a proposer
in the worker, which the runner adapter supplies (vllm_sgl.engine.runners): on the V1 runner
vLLM's `custom_class` interface with a proposer that proposes nothing (the scheduler's tokens are
the ones verified); on Model Runner V2, whose verified tokens come from the worker, a registered
speculator that proposes the same answer tokens. Either way the engine core is told not to fetch
drafts from the workers after every step (vllm_sgl.engine.plugin), an RPC per step that would bring
back nothing the scheduler lacks (measured on V1: about half of what drafting costs on this CPU
when it never helps, benchmarks/README.md).
"""

from __future__ import annotations


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
