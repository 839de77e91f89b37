"""A bounded, seeded soak of `vllm-sgl serve --model-impl sgl` under every cache path at once.

One server with a small KV cache (requests get preempted and recomputed), chunked prefill with a
64-token step budget (so also a small encoder cache: images are evicted and encoded again),
prefix caching on (covered images reach the worker without pixels), and the test hook that makes
the guide fail for some requests. A seeded random mix of one- and two-image requests over a small
pool of images and questions, with repeats, plain and streamed, some aborted by the client
mid-request. Must hold: every request answers or gets a clean error; every answer of a case is the
same and equals the reference's; the guide failures are counted on /metrics and touch no other
request; preemption really happened; at the end the engine is alive, nothing runs or waits and no
KV block is in use.

Replay a failure with VLLM_SGL_SOAK_SEED=<seed printed in the failure>.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import defaultdict
from dataclasses import dataclass

import pytest

from serve_utils import ServeCase, ask, client_for, png_data_url, serve, user_message
from vllm_sgl.images import QUESTIONS
from vllm_sgl.engine.guide_runner import FAIL_GUIDE_ENV
from vllm_sgl.reference import SGLSettings

openai = pytest.importorskip("openai")

SEED = int(os.environ.get("VLLM_SGL_SOAK_SEED", "20261201"))
KEEP_RATIO = 0.25
MAX_TOKENS = 12
NUM_REQUESTS = 40
IN_FLIGHT = 8
TIMEOUT_S = 300
FAIL_MARK = "fail-"  # the guide fails for request ids containing this (FAIL_GUIDE_ENV)
IMAGE_POOL = [(501, (448, 448)), (502, (336, 224)), (503, (224, 448)), (504, (112, 112)), (505, (448, 336)),
              (506, (280, 280))]
# per-token KV of the tiny target: 4 layers x 2 KV heads x 64 dims x (K, V) x 4 bytes = 4 KiB;
KV_BYTES = 2 * 2**20  # 512 tokens: two or three requests at once, so decodes preempt
DRAFT = 4  # the guide's answer drafts for the target (vllm_sgl.engine.draft) under all of the above
LONG_TOKENS = 120  # "long" jobs decode this many tokens (ignore_eos) and hold KV while they grow


@dataclass
class Job:
    index: int
    case: ServeCase
    kind: str  # plain | stream | long | abort (cancelled) | drop (stream closed) | fail (the guide fails)


def make_jobs(seed: int) -> list[Job]:
    rng = random.Random(seed)
    cases = []
    for _ in range(10):
        images = rng.sample(IMAGE_POOL, rng.choice([1, 1, 2]))
        cases.append(ServeCase(rng.choice(QUESTIONS), tuple(images)))
    kinds = ["plain"] * 8 + ["stream"] * 4 + ["long"] * 3 + ["abort"] * 3 + ["drop"] * 2 + ["fail"]
    jobs = [Job(i, rng.choice(cases), rng.choice(kinds)) for i in range(NUM_REQUESTS)]
    jobs[3].kind, jobs[17].kind = "fail", "fail"  # at least two, whatever the seed
    for job in jobs:
        # A failing request asks its own question: a request identical to one whose guide already
        # ran reuses that result (the scheduler's guide-result reuse), and the guide, where the
        # failure is injected, would not run for it.
        if job.kind == "fail":
            job.case = ServeCase(f"{job.case.question} (request {job.index})", job.case.images)
    return jobs


@pytest.fixture(scope="module")
def soak_server(tiny_pair, tmp_path_factory):
    guide, target = tiny_pair
    sgl = {"guide_model": str(guide), "keep_ratio": KEEP_RATIO, "guide_max_tokens": MAX_TOKENS, "draft_tokens": DRAFT,
           "guide_step_tokens": 1024}  # the guide reads whole requests; the target's prefill chunks stay 64
    args = [
        "--dtype", "float32",
        "--max-model-len", "384",
        "--kv-cache-memory-bytes", str(KV_BYTES),
        "--limit-mm-per-prompt", '{"image": 2}',
        "--enable-chunked-prefill", "--max-num-batched-tokens", "64",
        "--max-num-seqs", str(IN_FLIGHT),
        # 32-token blocks (the CPU default is 128, longer than most of these prompts, so they
        # would never fill a block the prefix cache can share)
        "--enable-prefix-caching", "--block-size", "32",
        "--seed", "0",
    ]
    with serve(target, sgl, tmp_path_factory.mktemp("soak"), args, env={FAIL_GUIDE_ENV: FAIL_MARK}) as srv:
        yield srv


async def run_job(client, server, job: Job, urls, rng: random.Random):
    """('answer', Answer) | ('error', status) | ('aborted', None)."""
    if job.kind == "abort":
        delay = rng.uniform(0.05, 1.5)
        try:
            answer = await asyncio.wait_for(
                ask(client, server, job.case, urls, stream=False, max_tokens=200, extra_body={"ignore_eos": True}),
                delay,
            )
        except asyncio.TimeoutError:
            return "aborted", None
        return "answer", answer
    if job.kind == "drop":
        s = await client.chat.completions.create(
            model=server.model, messages=user_message(urls, job.case.question), temperature=0, max_tokens=200, stream=True,
            extra_body={"ignore_eos": True},
        )
        async for chunk in s:
            if any(c.delta.content for c in chunk.choices):
                break
        await s.close()
        return "aborted", None
    headers = {"X-Request-Id": f"{FAIL_MARK}{job.index}"} if job.kind == "fail" else {}
    long = dict(max_tokens=LONG_TOKENS, extra_body={"ignore_eos": True}) if job.kind == "long" else {}
    try:
        answer = await ask(client, server, job.case, urls, stream=job.kind == "stream",
                           **{"max_tokens": MAX_TOKENS, **long}, extra_headers=headers)
    except openai.APIStatusError as e:
        return "error", e.status_code
    return "answer", answer


def test_soak(soak_server, reference):
    server = soak_server
    jobs = make_jobs(SEED)
    urls = {j.case: [png_data_url(img) for img in j.case.pil_images()] for j in jobs}
    before = server.metrics()

    async def go():
        rng = random.Random(SEED + 1)
        sem = asyncio.Semaphore(IN_FLIGHT)
        async with client_for(server, TIMEOUT_S) as client:

            async def one(job):
                async with sem:
                    return await run_job(client, server, job, urls[job.case], random.Random(rng.random()))

            outcomes = await asyncio.gather(*(one(j) for j in jobs))
            # Then a few cases twice in a row on the idle engine: the second one hits the prefix
            # cache whatever the mix above evicted.
            tail = []
            for case in list(dict.fromkeys(j.case for j in jobs))[:3]:
                for _ in range(2):
                    tail.append((case, await ask(client, server, case, urls[case], stream=False,
                                                 max_tokens=MAX_TOKENS)))
            return outcomes, tail

    outcomes, tail = asyncio.run(asyncio.wait_for(go(), 1200))
    idle = server.wait_idle(timeout_s=90)
    where = f"(replay with VLLM_SGL_SOAK_SEED={SEED}; server log:\n{server.log_tail(30)})"

    answers, longs = defaultdict(list), defaultdict(list)
    for job, (what, value) in zip(jobs, outcomes):
        if job.kind == "fail":
            assert what == "error" and value == 500, (job, what, value, where)
        elif job.kind in ("plain", "stream"):
            assert what == "answer", (job, what, value, where)
            assert value.finish_reason in ("stop", "length"), (job, value, where)
            answers[job.case].append(value)
        elif job.kind == "long":
            assert what == "answer" and len(value.token_ids) == LONG_TOKENS, (job, what, value, where)
            longs[job.case].append(value)
        else:
            assert what in ("answer", "aborted"), (job, what, value, where)
    # Every answer of a case is the same, and the reference's (prefix-cache hits, re-encodes,
    # preemption and chunked prefill change nothing).
    for case, answer in tail:
        answers[case].append(answer)
    # A long answer (end of sequence ignored) starts with the reference's answer.
    wrong = []
    for case in {**answers, **longs}:
        ref = reference.run(case.pil_images(), case.question, SGLSettings(keep_ratio=KEEP_RATIO, max_new_tokens=MAX_TOKENS))
        expect = ref.target_pruned_answer_ids
        for a in answers[case] + longs[case]:
            if (a.token_ids[: len(expect)], len(a.prompt_token_ids)) != (expect, ref.target_prompt_len):
                wrong.append((case, a.id, a.stream, a.token_ids, len(a.prompt_token_ids), expect, ref.target_prompt_len))
        assert len({a.text for a in answers[case]}) <= 1, (case, [a.text for a in answers[case]], where)
        assert len({tuple(a.token_ids) for a in longs[case]}) <= 1, (case, where)
    assert not wrong, "\n".join(map(str, wrong)) + where

    delta = lambda name: idle.get(name, 0.0) - before.get(name, 0.0)  # noqa: E731
    num_fail = sum(j.kind == "fail" for j in jobs)
    assert delta("vllm_sgl:guide_failures_total") == num_fail, where
    assert delta("vllm:num_preemptions_total") > 0, f"no preemption: the soak did not cover it {where}"
    assert delta("vllm:prefix_cache_hits_total") > 0, where
    assert server.healthy()
    print(f"soak seed {SEED}: {len(jobs)} requests, {sum(len(v) for v in answers.values())} answers, "
          f"{num_fail} injected guide failures, {int(delta('vllm:num_preemptions_total'))} preemptions, "
          f"{int(delta('vllm:prefix_cache_hits_total'))} prefix-cache hit tokens, "
          f"{int(delta('vllm:spec_decode_num_draft_tokens_total'))} draft tokens, "
          f"{int(delta('vllm:spec_decode_num_accepted_tokens_total'))} accepted")
