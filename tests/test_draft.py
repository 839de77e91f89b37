"""The guide's answer as the target's speculative-decoding draft (vllm_sgl.engine.draft), on a real
`vllm-sgl serve` of the trained shapes pair (guide and target agree on most answers there, so
drafts are proposed and accepted), talked to with the openai client:
- greedy: every answer with drafts equals the same request without them (sgl_draft_tokens 0),
  with a KV cache so small that requests are preempted, chunked prefill, prefix caching and a
  client that aborts its stream and a request the guide fails for among them; drafts were proposed and accepted, the trace and
  vLLM's spec-decode metrics on /metrics agree; a text-only request and a request SEE answers
  propose nothing; a request's own draft length bounds what it is proposed;
- seeded sampled requests run, finish and report acceptance;
- a bad sgl_draft_tokens is a 400 for that request only, a request the guide fails for is an error
  for that request only.
Also: tensor parallelism (TP=2, drafts accepted, answers unchanged); drafting on in the soak and in
the TP test of the random pair (test_soak.py, test_parallel.py: nothing is proposed there, the
answers stay the reference's); pipeline parallelism refused; the rule and the settings.
"""

from __future__ import annotations

import asyncio

import pytest

from engine_utils import MRV2_ONLY
from serve_utils import client_for, mp4_data_url, png_data_url, serve, user_message
from vllm_sgl.engine.guide_runner import FAIL_GUIDE_ENV
from vllm_sgl.engine.trace import read_trace, user_request_id

openai = pytest.importorskip("openai")

DRAFT = 4
MAX_TOKENS = 32
KEEP_RATIO = 0.1
TIMEOUT_S = 300
EXAMPLES = 10  # two of each kind, the list answers (10-30 tokens) among them
# The target's KV is 4 KiB a token: 256 tokens hold a few of these requests (~60 prompt tokens
# at keep 0.1) and one long one (LONG_TOKENS, end of sequence ignored), so the two long ones
# preempt each other and the rest; with chunked prefill and prefix caching on.
KV_BYTES = 2**20
FAIL_MARK = "fail-"  # the guide fails for request ids containing this (FAIL_GUIDE_ENV)
LONG_TOKENS = 120


@pytest.fixture(scope="module")
def draft_server(shapes_pair, tmp_path_factory):
    guide, target = shapes_pair
    sgl = {"guide_model": str(guide), "keep_ratio": KEEP_RATIO, "guide_max_tokens": MAX_TOKENS, "draft_tokens": DRAFT,
           "guide_step_tokens": 512}  # the guide reads whole requests; the target's prefill chunks stay 256
    args = ["--dtype", "float32", "--max-model-len", "192", "--kv-cache-memory-bytes", str(KV_BYTES),
            "--limit-mm-per-prompt", '{"image": 1, "video": 1}', "--enable-chunked-prefill", "--max-num-batched-tokens", "256",
            "--enable-prefix-caching", "--block-size", "32", "--max-num-seqs", "8", "--seed", "0"]
    with serve(target, sgl, tmp_path_factory.mktemp("draft"), args, env={FAIL_GUIDE_ENV: FAIL_MARK}) as srv:
        yield srv


@pytest.fixture(scope="module")
def examples():
    from vllm_sgl.tasks import shapes

    picked = []
    for kind in shapes.KINDS:
        picked += shapes.split_examples("test", 2, kind=kind)
    assert len(picked) == EXAMPLES
    return picked


async def _chat(client, server, example, mm: dict | None = None, extra_body: dict | None = None, question=None, **kw):
    messages = user_message([png_data_url(example.image)] if example is not None else [],
                            question or (example.question if example is not None else "List the objects."))
    body = {"return_token_ids": True, **({"mm_processor_kwargs": mm} if mm else {}), **(extra_body or {})}
    params = {"temperature": 0, "max_tokens": MAX_TOKENS, **kw}
    r = await client.chat.completions.create(model=server.model, messages=messages, extra_body=body, **params)
    return r.id, list(r.choices[0].model_extra["token_ids"]), r.choices[0].finish_reason


async def _abort_after_first_chunk(client, server, example):
    s = await client.chat.completions.create(
        model=server.model, messages=user_message([png_data_url(example.image)], example.question), temperature=0,
        max_tokens=100, stream=True, extra_body={"ignore_eos": True})
    async for chunk in s:
        if any(c.delta.content for c in chunk.choices):
            break
    await s.close()
    return chunk.id


def _trace_for(server, ids):
    lines = read_trace(server.trace_path)
    return [lines[user_request_id(i)] for i in ids]


@pytest.mark.both
def test_greedy_drafts_are_accepted_and_change_nothing(draft_server, examples):
    server = draft_server

    async def go():
        async with client_for(server, TIMEOUT_S) as client:
            drafted = [_chat(client, server, e) for e in examples]
            plain = [_chat(client, server, e, {"sgl_draft_tokens": 0}) for e in examples]
            one = [_chat(client, server, e, {"sgl_draft_tokens": 1}) for e in examples]
            text_only = _chat(client, server, None)
            exit_ = _chat(client, server, examples[0], {"sgl_see_threshold": 0.0})
            # past the end of the guide's answer: nothing more to propose
            long = [_chat(client, server, examples[9], mm, max_tokens=LONG_TOKENS, extra_body={"ignore_eos": True})
                    for mm in (None, {"sgl_draft_tokens": 0})]
            # its own question: an identical request would reuse another's guide result
            failing = _chat(client, server, examples[7], question="What is in the picture?",
                            extra_headers={"X-Request-Id": f"{FAIL_MARK}draft"})
            return await asyncio.gather(asyncio.gather(*drafted), asyncio.gather(*plain), asyncio.gather(*one),
                                        text_only, exit_, asyncio.gather(*long),
                                        _abort_after_first_chunk(client, server, examples[8]),
                                        failing, return_exceptions=True)

    before = server.metrics()
    drafted, plain, one, text_only, exit_, long, aborted, failing = asyncio.run(asyncio.wait_for(go(), TIMEOUT_S))
    # the guide failed for one request: that one is an error, every other request is answered
    assert isinstance(failing, openai.InternalServerError), failing
    for r in (drafted, plain, one, text_only, exit_, long, aborted):
        assert not isinstance(r, BaseException), r
    after = server.wait_idle(timeout_s=60)  # nothing running or waiting: the aborted request is gone
    assert [d[1] for d in drafted] == [p[1] for p in plain]  # greedy: exactly the target's own tokens
    assert [d[1] for d in one] == [p[1] for p in plain]
    assert all(d[2] == "stop" for d in drafted), drafted
    assert long[0][1] == long[1][1] and len(long[0][1]) == LONG_TOKENS

    t_drafted = _trace_for(server, [d[0] for d in drafted])
    t_plain = _trace_for(server, [p[0] for p in plain])
    t_one = _trace_for(server, [o[0] for o in one])
    proposed = sum(t["draft_proposed"] for t in t_drafted)
    accepted = sum(t["draft_accepted"] for t in t_drafted)
    assert accepted > 0 and proposed >= accepted, (proposed, accepted)
    # Only tokens of the guide's answer are proposed, so at most that many are accepted per
    # request; accepted drafts save the target steps (prefill chunking may differ between the two).
    assert all(t["draft_accepted"] <= len(t["guide_answer_ids"]) for t in t_drafted)
    assert sum(t["target_steps"] for t in t_drafted) < sum(t["target_steps"] for t in t_plain)
    assert all(t["draft_proposed"] == 0 and t["draft_accepted"] == 0 for t in t_plain)
    assert all(t["draft_proposed"] <= t["target_steps"] for t in t_one)  # one token per step at most
    assert sum(t["draft_proposed"] for t in t_one) > 0
    (t_text,) = _trace_for(server, [text_only[0]])
    assert not t_text["guide_ran"] and t_text["draft_proposed"] == 0
    (t_exit,) = _trace_for(server, [exit_[0]])
    assert t_exit["see_exit"] and t_exit["target_steps"] == 0 and t_exit["draft_proposed"] == 0

    # vLLM's own spec-decode metrics count the same drafts
    delta = lambda name: after.get(name, 0.0) - before.get(name, 0.0)  # noqa: E731
    everything = _trace_for(server, [r[0] for r in (*drafted, *plain, *one, text_only, exit_, *long)] + [aborted])
    total_accepted = sum(t["draft_accepted"] for t in everything)
    total_proposed = sum(t["draft_proposed"] for t in everything)
    # vLLM also counts the -1 placeholders it schedules for a request that has no draft yet
    assert delta("vllm:spec_decode_num_draft_tokens_total") >= total_proposed
    assert delta("vllm:spec_decode_num_drafts_total") > 0
    if MRV2_ONLY:
        # every drafting step is uniform: k slots for every request (the shape FULL decode CUDA
        # graphs are captured for); slots without a guide token hold the request's last token,
        # which vLLM accepts when the target repeats it (the trace counts the guide's tokens only)
        assert delta("vllm:spec_decode_num_draft_tokens_total") == DRAFT * delta("vllm:spec_decode_num_drafts_total")
        assert delta("vllm:spec_decode_num_accepted_tokens_total") >= total_accepted
    else:
        assert delta("vllm:spec_decode_num_accepted_tokens_total") == total_accepted
    assert delta("vllm:num_preemptions_total") > 0 and delta("vllm:prefix_cache_hits_total") > 0
    first = {dict(k).get("position"): v for k, v in server.series("vllm:spec_decode_num_accepted_tokens_per_pos_total").items()}
    assert first.get("0", 0) > 0, first


@pytest.mark.both
def test_video_requests_draft_like_images_and_bad_videos_are_400s(draft_server, examples):
    """Videos through the server (mp4 data URLs, decoded by vLLM's video loader): an example's scene
    held for two frames is one temporal patch of 256 video tokens, pruned to its 25 and drafted like
    an image: with drafts every answer equals the same request without them, and the guide's answers
    are proposed and accepted. A corrupt video, and a clip longer than the guide reads in a step,
    are 400s naming the problem; the server answers the next request."""
    import numpy as np

    server = draft_server
    asked = examples[6:]  # "where" and "list" questions: answers of several tokens before the end to draft
    clips = [mp4_data_url(np.stack([np.asarray(e.image)] * 2)) for e in asked]
    long = mp4_data_url(np.stack([np.asarray(e.image) for e in examples[:4] for _ in range(2)]))
    corrupt = "data:video/mp4;base64,AAAAIGZ0eXBpc29tAAACAGlzb21pc28yYXZjMW1wNDE="

    async def go():
        async with client_for(server, TIMEOUT_S) as client:
            async def ask(url, question, mm=None):
                r = await client.chat.completions.create(
                    model=server.model, messages=user_message([], question, [url]), temperature=0,
                    max_tokens=MAX_TOKENS, extra_body={"return_token_ids": True, **({"mm_processor_kwargs": mm} if mm else {})})
                return r.id, list(r.choices[0].model_extra["token_ids"])

            drafted = [ask(u, e.question) for u, e in zip(clips, asked)]
            plain = [ask(u, e.question, {"sgl_draft_tokens": 0}) for u, e in zip(clips, asked)]
            answered = await asyncio.gather(asyncio.gather(*drafted), asyncio.gather(*plain))
            bad = await asyncio.gather(ask(long, "List the objects."), ask(corrupt, "List the objects."),
                                       return_exceptions=True)
            after = await ask(clips[0], asked[0].question)
            return answered, bad, after

    (drafted, plain), (too_long, broken), after = asyncio.run(asyncio.wait_for(go(), TIMEOUT_S))
    assert [d[1] for d in drafted] == [p[1] for p in plain]  # greedy: exactly the target's own tokens
    assert after[1] == drafted[0][1]
    assert isinstance(too_long, openai.BadRequestError) and "guide_step_tokens" in str(too_long), too_long
    assert isinstance(broken, openai.BadRequestError), broken
    t_drafted = _trace_for(server, [d[0] for d in drafted])
    assert all(t["num_visual_tokens"] == [256] and len(t["keep_indices"][0]) == 25 for t in t_drafted)
    assert sum(t["draft_accepted"] for t in t_drafted) > 0
    assert all(t["draft_proposed"] == 0 for t in _trace_for(server, [p[0] for p in plain]))


@pytest.mark.both
def test_repeated_requests_draft_like_the_first(draft_server):
    """A request identical to an earlier one reuses that request's guide result (no guide run) and
    still drafts: the worker, whose drafts Model Runner V2 verifies, gets the reused answer with the
    request (on vLLM 0.34 it proposed nothing useful before). Six list questions (answers of 10-30
    tokens), one at a time, twice: the second round reuses every result and proposes and accepts
    exactly what the first did."""
    from vllm_sgl.tasks import shapes

    server = draft_server
    lists = shapes.split_examples("test", 6, start=50, kind="list")

    async def go():
        async with client_for(server, TIMEOUT_S) as client:
            return [[await _chat(client, server, e) for e in lists] for _ in range(2)]

    first, second = asyncio.run(asyncio.wait_for(go(), TIMEOUT_S))
    assert [r[1] for r in second] == [r[1] for r in first]
    t1, t2 = _trace_for(server, [r[0] for r in first]), _trace_for(server, [r[0] for r in second])
    assert [t["guide_phase"] for t in t1] == ["scheduler"] * 6 and [t["guide_phase"] for t in t2] == ["reused"] * 6
    counts = [[(t["draft_proposed"], t["draft_accepted"]) for t in ts] for ts in (t1, t2)]
    assert sum(a for _, a in counts[0]) > 0 and counts[1] == counts[0], counts


@pytest.mark.both
def test_sampled_requests_run_and_report_acceptance(draft_server, examples):
    server = draft_server
    lists = [e for e in examples if e.kind == "list"]

    async def go():
        async with client_for(server, TIMEOUT_S) as client:
            return await asyncio.gather(*[_chat(client, server, e, temperature=0.7, seed=7 + i) for i, e in enumerate(lists)])

    out = asyncio.run(asyncio.wait_for(go(), TIMEOUT_S))
    assert all(tokens and finish in ("stop", "length") for _, tokens, finish in out), out
    lines = _trace_for(server, [o[0] for o in out])
    assert sum(t["draft_proposed"] for t in lines) > 0
    assert all(0 <= t["draft_accepted"] <= t["draft_proposed"] for t in lines), lines


@pytest.mark.both
def test_mixed_batches_stay_exact(draft_server, examples):
    """Drafting in batches that hold sampled requests (vLLM's CPU rejection sampler garbled them and
    changed their greedy batch-mates until the plugin corrected it: vllm_sgl.engine.
    cpu_rejection_sampler). Greedy requests batched with sampled, top-k and n=2 companions give
    exactly their answers without drafts; a temperature-0.01 request with drafts gives the greedy
    answer in (nearly) every case, drafts accepted. What a seed guarantees: the rejection sampler
    draws from the request's own generator, so the same seeded request gives the same tokens again
    with drafts; it need not equal its undrafted run (a step that verifies drafts draws more numbers
    from that generator), only follow the same distribution."""
    server = draft_server

    async def go():
        async with client_for(server, TIMEOUT_S) as client:
            alone = await asyncio.gather(*[_chat(client, server, e, {"sgl_draft_tokens": 0}) for e in examples])
            greedy = [_chat(client, server, e) for e in examples]
            companions = [_chat(client, server, examples[i], temperature=0.8, seed=11 + i, **kw)
                          for i, kw in ((9, {}), (8, {"top_p": 0.9}), (7, {"n": 2}))]
            companions.append(_chat(client, server, examples[6], temperature=0.7, extra_body={"top_k": 3}))
            mixed = await asyncio.gather(asyncio.gather(*greedy), asyncio.gather(*companions))
            cold = await asyncio.gather(*[_chat(client, server, e, temperature=0.01, seed=100 + i)
                                          for i, e in enumerate(examples)])
            seeded = [await asyncio.gather(*[_chat(client, server, e, temperature=0.8, seed=5)
                                             for e in examples[8:]]) for _ in range(2)]
            return alone, mixed, cold, seeded

    alone, (greedy, companions), cold, seeded = asyncio.run(asyncio.wait_for(go(), TIMEOUT_S))
    assert [g[1] for g in greedy] == [a[1] for a in alone]
    assert all(tokens and finish in ("stop", "length") for _, tokens, finish in companions), companions
    same = [c[1] == a[1] for c, a in zip(cold, alone)]
    assert sum(same) >= len(same) - 1, same
    lines = _trace_for(server, [c[0] for c in cold])
    assert sum(t["draft_proposed"] for t in lines) > 0
    # (these repeat earlier prompts: on vLLM 0.34 they reuse guide results, whose drafts the worker
    # did not have until it got them with the request, and accepted none)
    assert sum(t["draft_accepted"] for t in lines) > 0
    assert [s[1] for s in seeded[0]] == [s[1] for s in seeded[1]]


@pytest.mark.both
def test_bad_draft_tokens_is_a_400_for_that_request(draft_server, examples):
    server = draft_server

    async def go():
        async with client_for(server, TIMEOUT_S) as client:
            good = asyncio.create_task(_chat(client, server, examples[1]))
            for value, message in ((DRAFT + 1, r"at most the server's draft_tokens \(4\)"), (-1, "integer >= 0"),
                                   ("2", "integer >= 0"), (True, "integer >= 0")):
                with pytest.raises(openai.BadRequestError, match=message):
                    await _chat(client, server, examples[0], {"sgl_draft_tokens": value})
            with pytest.raises(openai.BadRequestError, match="integer >= 0"):  # without images too
                await _chat(client, server, None, {"sgl_draft_tokens": -1})
            for example in (examples[0], None):  # null: refused, not silently the server's setting
                for field in ("sgl_draft_tokens", "sgl_keep_ratio"):
                    with pytest.raises(openai.BadRequestError, match=f"{field} is null"):
                        await _chat(client, server, example, {field: None})
            return await good

    _, tokens, finish = asyncio.run(asyncio.wait_for(go(), TIMEOUT_S))
    assert tokens and finish == "stop"
    assert server.healthy()


def test_tensor_parallel_drafts(shapes_pair, examples, tmp_path, monkeypatch):
    """TP=2 (each rank runs a share of the guide; the drafts are the scheduler's): drafted answers
    equal undrafted ones, and drafts are accepted."""
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from engine_utils import close
    from vllm_sgl.reference import build_prompt_text

    guide, target = shapes_pair
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank
    trace = tmp_path / "trace.jsonl"
    sgl = {"guide_model": str(guide), "keep_ratio": KEEP_RATIO, "guide_max_tokens": MAX_TOKENS, "draft_tokens": DRAFT,
           "trace_path": str(trace)}
    llm = LLM(model=str(target), model_impl="sgl", additional_config={"sgl": sgl}, tensor_parallel_size=2,
              dtype="float32", max_model_len=512, kv_cache_memory_bytes=64 * 2**20, limit_mm_per_prompt={"image": 1},
              seed=0)
    try:
        processor = AutoProcessor.from_pretrained(target)
        prompts = [{"prompt": build_prompt_text(processor, 1, e.question), "multi_modal_data": {"image": e.image}}
                   for e in examples]
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
        drafted = llm.generate(prompts, params, use_tqdm=False)
        plain = llm.generate([{**p, "mm_processor_kwargs": {"sgl_draft_tokens": 0}} for p in prompts], params, use_tqdm=False)
    finally:
        close(llm)
    assert [list(o.outputs[0].token_ids) for o in drafted] == [list(o.outputs[0].token_ids) for o in plain]
    lines = read_trace(trace)
    assert sum(lines[user_request_id(o.request_id)]["draft_accepted"] for o in drafted) > 0
    assert {lines[user_request_id(o.request_id)]["guide_rank"] for o in drafted} == {0, 1}
    assert all(lines[user_request_id(o.request_id)]["draft_proposed"] == 0 for o in plain)


# -- the rule and the settings, without an engine ----------------------------------------------------


def test_next_draft_follows_the_answer_until_the_first_disagreement():
    from vllm_sgl.engine.draft import next_draft

    answer = [5, 6, 7, 8, 9, 2]
    # never the request's stop tokens (its end-of-sequence): accepting one would save no step
    assert next_draft([5, 6, 7, 1], [5], 4, stops={1}) == [6, 7]
    assert next_draft([5, 6, 7, 1], [5, 6, 7], 4, stops={1}) == []
    assert next_draft([5, 6, 7, 1], [5, 6, 7], 4) == [1]  # ignore_eos: the end-of-sequence is an ordinary token
    assert next_draft(answer, [5], 4) == [6, 7, 8, 9]
    assert next_draft(answer, [5, 6, 7, 8], 4) == [9, 2]  # the answer's end bounds the draft
    assert next_draft(answer, [5, 6, 7, 8, 9, 2], 4) == []  # spent
    assert next_draft(answer, [5, 3], 4) == []  # the target disagreed: nothing more, at every later step
    assert next_draft(answer, [5, 3, 7], 4) == []
    assert next_draft(answer, [5], 0) == []
    assert next_draft([], [5], 4) == []


def test_draft_tokens_is_bounded_by_vllms_sampler():
    from vllm.v1.sample.rejection_sampler import MAX_SPEC_LEN

    from vllm_sgl.engine.config import MAX_DRAFT_TOKENS, SGLConfig, SGLConfigError

    assert MAX_DRAFT_TOKENS == MAX_SPEC_LEN
    with pytest.raises(SGLConfigError, match="at most 128"):
        SGLConfig.from_dict({"guide_model": "g", "guide_max_tokens": 256, "draft_tokens": 200})


def test_draft_settings_are_checked():
    from vllm_sgl.engine.config import SGLConfig, SGLConfigError, parse_request_fields

    assert SGLConfig.from_dict({"guide_model": "g", "draft_tokens": 4}).draft_tokens == 4
    for bad, message in ((-1, "integer >= 0"), (1.5, "integer >= 0"), (True, "integer >= 0"),
                         (64, "at most guide_max_tokens")):
        with pytest.raises(SGLConfigError, match=f"draft_tokens.*{message}"):
            SGLConfig.from_dict({"guide_model": "g", "draft_tokens": bad})
    assert parse_request_fields({"sgl_draft_tokens": 2}, draft_most=4) == {"sgl_draft_tokens": 2}
    with pytest.raises(ValueError, match=r"drafting is off on this server"):
        parse_request_fields({"sgl_draft_tokens": 2}, draft_most=0)


@pytest.mark.both
def test_draft_tokens_with_a_speculative_config_is_refused(tiny_pair):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_sgl.engine import runners

    from vllm_sgl.engine.config import SGLConfigError

    guide, target = tiny_pair
    args = EngineArgs(model=str(target), model_impl="sgl", speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                                                                 "prompt_lookup_max": 2},
                      additional_config={"sgl": {"guide_model": str(guide), "guide_max_tokens": 8, "draft_tokens": 2}})
    with pytest.raises(SGLConfigError, match="leave speculative_config"):
        args.create_engine_config()
    args = EngineArgs(model=str(target), model_impl="sgl", dtype="float32",
                      additional_config={"sgl": {"guide_model": str(guide), "guide_max_tokens": 8, "draft_tokens": 2}})
    spec = args.create_engine_config().speculative_config
    adapter = runners.select()  # the runner's own route: custom_class on V1, a registered speculator on MRv2
    assert adapter.is_guide_drafting(spec) and spec.num_speculative_tokens == 2, spec
    args = EngineArgs(model=str(target), model_impl="sgl", dtype="float32", pipeline_parallel_size=2,
                      additional_config={"sgl": {"guide_model": str(guide), "guide_max_tokens": 8, "draft_tokens": 2}})
    with pytest.raises(ValueError, match="pipeline_parallel_size=2 cannot draft"):  # pydantic wraps it
        args.create_engine_config()
