"""The engine's guide (vllm_sgl.guide.Guide) on its own: its batched decode gives, request for
request, what the reference's one-request greedy gives, and its importance/keep sets are the
definition's."""

from __future__ import annotations

import pytest
import torch

from engine_utils import MIXED
from vllm_sgl.guide import Guide, GuideRequest
from vllm_sgl.reference import keep_count, prepare_input, top_k_keep


@pytest.fixture(scope="module")
def guide_and_requests(tiny_pair):
    from transformers import AutoProcessor

    guide_dir = tiny_pair[0]
    processor = AutoProcessor.from_pretrained(guide_dir)
    guide = Guide(guide_dir, device="cpu", dtype=torch.float32, max_tokens=8, importance_backend="torch")
    preps, requests = [], []
    for i, case in enumerate(c for c in MIXED if c.images):
        prep = prepare_input(processor, case.pil_images(), case.question)
        preps.append(prep)
        requests.append(
            GuideRequest(
                request_id=str(i),
                prompt_ids=prep.input_ids.tolist(),
                pixel_values=prep.pixel_values,  # the processor's output is normalised already
                image_grid_thw=prep.image_grid_thw,
                keep_counts=[keep_count(n, 0.25) for _, n in prep.visual_spans],
            )
        )
    return guide, preps, requests


def test_batched_decode_matches_one_request_greedy(guide_and_requests):
    guide, preps, requests = guide_and_requests
    batched = guide.run(requests)
    # rows finished at different steps shared the batch
    assert len({len(r.answer_ids) for r in batched}) > 1, [r.answer_ids for r in batched]
    for prep, req, res in zip(preps, requests, batched):
        with torch.inference_mode():
            embeds = guide.vlm.input_embeddings(prep)
            answer, top1, _ = guide.vlm.greedy(embeds, guide.vlm.positions(prep), 8, explicit=False)
        assert res.answer_ids == answer, req.request_id
        alone = guide.run([req])[0]
        assert alone.answer_ids == res.answer_ids
        for imp_batched, imp_alone, keep, k in zip(res.importance, alone.importance, res.keep_indices, req.keep_counts):
            torch.testing.assert_close(imp_batched, imp_alone, rtol=1e-5, atol=1e-6)
            assert torch.equal(keep, top_k_keep(imp_batched, k))
        assert res.num_visual_tokens == [n for _, n in prep.visual_spans]
        assert 0.0 < res.confidence <= 1.0


def test_prompt_span_count_must_match_images(guide_and_requests):
    guide, _, requests = guide_and_requests
    bad = GuideRequest(**{**requests[0].__dict__, "keep_counts": requests[0].keep_counts + [3]})
    with pytest.raises(ValueError, match="image spans in the prompt but 2 images"):
        guide.run([bad])
