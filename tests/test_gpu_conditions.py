"""What SGL's engine path would hit on a GPU, recreated on the CPU (the engine cannot run on the GPU
machine): positions in a bf16 model, host syncs, vLLM's memory profile, the uniform draft batches
CUDA graphs need, the encoder budget, and a guide workspace that never grows inside a serving step.
The engine runs themselves (bf16, torch.compile on, repeated requests drafting) are in
test_engine.py and test_draft.py.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from engine_utils import MRV2_ONLY

# -- positions: integers from the keep set, never through the embeddings' dtype -----------------


def _image_feature(grid, keep, offset):
    from vllm.multimodal.inputs import (MultiModalBatchedField, MultiModalFeatureSpec, MultiModalFieldElem,
                                        MultiModalKwargsItem, PlaceholderRange)

    from vllm_sgl.engine.protocol import KEEP_KWARG

    field = MultiModalBatchedField(keep_on_cpu=True)
    item = MultiModalKwargsItem({"image_grid_thw": MultiModalFieldElem(data=torch.tensor(grid), field=field),
                                 KEEP_KWARG: MultiModalFieldElem(data=keep, field=field)})
    return MultiModalFeatureSpec(data=item, modality="image", identifier="image",
                                 mm_position=PlaceholderRange(offset=offset, length=len(keep)))


@pytest.mark.both
def test_kept_positions_are_exact_integers_past_256_merged_rows():
    """A 112 x 14000 px image (500 x 4 merged tokens): the wrapper gives each kept token its own
    (t, h, w) position as an int64 from the keep set, exact past 256, where bf16 (the model's dtype,
    in which vLLM's multimodal-pruning path carries positions) rounds them: 257 -> 256, 259 -> 260."""
    from types import SimpleNamespace

    from vllm_sgl.engine.model import SGLModelMixin

    class Target(SGLModelMixin):  # the wrapper's position code, with the config it reads
        config = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2))

    grid, rows, cols = [1, 1000, 8], 500, 4
    keep = torch.sort(torch.randperm(rows * cols, generator=torch.Generator().manual_seed(0))[:700]).values
    text_before, text_after = 5, 7
    tokens = [0] * text_before + [1] * len(keep) + [0] * text_after
    positions, delta = Target().get_mrope_input_positions(tokens, [_image_feature(grid, keep, text_before)])
    assert positions.dtype == torch.int64
    h, w = (keep // cols).long(), (keep % cols).long()
    image = positions[:, text_before:text_before + len(keep)] - text_before
    assert torch.equal(image[0], torch.zeros_like(h)) and torch.equal(image[1], h) and torch.equal(image[2], w)
    after = positions[0, text_before + len(keep):]
    assert torch.equal(after, torch.arange(text_after) + text_before + rows)  # text after the image's extent
    assert delta == int(positions.max()) + 1 - len(tokens)
    assert not torch.equal(h.to(torch.bfloat16).long(), h)  # what a bf16 round trip would have done


@pytest.mark.both
def test_kept_embeddings_carry_no_positions():
    """embed_multimodal's output is the kept rows alone, in the model's dtype and hidden width (one
    host-to-device copy for every keep set of the call); no SGL wrapper takes vLLM's pruning path,
    which reads positions back from appended embedding columns."""
    from vllm_sgl.engine import model

    embeds = (torch.randn(2000, 64).to(torch.bfloat16), torch.randn(30, 64).to(torch.bfloat16))
    keeps = [torch.tensor([3, 257, 259, 1999]), torch.tensor([0, 29])]
    out = model._kept_rows(embeds, keeps)
    assert [tuple(o.shape) for o in out] == [(4, 64), (2, 64)] and all(o.dtype == torch.bfloat16 for o in out)
    assert all(torch.equal(o, e[k]) for o, e, k in zip(out, embeds, keeps))
    wrappers = [model.SGLQwen2VLForConditionalGeneration, model.SGLQwen2_5_VLForConditionalGeneration,
                model.SGLQwen3VLForConditionalGeneration, model.SGLQwen3VLMoeForConditionalGeneration,
                model.SGLInternVLForConditionalGeneration]
    assert not any(w.supports_multimodal_pruning for w in wrappers)
    assert not any(hasattr(w, "recompute_mrope_positions") and "vllm_sgl" in w.recompute_mrope_positions.__module__
                   for w in wrappers)


# -- drafts: the worker's rule (Model Runner V2) equals the scheduler's count, with no host sync --


def _draft_case(rng: random.Random, width: int, k: int):
    answer = [rng.randrange(100, 120) for _ in range(rng.randrange(0, width + 1))]
    n_out = rng.randrange(0, width + 3)
    output = list(answer[:n_out]) + [rng.randrange(100, 120) for _ in range(max(0, n_out - len(answer)))]
    if output and rng.random() < 0.3:  # the target left the answer somewhere
        i = rng.randrange(len(output))
        output[i] = 999
    limit = rng.randrange(0, k + 1) if answer else 0
    return answer, output, limit


@pytest.mark.both
def test_worker_drafts_follow_the_scheduler_rule_without_host_syncs():
    """GuideAnswerSpeculator's device rule (mrv2.guide_drafts) proposes exactly the answer tokens
    the scheduler counts for the trace (draft.answer_draft_len), first in the row, then the request's
    last token in every other slot: k per request, every step. On meta tensors it runs too: no value
    ever leaves the device (a .item(), .tolist() or data-dependent shape would raise there)."""
    from vllm_sgl.engine.draft import answer_draft_len
    from vllm_sgl.engine.runners.mrv2 import guide_drafts

    rng, width, k, prompt, model_len = random.Random(0), 8, 4, 5, 40
    cases = [_draft_case(rng, width, k) for _ in range(300)]
    rows = torch.full((len(cases), 1 + width), -1, dtype=torch.int32)
    tokens = torch.zeros(len(cases) + 2, model_len, dtype=torch.int32)
    slots = torch.arange(len(cases)) + 2  # request slots are not batch rows
    last = torch.full((len(cases), 1), 7, dtype=torch.int64)
    for b, (answer, output, limit) in enumerate(cases):
        rows[b, 0] = limit
        rows[b, 1:1 + len(answer)] = torch.tensor(answer, dtype=torch.int32)
        tokens[slots[b], prompt:prompt + len(output)] = torch.tensor(output, dtype=torch.int32)
    total = torch.tensor([prompt + len(o) for _, o, _ in cases], dtype=torch.int32)
    drafts = guide_drafts(rows, torch.full((len(cases),), prompt, dtype=torch.int32), total, tokens, slots, last, k)
    assert drafts.shape == (len(cases), k)
    proposed = 0
    for b, (answer, output, limit) in enumerate(cases):
        n = answer_draft_len(answer, output, limit)
        proposed += n
        assert drafts[b].tolist() == answer[len(output):len(output) + n] + [7] * (k - n), (answer, output, limit)
    assert proposed > 100  # the cases do exercise proposals
    meta = guide_drafts(rows.to("meta"), torch.zeros(len(cases), dtype=torch.int32, device="meta"),
                        total.to("meta"), tokens.to("meta"), slots.to("meta"), last.to("meta"), k)
    assert meta.shape == (len(cases), k)


@pytest.mark.both
@pytest.mark.skipif(not MRV2_ONLY, reason="Model Runner V2 (vLLM 0.34): V1 keeps the scheduler's drafts")
def test_drafting_keeps_async_scheduling_and_full_decode_graphs(tiny_pair):
    """On Model Runner V2 an SGL drafting engine keeps vLLM's async scheduling (the CPU platform
    turns it off for every engine here, so the adapter is asked directly with it on), and every
    drafting step's query length, 1 + k for each request (the worker proposes k for all:
    test_worker_drafts...), is a length vLLM captures FULL decode CUDA graphs for."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_sgl.engine.config import SGLConfig
    from vllm_sgl.engine.runners import mrv2

    guide, target = tiny_pair
    k = 4
    sgl = {"guide_model": str(guide), "draft_tokens": k, "guide_max_tokens": 8}
    config = EngineArgs(model=str(target), model_impl="sgl", dtype="float32", max_model_len=1024,
                        additional_config={"sgl": sgl}).create_engine_config()
    assert mrv2.is_guide_drafting(config.speculative_config) and config.speculative_config.num_speculative_tokens == k
    config.scheduler_config.async_scheduling = True
    mrv2.configure(config, SGLConfig.from_dict(sgl))
    assert config.scheduler_config.async_scheduling
    assert 1 + k in config.get_decode_cudagraph_query_lens(1 + k)
    assert not mrv2.SCHEDULER_DRAFTS  # vLLM schedules k slots per request; SGL's scheduler adds none


# -- memory: vLLM's profile keeps the target's peak; the workspace never grows -------------------


def test_profile_run_never_resets_the_peak(tiny_pair, monkeypatch):
    """vLLM's memory profile reads the allocator's peak since its own start; the guide's largest call
    runs inside it (GuideRunner.profile_run) and must not reset that peak (it would erase the
    target's encoder and forward peaks and size the KV cache too large). The call measures its own
    peak only when asked (warm_up, at load, before the profile)."""
    import inspect

    from vllm_sgl.engine.guide_runner import GuideRunner
    from vllm_sgl.guide import Guide

    resets = []
    for module in (torch.cuda, torch.cuda.memory, torch.accelerator):
        if hasattr(module, "reset_peak_memory_stats"):
            monkeypatch.setattr(module, "reset_peak_memory_stats", lambda *a, **k: resets.append(a))
    assert inspect.signature(Guide.largest_call).parameters["measure"].default is False
    guide = Guide.load(tiny_pair[0], "cpu", torch.float32, 4, importance_backend="torch", max_batch=2, kv_tokens=300)
    assert guide.largest_call() == 0

    calls = []

    class Recording:
        def largest_call(self, **kw):
            calls.append(kw)
            return 0

    runner = GuideRunner.__new__(GuideRunner)
    runner.guide, runner.device = Recording(), "cuda"  # the CUDA branch, as vLLM's profile_run reaches it
    runner.profile_run()
    assert calls == [{}] and resets == []


def test_guide_workspace_is_fixed_in_an_engine(tiny_pair):
    """An engine's guide (fixed_workspace) splits a call into calls that fit its workspace, KV slots
    and query rows alike (a second image's tokens are query rows of the first), and a request too
    large alone is an error for that request, never a larger workspace (memory vLLM's profile did
    not see, and every captured decode graph captured again inside a serving step)."""
    from vllm_sgl.guide import Guide
    from vllm_sgl.guide.runtime import GuideWorkspaceError, workspace_geometry

    kv_tokens, batch, answer = 600, 4, 4
    guide = Guide.load(tiny_pair[0], "cpu", torch.float32, answer, importance_backend="torch", max_batch=batch,
                       kv_tokens=kv_tokens, fixed_workspace=True)
    slots, rows = workspace_geometry(kv_tokens, batch, answer)
    assert guide._kv.shape[2] == slots and guide._queries.shape[1] == rows
    reqs = guide.synthetic_requests(batch, 500)  # 4 requests of ~500 tokens: a step of 2000
    chunks = guide._chunks([guide._prepare(r) for r in reqs])
    assert len(chunks) > 1 and sorted(i for c in chunks for i in c) == list(range(batch))
    results = guide.run(reqs)
    assert [r.request_id for r in results] == [r.request_id for r in reqs]
    assert guide._kv.shape[2] == slots and guide._queries.shape[1] == rows  # never grew
    with pytest.raises(GuideWorkspaceError, match="workspace holds"):
        guide.run(guide.synthetic_requests(1, 2 * slots))


# -- the encoder budget counts what the encoder runs on ------------------------------------------


@pytest.mark.both
def test_encoder_budget_counts_every_visual_token(tiny_pair):
    """vLLM charges an image's encoder work as its placeholder count; an SGL image has k placeholders
    but the target's encoder runs on all N of its tokens. The SGL scheduler checks and charges N
    against the encoder budget (the encoder cache still holds k): of nine 256-token images at keep
    0.1, a step encodes as many as the budget holds at N, not the nine it holds at k = 25."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.sched.output import SchedulerOutput  # noqa: F401 (the scheduler's own types)
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.request import Request
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_sgl.engine.scheduler import SGLScheduler

    guide, target = tiny_pair
    config = EngineArgs(model=str(target), model_impl="sgl", dtype="float32", max_model_len=1024,
                        max_num_batched_tokens=600, enable_chunked_prefill=True, max_num_seqs=16,
                        enable_prefix_caching=False,
                        limit_mm_per_prompt={"image": 1},
                        additional_config={"sgl": {"guide_model": str(guide), "keep_ratio": 0.1}}).create_engine_config()
    block = 16
    config.cache_config.num_gpu_blocks = 1000  # what the engine sets once the KV cache is allocated
    kv = KVCacheConfig(num_blocks=1000, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["layer"], FullAttentionSpec(block_size=block, num_kv_heads=1, head_size=64,
                                                      dtype=torch.float32))])
    scheduler = SGLScheduler(vllm_config=config, kv_cache_config=kv, block_size=block,
                             structured_output_manager=StructuredOutputManager(config))
    budget = scheduler.max_num_encoder_input_tokens
    image_id = config.model_config.hf_config.image_token_id
    n, k = 256, 25
    for i in range(9):
        feature = _image_feature([1, 32, 32], torch.arange(k), offset=2)
        feature.identifier = f"image-{i}"
        feature.data["pixel_values"] = feature.data["image_grid_thw"]  # present: the guide phase is done
        scheduler.add_request(Request(f"r{i}", [5, 6] + [image_id] * k + [7, 8],
                                      SamplingParams(max_tokens=4), None, mm_features=[feature]))
    assert scheduler.sgl_num_in_guide_phase() == 0  # keep sets attached: straight to waiting
    out = scheduler.schedule()
    encoded = sum(len(v) for v in out.scheduled_encoder_inputs.values())
    assert encoded == budget // n < 9, (budget, encoded)  # charged at k, all nine would fit
