"""SEE (guide early exit) in the engine, against the reference, on real LLM engines (CPU, float32,
tiny pair). Two engines: the default fuse (mean) and product, which multiplies the two scores; the
other fuses (confidence, consistency) are each one of the two scores the engine is checked on here,
and every fuse's formula is checked against its definition in test_reference. Per-request
thresholds (mm_processor_kwargs) put some requests above and some below their own score, so each
engine shows exits and non-exits.

For every image request: the engine's confidence, consistency and fused score equal the
reference's (relative 1e-4) and its exit decision equals the reference's. An exited request's
output is the guide's answer and the target never computed a token for it (trace: target_steps
0); a request that did not exit is unchanged (the reference's pruned target answer). Text-only and
sampled requests in the same batch never exit.
"""

from __future__ import annotations

import time

import pytest

from engine_utils import MAX_TOKENS, MIXED, VIDEO, VIDEO_LIMITS, close, prompts_for, read_trace, sgl_llm
from vllm_sgl.reference import SGLSettings

FUSES = ["mean", "product"]
RATIO = 0.25
CONSISTENCY_RATIO = 0.05
# The engine's guide (vLLM's CPU attention) and the reference (explicit attention) round float32
# differently, and by how much depends on the CPU: the confidence, a product of 8 probabilities,
# differed by 1.4e-5 relative on an AVX-512 machine and under 1e-5 on an AVX2 one. 1e-4 is still
# 10x inside the thresholds' margin (0.1%, below), so every exit decision stays decided.
SCORE_REL = 1e-4
CASES = MIXED + VIDEO  # videos exit (or not) like images: a video's consistency keeps its own top 5%


@pytest.fixture(scope="module")
def references(reference):
    """The reference's full result per CASES image or video case (fuse-independent parts)."""
    out = {}
    for i, case in enumerate(CASES):
        if case.images or case.videos:
            out[i] = reference.run(case.pil_images(), case.question, SGLSettings(
                keep_ratio=RATIO, max_new_tokens=MAX_TOKENS, consistency_ratio=CONSISTENCY_RATIO), videos=case.clips())
    return out


def _thresholds(references, fuse):
    """A per-request threshold just below the reference's score for every other finished request
    (it must exit) and just above it for the rest (it must not)."""
    from vllm_sgl.pruning import FUSES as F

    out, flip = {}, False
    for i, ref in references.items():
        score = F[fuse](ref.confidence, ref.consistency)
        if ref.guide_finished:
            flip = not flip
        out[i] = min(1.0, score * (0.999 if flip and ref.guide_finished else 1.001))
    return out


@pytest.fixture(scope="module")
def mean_engine(tiny_pair, tmp_path_factory):
    """The default fuse (mean), SEE off unless a request asks: shared by the tests below."""
    trace = tmp_path_factory.mktemp("see") / "trace.jsonl"
    llm = sgl_llm(tiny_pair[1], tiny_pair[0], RATIO, trace_path=trace,
                  sgl_settings={"see_consistency_ratio": CONSISTENCY_RATIO}, limit_mm_per_prompt=VIDEO_LIMITS)
    yield llm, trace
    close(llm)


@pytest.mark.both
@pytest.mark.parametrize("fuse", FUSES)
def test_scores_and_exits_match_reference(tiny_pair, processor, references, mean_engine, tmp_path, fuse):
    from vllm import SamplingParams
    from vllm_sgl.pruning import FUSES as F

    guide, target = tiny_pair
    if fuse == "mean":
        llm, trace = mean_engine
    else:
        trace = tmp_path / "trace.jsonl"
        llm = sgl_llm(target, guide, RATIO, trace_path=trace, limit_mm_per_prompt=VIDEO_LIMITS,
                      sgl_settings={"see_fuse": fuse, "see_consistency_ratio": CONSISTENCY_RATIO})
    thresholds = _thresholds(references, fuse)
    prompts = prompts_for(CASES, processor)
    for i, th in thresholds.items():
        prompts[i] = dict(prompts[i], mm_processor_kwargs={"sgl_see_threshold": th})
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    # a sampled request with SEE asked for (threshold 0): it must never exit
    sampled = dict(prompts[1], mm_processor_kwargs={"sgl_see_threshold": 0.0})
    try:
        outs = llm.generate(prompts + [sampled], [greedy] * len(prompts)
                            + [SamplingParams(temperature=0.9, seed=1, max_tokens=MAX_TOKENS)], use_tqdm=False)
    finally:
        if fuse != "mean":
            close(llm)
    lines = {line["request_id"]: line for line in read_trace(trace)}
    exits = 0
    for i, (case, out) in enumerate(zip(CASES, outs)):
        line = lines[out.request_id]
        tokens = list(out.outputs[0].token_ids)
        if not (case.images or case.videos):  # text only: no guide, no SEE
            assert line["see_score"] is None and not line["see_exit"]
            continue
        ref = references[i]
        assert line["guide_answer_ids"] == ref.guide_answer_ids
        assert line["see_confidence"] == pytest.approx(ref.confidence, rel=SCORE_REL)
        assert line["see_consistency"] == pytest.approx(ref.consistency, rel=SCORE_REL)
        assert line["see_score"] == pytest.approx(F[fuse](ref.confidence, ref.consistency), rel=SCORE_REL)
        expect_exit = ref.guide_finished and F[fuse](ref.confidence, ref.consistency) >= thresholds[i]
        assert line["see_exit"] == expect_exit, (i, fuse, line, thresholds[i])
        if expect_exit:
            exits += 1
            assert tokens == ref.guide_answer_ids  # the guide's answer, end-of-sequence included
            assert line["target_steps"] == 0  # the target never computed a token for it
            assert out.outputs[0].finish_reason == "stop"
        else:
            assert tokens == ref.target_pruned_answer_ids, i
            assert line["target_steps"] > 0
    assert 0 < exits < len(references)  # both outcomes in one batch
    sampled_line = lines[outs[-1].request_id]
    assert sampled_line["see_score"] is None and not sampled_line["see_exit"] and sampled_line["target_steps"] > 0


@pytest.mark.both
def test_exit_respects_max_tokens_stop_strings_and_stop_tokens(processor, references, mean_engine):
    """Threshold 0 (every finished answer may exit): an answer longer than max_tokens, or ended
    before min_tokens, does not exit (the target answers, cut as usual); a stop token inside the
    answer ends the exit there; a stop string inside its text cuts the text as vLLM cuts any output."""
    from vllm import SamplingParams

    llm, trace = mean_engine
    tokenizer = processor.tokenizer
    finished = [i for i, r in references.items() if r.guide_finished and len(r.guide_answer_ids) >= 3]
    assert finished, "the tiny guide finishes some answers within the budget"
    i = finished[0]
    ref = references[i]
    answer = ref.guide_answer_ids
    prompt = dict(prompts_for([CASES[i]], processor)[0], mm_processor_kwargs={"sgl_see_threshold": 0.0})
    text = tokenizer.decode(answer[1:2], skip_special_tokens=True)
    cases = {
        "short": SamplingParams(temperature=0, max_tokens=len(answer) - 1),
        "min_tokens": SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=len(answer) + 1),
        "stop_token": SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[answer[1]]),
        "fits": SamplingParams(temperature=0, max_tokens=len(answer)),
    }
    if text.strip():
        cases["stop_string"] = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=[text.strip()])
    outs = {name: llm.generate([prompt], sp, use_tqdm=False)[0] for name, sp in cases.items()}
    # the target's own answer cut by a stop string: the front end aborts the request in the engine,
    # and the trace says "stop" as the client does
    target_stop = tokenizer.decode(ref.target_pruned_answer_ids[1:2], skip_special_tokens=True).strip()
    if target_stop:
        plain = prompts_for([CASES[i]], processor)[0]
        outs["target_stop_string"] = llm.generate(
            [plain], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=[target_stop]), use_tqdm=False)[0]
    lines = {line["request_id"]: line for line in read_trace(trace)}
    if target_stop:
        out = outs["target_stop_string"]
        assert out.outputs[0].finish_reason == "stop"
        for _ in range(100):  # the front end's abort reaches the engine after generate() returned
            if out.request_id in lines:
                break
            time.sleep(0.1)
            lines = {line["request_id"]: line for line in read_trace(trace)}
        assert lines[out.request_id]["finish_reason"] == "stop" and not lines[out.request_id]["see_exit"]
    short = outs["short"]
    assert not lines[short.request_id]["see_exit"]
    assert list(short.outputs[0].token_ids) == ref.target_pruned_answer_ids[: len(answer) - 1]
    assert not lines[outs["min_tokens"].request_id]["see_exit"]
    assert lines[outs["min_tokens"].request_id]["target_steps"] > 0
    stop_tok = outs["stop_token"]
    if answer[1] in answer[:1]:  # the stop token is the first token too: cut there
        want = answer[:1]
    else:
        want = answer[:2]
    assert lines[stop_tok.request_id]["see_exit"]
    assert list(stop_tok.outputs[0].token_ids) == want
    assert stop_tok.outputs[0].finish_reason == "stop" and stop_tok.outputs[0].stop_reason == answer[1]
    assert lines[outs["fits"].request_id]["see_exit"]
    assert list(outs["fits"].outputs[0].token_ids) == answer
    if "stop_string" in outs:
        out = outs["stop_string"].outputs[0]
        assert lines[outs["stop_string"].request_id]["see_exit"]
        assert text.strip() not in out.text and out.finish_reason == "stop"
        full = tokenizer.decode(answer, skip_special_tokens=True)
        assert full.startswith(out.text)
