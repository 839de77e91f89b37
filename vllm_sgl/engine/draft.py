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

Where the drafts are made depends on the model runner (vllm_sgl.engine.runners):
- V1 (vLLM 0.32/0.33): in the scheduler (vllm_sgl.engine.scheduler), which holds each request's
  guide answer, its output tokens and its own sgl_draft_tokens: next_draft sets what each request
  verifies in the next step, and vLLM's `custom_class` proposer in the worker proposes nothing. The
  engine core is told not to fetch drafts from the workers after every step (vllm_sgl.engine.
  plugin), an RPC that would bring back nothing (measured: about half of what drafting costs on
  this CPU when it never helps, benchmarks/README.md).
- Model Runner V2 (vLLM 0.34): in the worker, whose drafts are the ones MRv2 verifies: a registered
  speculator proposes k tokens for every decoding request, answer tokens by the same rule
  (answer_draft_len, no cut at stop tokens: the slot is verified anyway) and the request's last
  token in the other slots, so every drafting step has the uniform shape vLLM's async scheduling and
  FULL decode CUDA graphs need. The scheduler counts the guide's share for the trace.
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


def answer_draft_len(answer, output, k: int) -> int:
    """How many guide-answer tokens Model Runner V2's speculator proposes for a request after
    `output` (its other draft slots hold filler): the k answer tokens after `output` if `output`
    is a prefix of `answer`, else none."""
    n = len(output)
    if k <= 0 or n >= len(answer) or list(answer[:n]) != list(output):
        return 0
    return min(k, len(answer) - n)
