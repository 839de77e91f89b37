"""SGL on vLLM's distributed engine (CPU, float32, tiny pair, one core per rank):
- tensor parallel: each step's guide requests are split across the ranks and gathered through the
  TP group; keep sets, guide answers and greedy tokens equal the reference (hence TP=1), with the
  drafting on, and the trace shows both ranks ran a share;
- pipeline parallel: equal to the reference too (a later stage places the kept tokens at their
  own positions although it never runs the encoder); a connector with it is refused at start-up;
- data parallel: `vllm serve --data-parallel-size 2` (started as `vllm serve` starts it, vLLM's
  module entry point, no SGL launcher and no PROMETHEUS_MULTIPROC_DIR) answers a mixed batch
  exactly as the reference, every request of it, and /metrics counts SGL's work once, per engine.
"""

from __future__ import annotations

import asyncio

import pytest

from engine_utils import (
    MIXED, MRV2_ONLY, assert_matches_reference, close, greedy, prompts_for, read_trace, sgl_llm, trace_by_request,
)

RATIO = 0.25
ONE_CORE_PER_RANK = "0|1"  # without it the CPU backend refuses to start ("Not enough allowed NUMA nodes")


def _run_mixed(tiny_pair, processor, tmp_path, monkeypatch, sgl_settings=None, **parallel):
    guide, target = tiny_pair
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", ONE_CORE_PER_RANK)  # the engine's processes inherit it
    trace_path = tmp_path / "trace.jsonl"
    llm = sgl_llm(target, guide, keep_ratio=RATIO, trace_path=trace_path, sgl_settings=sgl_settings, **parallel)
    try:
        tokens, lens, outputs = greedy(llm, prompts_for(MIXED, processor))
    finally:
        close(llm)
    return tokens, lens, trace_by_request(read_trace(trace_path), outputs)


@pytest.mark.both
def test_tensor_parallel_splits_the_guide(tiny_pair, processor, reference_results, tmp_path, monkeypatch):
    # drafting on (the random pair's guide never agrees, so nothing is proposed; test_draft.py runs
    # TP=2 drafting on the trained pair): still the reference
    tokens, lens, trace = _run_mixed(tiny_pair, processor, tmp_path, monkeypatch, sgl_settings={"draft_tokens": 2},
                                     tensor_parallel_size=2)
    assert_matches_reference(MIXED, tokens, lens, trace, reference_results, RATIO)
    ranks = [line["guide_rank"] for case, line in zip(MIXED, trace) if case.images]
    # The split is real: both ranks ran requests, and the longest-first assignment keeps the
    # shares within one request of each other here (8 image requests, similar sizes).
    assert sorted(set(ranks)) == [0, 1], ranks
    assert abs(ranks.count(0) - ranks.count(1)) <= 2, ranks


@pytest.mark.both
def test_pipeline_parallel_matches_reference(tiny_pair, processor, reference_results, tmp_path, monkeypatch):
    # Compiled on 0.32: its CPU runner allocates the stages' intermediate tensors only in the compile
    # warm-up (CPUModelRunner.warming_up_model returns early when eager), so an eager PP engine of
    # vLLM 0.32 fails at its first step, SGL or not.
    tokens, lens, trace = _run_mixed(tiny_pair, processor, tmp_path, monkeypatch, pipeline_parallel_size=2,
                                     enforce_eager=MRV2_ONLY)
    assert_matches_reference(MIXED, tokens, lens, trace, reference_results, RATIO)
    # The guide phase runs on the last stage (its one TP rank), whose output reaches the scheduler.
    assert {line["guide_rank"] for case, line in zip(MIXED, trace) if case.images} == {0}


def test_pipeline_parallel_with_a_connector_is_refused(tiny_pair):
    guide, target = tiny_pair
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=2 cannot use kv_transfer_config"):
        sgl_llm(target, guide, keep_ratio=RATIO, pipeline_parallel_size=2,
                kv_transfer_config={"kv_connector": "ExampleConnector", "kv_role": "kv_both"})


# Not on vLLM 0.34 here: its CPU worker binds each data-parallel rank to a NUMA node of its own
# (cpu_worker.py: get_visible_memory_node), and these machines have one: rank 1 fails to start,
# SGL or not.
def test_data_parallel_serve(tiny_pair, reference_results, tmp_path):
    """Two engines behind one plain `vllm serve` server, each with its own guide phase: every answer
    of a mixed, concurrent batch (text only, one and two images) equals the reference's, and SGL's
    metrics reach /metrics through vLLM's stat logger route, labelled by engine."""
    pytest.importorskip("openai")
    from serve_utils import ServeCase, ask, client_for, png_data_url, readme_cpu_serve, serve

    guide, target = tiny_pair
    _, sgl, readme_args = readme_cpu_serve()
    sgl = {**sgl, "guide_model": str(guide), "keep_ratio": RATIO, "guide_max_tokens": 8}
    cases = [c for c in MIXED if len(c.images) <= 2]
    args = [*readme_args, "--dtype", "float32", "--seed", "0", "--data-parallel-size", "2"]
    with serve(target, sgl, tmp_path, args, env={"VLLM_CPU_OMP_THREADS_BIND": ONE_CORE_PER_RANK},
               plain_vllm=True) as server:

        async def go():
            async with client_for(server, 300) as client:
                jobs = []
                for i, c in enumerate(cases * 2):
                    sc = ServeCase(c.question, tuple(c.images))
                    jobs.append(ask(client, server, sc, [png_data_url(img) for img in c.pil_images()], stream=i % 2 == 1))
                return await asyncio.gather(*jobs)

        answers = asyncio.run(asyncio.wait_for(go(), 600))
        metrics = server.wait_idle()
        by_engine = {name: server.series(f"vllm_sgl:{name}_total") for name in ("guide_requests", "images")}
        trace = read_trace(server.trace_path)
    for c, a in zip(cases * 2, answers):
        ref = reference_results(c, RATIO)
        assert a.token_ids == ref.target_pruned_answer_ids, (c, a.stream)
        assert len(a.prompt_token_ids) == ref.target_prompt_len, c
    assert len(trace) == len(answers)  # both engines write the trace; every request finished once
    # Both engines' guide counters reach the one /metrics, each request counted once, one series
    # per engine (the requests are spread over both).
    # (the second round repeats the first: an engine that saw a request already reuses its result)
    image_requests = 2 * sum(1 for c in cases if c.images)
    ran = metrics["vllm_sgl:guide_requests_total"]
    assert ran + metrics.get("vllm_sgl:guide_reused_total", 0) == image_requests
    assert metrics["vllm_sgl:guide_rank_requests_total"] == ran
    assert metrics["vllm_sgl:images_total"] == 2 * sum(len(c.images) for c in cases)
    for name, series in by_engine.items():
        engines = {dict(labels)["engine"]: v for labels, v in series.items()}
        assert set(engines) == {"0", "1"} and all(v > 0 for v in engines.values()), (name, series)


def test_assign_is_longest_first_onto_the_least_loaded_rank():
    from vllm_sgl.engine.parallel import assign

    costs = [5, 3, 3, 2, 8, 1]
    owner = assign(costs, 2)
    assert owner == [1, 1, 0, 1, 0, 1]  # the same on every rank: a function of the costs alone
    loads = [sum(c for c, r in zip(costs, owner) if r == rank) for rank in (0, 1)]
    assert loads == [11, 11]
    assert assign([1] * 5, 3) == [0, 1, 2, 0, 1]
    assert assign([], 4) == [] and assign([7], 4) == [0]
