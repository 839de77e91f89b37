"""Speculative decoding with the guide's answer as the draft (the SGL setting draft_tokens).

Before the target's prefill is scheduled, the guide has written its whole greedy answer to the
same question with the same tokenizer (the guide phase). For every request the target then
decodes, that answer is a draft that cost nothing. vLLM's speculative decoding does the rest: the
scheduler gives each draft token a slot in the target's next forward, the rejection sampler keeps
the longest prefix the target agrees with (greedy: exactly its own tokens; sampled: exactly its
own distribution), and rejected slots are rolled back.

Why vLLM's `custom_class` proposer: it is vLLM's one out-of-tree proposer interface, so the
scheduling of draft slots, verification, KV rollback and the spec-decode metrics stay vLLM's.
Its `propose` gets the batch by rows, without request ids; the runner hook
(vllm_sgl.engine.runner_hooks) binds the proposer to the model runner, whose input batch names
each row's request, and to the runner's GuideRunner, which holds each request's guide answer.

The rule, per row: the target's output so far is the token table after the prompt; while it equals
the start of the guide's answer, the next tokens of the answer are proposed. After the first
disagreement the answer has nothing more to offer (the prefix test fails at every later step).
Rows without a guide answer (no images, guide failed) and rows whose answer is spent propose
nothing; exited requests never reach the target. A request's own sgl_draft_tokens is applied by
the scheduler, which trims its draft (vllm_sgl.engine.scheduler).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger("vllm_sgl")

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


def next_draft(answer, output, k: int) -> list[int]:
    """The draft for one request: the k answer tokens after `output` if `output` is a prefix of
    `answer`, else none."""
    n = len(output)
    if k <= 0 or n >= len(answer) or not np.array_equal(np.asarray(answer[:n]), np.asarray(output)):
        return []
    return [int(t) for t in answer[n:n + k]]


class GuideAnswerProposer:
    """vLLM's custom_class proposer: built by the model runner from the VllmConfig, bound to the
    runner and its GuideRunner by the load_model hook."""

    def __init__(self, vllm_config):
        self.k = int(vllm_config.speculative_config.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.runner = None
        self.guide = None

    def load_model(self, *args, **kwargs) -> None:  # no model: the guide is the GuideRunner's
        pass

    def bind(self, runner, guide) -> None:
        self.runner, self.guide = runner, guide

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None) -> list[list[int]]:
        drafts: list[list[int]] = []
        if self.runner is None:  # not an SGL target (nothing bound it): never propose
            return [[] for _ in sampled_token_ids]
        batch = self.runner.input_batch
        for i, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens_no_spec[i])
            room = min(self.k, self.max_model_len - n)
            answer = self.guide.answer_for(batch.req_ids[i], self.runner.requests) if sampled and room > 0 else None
            if not answer:
                drafts.append([])
                continue
            prompt = int(batch.num_prompt_tokens[i])
            drafts.append(next_draft(answer, token_ids_cpu[i, prompt:n], room))
        return drafts
