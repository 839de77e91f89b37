"""The engine (`--model-impl sgl`) against vanilla vLLM and against the reference, on real LLM
engines (CPU, float32, tiny pair). Engines are module-scoped and shut down when done."""

from __future__ import annotations

import numpy as np
import pytest

from engine_utils import (
    MAX_TOKENS, MIXED, MRV2_ONLY, VIDEO, VIDEO_LIMITS, Case, assert_matches_reference, close, greedy, prompts_for,
    read_trace, sgl_llm, trace_by_request, vanilla_llm,
)
from vllm_sgl.images import as_video, synthetic_clip


@pytest.fixture(scope="module")
def vanilla_mixed(tiny_pair, processor):
    """Vanilla vLLM's tokens and prompt lengths for MIXED + VIDEO."""
    llm = vanilla_llm(tiny_pair[1], limit_mm_per_prompt=VIDEO_LIMITS)
    try:
        return greedy(llm, prompts_for(MIXED + VIDEO, processor))[:2]
    finally:
        close(llm)


# keep 0.1 on 0.32 only: 0.34 takes per-request 0.1 in the chunked test below and in test_families
@pytest.mark.parametrize("ratio", [pytest.param(0.25, marks=pytest.mark.both), 0.1])
def test_pruned_engine_matches_reference(tiny_pair, processor, reference_results, tmp_path, ratio):
    guide, target = tiny_pair
    trace_path = tmp_path / "trace.jsonl"
    # Compiled at 0.25 on 0.32 (on 0.34 the bf16 test below is the compiled one): the rest are eager.
    llm = sgl_llm(target, guide, keep_ratio=ratio, trace_path=trace_path, limit_mm_per_prompt=VIDEO_LIMITS,
                  enforce_eager=MRV2_ONLY or ratio != 0.25)
    try:
        assert llm.llm_engine.vllm_config.model_config.enforce_eager == (MRV2_ONLY or ratio != 0.25)
        tokens, lens, outputs = greedy(llm, prompts_for(MIXED, processor))
        # Across batches: the same image as MIXED[5]/[6] with a new question, and [6] again.
        later = [Case("what color is the large circle", [(6, (336, 336))]), MIXED[6]]
        later_tokens, later_lens, later_outputs = greedy(llm, prompts_for(later, processor))
        # The spatial keep rule per request (docs/importance.md), in one batch with a text-only
        # and a default-rule request: the same prompts as above, so only the salted identities
        # keep the first keep sets from being reused for them.
        spread = [MIXED[i] for i in (0, 4, 5, 8)]
        spread_prompts = [dict(p, mm_processor_kwargs={"sgl_importance": "sgl-sdpp"}) for p in prompts_for(spread, processor)]
        spread_tokens, spread_lens, spread_outputs = greedy(llm, spread_prompts + prompts_for([MIXED[9]], processor))
        # Videos, one keep set per video over all its frames, batched with an image request.
        video_tokens, video_lens, video_outputs = greedy(llm, prompts_for(VIDEO + [MIXED[1]], processor))
    finally:
        close(llm)
    everything = read_trace(trace_path)
    assert_matches_reference(VIDEO + [MIXED[1]], video_tokens, video_lens, trace_by_request(everything, video_outputs),
                             reference_results, ratio)
    trace = trace_by_request(everything, outputs + later_outputs + spread_outputs)
    cases = MIXED + later
    n = len(cases)
    assert_matches_reference(cases + [MIXED[9]], tokens + later_tokens + spread_tokens[-1:],
                             lens + later_lens + spread_lens[-1:], trace[:n] + trace[-1:], reference_results, ratio)
    assert_matches_reference(spread, spread_tokens[:-1], spread_lens[:-1], trace[n:-1], reference_results, ratio,
                             importance="sgl-sdpp")
    assert [line["guide_phase"] for line in trace[n + 1 : -1]] == ["scheduler"] * 3
    # The rules disagree somewhere (else this checks nothing about which one ran).
    assert any(trace[n + j]["keep_indices"] != trace[i]["keep_indices"] for j, i in enumerate((0, 4, 5, 8)))
    # The same image with different questions got different keep sets (not a shared cache entry).
    same_image = [line["keep_indices"][0] for line in (trace[5], trace[6], trace[10])]
    assert len({tuple(k) for k in same_image}) > 1
    # An identical request (MIXED[6] again) reused the first one's guide result, with the same keep
    # sets (checked against the reference above); a new question on that image ran the guide.
    assert [line["guide_phase"] for line in trace[-2:]] == ["scheduler", "reused"]


@pytest.mark.both
def test_chunked_prefill_and_prefix_caching(tiny_pair, processor, reference_results, vanilla_mixed):
    """Chunked prefill and prefix caching give the reference's tokens, for images and videos; a
    per-request keep ratio (0.1, and 1.0: vanilla vLLM's tokens and prompt lengths, the prefix cache
    already holding the same prompts' pruned blocks); a bad ratio, rule or video fails alone; an
    abort in the guide phase."""
    guide, target = tiny_pair
    ratio = 0.25
    llm = sgl_llm(
        target, guide, keep_ratio=ratio, enable_prefix_caching=True,
        enable_chunked_prefill=True, max_num_batched_tokens=32, max_num_seqs=4,
        sgl_settings={"guide_step_tokens": 1024},  # the guide reads whole requests; the target's chunks stay 32
        limit_mm_per_prompt=VIDEO_LIMITS,
    )
    try:
        prompts, videos = prompts_for(MIXED, processor), prompts_for(VIDEO, processor)
        first, _, _ = greedy(llm, prompts)
        second, _, _ = greedy(llm, prompts)  # prompts now hit the prefix cache
        # Per-request keep ratio, through mm_processor_kwargs.
        own = [dict(p, mm_processor_kwargs={"sgl_keep_ratio": 0.1}) for p in prompts[1:3]]
        own_tokens, own_lens, _ = greedy(llm, own)
        full = greedy(llm, [dict(p, mm_processor_kwargs={"sgl_keep_ratio": 1.0}) for p in prompts + videos])[:2]
        video_first, _, _ = greedy(llm, videos)
        video_second, _, _ = greedy(llm, videos)  # video keep sets from the prefix cache
        with pytest.raises(ValueError, match=r"sgl_keep_ratio must be a number in \(0, 1\], got 1.5"):
            greedy(llm, [dict(prompts[1], mm_processor_kwargs={"sgl_keep_ratio": 1.5})])
        with pytest.raises(ValueError, match=r"sgl_importance must be one of 'sgl', 'sgl-sdpp', got 'topk'"):
            greedy(llm, [dict(prompts[1], mm_processor_kwargs={"sgl_importance": "topk"})])
        # Bad videos: no frames; more tokens than the guide reads in a step (the frame limit)
        empty = dict(videos[0], multi_modal_data={"video": [as_video(np.zeros((0, 112, 112, 3), np.uint8))]})
        with pytest.raises(ValueError, match="video 0 of this request has no frames"):
            greedy(llm, [empty])
        long = dict(videos[0], multi_modal_data={"video": [synthetic_clip(7, 8, (448, 448))]})
        with pytest.raises(ValueError, match=r"the guide reads this request as 10\d\d tokens .* guide_step_tokens"):
            greedy(llm, [long])
        after_error, _, _ = greedy(llm, prompts[:2])  # the engine still serves
        held = _abort_one_in_guide_phase(llm, prompts[1:5])
    finally:
        close(llm)
    expected = [reference_results(c, ratio).target_pruned_answer_ids for c in MIXED]
    assert first == expected
    assert second == expected
    assert after_error == expected[:2]
    assert held == {"held-0": expected[1], "held-2": expected[3], "held-3": expected[4]}
    for case, toks, n in zip(MIXED[1:3], own_tokens, own_lens):
        ref = reference_results(case, 0.1)
        assert (toks, n) == (ref.target_pruned_answer_ids, ref.target_prompt_len)
    assert full == vanilla_mixed  # keep 1.0 is vanilla, for videos too
    video_expected = [reference_results(c, ratio).target_pruned_answer_ids for c in VIDEO]
    assert video_first == video_second == video_expected


def _abort_one_in_guide_phase(llm, prompts):
    """Adds requests and aborts one before the engine steps: it is aborted from the scheduler's
    guide queue (or while its guide runs); the others finish, nothing is left behind."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(f"held-{i}", p, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    engine.abort_request(["held-1"])
    finished = {}
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
    assert not engine.has_unfinished_requests()
    return finished


@pytest.mark.both
def test_encode_time_guide_matches_reference(tiny_pair, processor, reference_results, tmp_path, monkeypatch):
    """The worker's encode-time path (requests that skip the scheduler's guide phase: KV and
    encoder-cache connectors, streaming input): the guide runs when the images are encoded, their
    keep sets arrive after the request's positions were made, and the positions are made again
    from them before that step's forward. Keep sets, guide answers and tokens equal the reference's."""
    from vllm_sgl.engine.scheduler import ENCODE_TIME_GUIDE_ENV

    monkeypatch.setenv(ENCODE_TIME_GUIDE_ENV, "1")
    guide, target = tiny_pair
    trace_path = tmp_path / "trace.jsonl"
    llm = sgl_llm(target, guide, keep_ratio=0.25, trace_path=trace_path)
    try:
        tokens, lens, outputs = greedy(llm, prompts_for(MIXED, processor))
    finally:
        close(llm)
    trace = trace_by_request(read_trace(trace_path), outputs)
    assert_matches_reference(MIXED, tokens, lens, trace, reference_results, 0.25, phases=("encode",))


# 84 x 11200 px: 400 x 3 merged tokens (within the tiny processor's 1280-token pixel limit, so not
# resized), positions past 256 (bf16 holds integers exactly to 256)
TALL = Case("what is in the picture", [(11, (84, 11200))])


@pytest.mark.both
@pytest.mark.skipif(not MRV2_ONLY, reason="vLLM 0.34 (what GPU users run, compiled) covers it: the wrappers' "
                                          "position code is the same on both runners")
def test_bf16_keep_1_equals_vanilla_on_a_tall_image(tiny_pair, processor):
    """As GPU users run it: vLLM 0.34, bfloat16 (vLLM's CPU build runs it here), torch.compile on
    (ENGINE_KW makes the other test engines eager). At keep 1.0 SGL keeps every
    token at its own position, so it equals vanilla vLLM bit for bit, greedy tokens and their
    logprobs, on an image taller than 256 merged rows (its positions once went through the
    embeddings' dtype and came back rounded) and on a small one."""
    from vllm import SamplingParams

    guide, target = tiny_pair
    kw = dict(dtype="bfloat16", max_num_batched_tokens=4096, enforce_eager=False)
    prompts = prompts_for([TALL, MIXED[1]], processor)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0)
    runs = []
    for make in (lambda: vanilla_llm(target, **kw), lambda: sgl_llm(target, guide, keep_ratio=1.0, **kw)):
        llm = make()
        try:
            assert not llm.llm_engine.vllm_config.model_config.enforce_eager  # compiled
            outs = llm.generate(prompts, params, use_tqdm=False)
        finally:
            close(llm)
        runs.append([(list(o.outputs[0].token_ids), [next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs],
                      len(o.prompt_token_ids)) for o in outs])
    vanilla, sgl = runs
    assert vanilla[0][2] > 1200  # the tall image is whole in both
    assert sgl == vanilla
