"""`vllm-sgl serve` as users run it: a real OpenAI-compatible server process on loopback (tiny pair,
`--model-impl sgl`), driven by the official `openai` client.

One server for the module (start-up is the slow part). Checked against it:
- 64 chat completions (8 in flight, half streamed) with base64 PNG images all complete, and each
  greedy answer's token ids equal the reference's pruned-target answer (the reference is proven
  equal to LLM.generate by test_engine.py); texts equal the tokenizer's decoding;
- bad requests (corrupt image, file:// URL, unreachable URL, unsupported content types, too many
  images, a prompt over the context length) get an error with a clear message while good
  requests sent at the same time succeed;
- a streaming client that disconnects after its first chunk is aborted: requests running and KV
  cache usage go back to idle;
- the engine trace names the same keep sets as the reference, and `vllm-sgl visualize` draws one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from serve_utils import (
    CLI,
    Answer,
    HOST,
    Server,
    ServeCase,
    ask,
    client_for,
    free_port,
    png_data_url,
    readme_cpu_serve,
    serve,
    user_message,
)
from vllm_sgl.reference import SGLSettings

KEEP_RATIO = 0.25
MAX_TOKENS = 8
REQUEST_TIMEOUT_S = 120
NUM_REQUESTS = 64
IN_FLIGHT = 8

openai = pytest.importorskip("openai")


# Distinct (images, question) pairs; repeated to make up the request count.
CASES = [
    ServeCase("what is in the image", ((101, None),)),
    ServeCase("how many objects are there", ((102, (448, 224)),)),
    ServeCase("describe the picture in one short sentence", ((103, (112, 112)),)),
    ServeCase("where is the small blue shape", ((104, None), (105, (224, 336)))),
    ServeCase("what is in the image", ((106, (336, 336)),)),
    ServeCase("count the circles", ((106, (336, 336)),)),  # same image, another question
    ServeCase("what shape is at the top", ((107, (280, 168)),)),
    ServeCase("is there a red square on the left", ((108, (56, 56)),)),
]


@pytest.fixture(scope="module")
def server(tiny_pair, tmp_path_factory):
    """Started with the README's CPU command (tiny pair paths resolved; the test's own settings
    added: answer budget, trace, float32, seed)."""
    guide, target = tiny_pair
    model, sgl, readme_args = readme_cpu_serve()
    assert (model, sgl["guide_model"]) == (".cache/tiny-qwen2_5_vl/target", ".cache/tiny-qwen2_5_vl/guide")
    assert sgl["keep_ratio"] == KEEP_RATIO
    sgl = {**sgl, "guide_model": str(guide), "guide_max_tokens": MAX_TOKENS}
    with serve(target, sgl, tmp_path_factory.mktemp("serve"), [*readme_args, "--dtype", "float32", "--seed", "0"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def expected(reference):
    """The reference's answer per case (keep ratio 0.25, 8 new tokens), computed once each."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; intra-op threads only contend on a shared machine
    try:
        return {
            c: reference.run(c.pil_images(), c.question, SGLSettings(keep_ratio=KEEP_RATIO, max_new_tokens=MAX_TOKENS))
            for c in CASES
        }
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer(tiny_pair):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_pair[1])


@pytest.fixture(scope="module")
def image_urls():
    return {c: [png_data_url(img) for img in c.pil_images()] for c in CASES}


async def _ask_many(server: Server, jobs: list[tuple[ServeCase, list[str], bool]], in_flight: int):
    sem = asyncio.Semaphore(in_flight)
    async with client_for(server, REQUEST_TIMEOUT_S) as client:

        async def one(job):
            async with sem:
                return await asyncio.wait_for(ask(client, server, *job), REQUEST_TIMEOUT_S)

        return await asyncio.gather(*(one(j) for j in jobs))


def _check_answer(a: Answer, expected, tokenizer) -> None:
    ref = expected[a.case]
    assert a.finish_reason in ("stop", "length"), a
    assert a.token_ids == ref.target_pruned_answer_ids, (a.case, a.stream)
    assert len(a.prompt_token_ids) == ref.target_prompt_len, (a.case, a.stream)
    # vLLM's incremental detokenizer holds back an incomplete UTF-8 sequence that a full decode
    # shows as U+FFFD (random tiny weights emit stray byte tokens); otherwise the texts are equal.
    decoded = tokenizer.decode(ref.target_pruned_answer_ids, skip_special_tokens=True)
    assert a.text.replace("\ufffd", "") == decoded.replace("\ufffd", ""), (a.case, a.stream, a.text, decoded)


@pytest.mark.both
def test_concurrent_requests_match_reference(server, expected, image_urls, tokenizer):
    # every case both ways: the first 8 requests plain, the next 8 streamed, and so on
    jobs = [(CASES[i % len(CASES)], image_urls[CASES[i % len(CASES)]], (i // len(CASES)) % 2 == 1)
            for i in range(NUM_REQUESTS)]
    before = server.metrics()
    t0 = time.monotonic()
    answers = asyncio.run(asyncio.wait_for(_ask_many(server, jobs, IN_FLIGHT), 600))
    elapsed = time.monotonic() - t0
    after = server.metrics()
    assert len(answers) == NUM_REQUESTS
    assert sum(a.stream for a in answers) == NUM_REQUESTS // 2
    for a in answers:
        _check_answer(a, expected, tokenizer)
    assert len({a.id for a in answers}) == NUM_REQUESTS
    # streamed and plain answers of a case carry the same text
    texts = {}
    for a in answers:
        texts.setdefault(a.case, set()).add(a.text)
    assert all(len(t) == 1 for t in texts.values()), texts
    print(f"{NUM_REQUESTS} requests, {IN_FLIGHT} in flight: {elapsed:.1f} s")
    # /metrics: the guide ran once per request (recorded in the engine core) and its time shows
    delta = lambda name: after.get(name, 0.0) - before.get(name, 0.0)  # noqa: E731
    # (a request identical to one whose guide already ran reuses that result: the cases repeat)
    ran = delta("vllm_sgl:guide_requests_total")
    assert ran + delta("vllm_sgl:guide_reused_total") == NUM_REQUESTS, after
    assert len(CASES) <= ran
    assert 1 <= delta("vllm_sgl:guide_step_seconds_count") <= ran
    assert 0 < delta("vllm_sgl:guide_step_seconds_sum") < elapsed
    # per request the guide ran for: the wait for its guide step, and the whole guide phase
    assert delta("vllm_sgl:guide_wait_seconds_count") == delta("vllm_sgl:guide_phase_seconds_count") == ran
    assert 0 <= delta("vllm_sgl:guide_wait_seconds_sum") < delta("vllm_sgl:guide_phase_seconds_sum") < elapsed * IN_FLIGHT
    images = sum(len(case.images) for case, _, _ in jobs)
    assert delta("vllm_sgl:images_total") == images
    assert delta("vllm_sgl:visual_tokens_seen_total") == (
        delta("vllm_sgl:visual_tokens_kept_total") + delta("vllm_sgl:visual_tokens_pruned_total")
    ) > 0


# -- bad requests ---------------------------------------------------------------------------------

BAD_REQUESTS = {
    # name: (content parts, accepted statuses, words the error message must contain)
    "corrupt image": (
        [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not a png" * 20).decode()}}],
        {400}, ["image"],
    ),
    "file url": (
        [{"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}],
        {400}, ["allowed-local-media-path"],
    ),
    "unknown content type": ([{"type": "hologram", "hologram": {"data": "x"}}], {400}, ["hologram"]),
    "audio content": (
        [{"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF").decode(), "format": "wav"}}],
        {400}, ["audio"],
    ),
    "too many images": (None, {400}, ["image", "2"]),  # filled in below: 3 images, limit 2
    "over context length": ([{"type": "text", "text": "what is in the image " * 1500}], {400}, ["context length"]),
    # vLLM answers 500 (it treats network failures as transient); SGL servers answer 400.
    "unreachable url": (
        [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}],
        {400}, ["127.0.0.1:9"],
    ),
    # vLLM says only "Failed to apply Qwen2_5_VLProcessor on data=..."; SGL servers say why
    "aspect ratio 300:1": (
        [{"type": "image_url", "image_url": {"url": png_data_url(Image.new("RGB", (300, 1)))}}],
        {400}, ["aspect ratio must be smaller than 200", "300"],
    ),
    # two 84 x 11200 px images: 2 x 1200 visual tokens for the guide, past the server's guide step
    # (max_num_batched_tokens, 2048 on vLLM's CPU build): the guide reads a request whole
    "larger than the guide's step": (
        [{"type": "image_url", "image_url": {"url": png_data_url(Image.new("RGB", (84, 11200)))}}] * 2,
        {400}, ["guide reads this request as", "1200/1200 visual tokens", "guide_step_tokens"],
    ),
}


async def _bad(client, server: Server, content: list[dict]):
    try:
        await client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": content + [{"type": "text", "text": "hi"}]}],
            temperature=0, max_tokens=MAX_TOKENS,
        )
    except openai.APIStatusError as e:
        return e.status_code, str(e)
    return None, "no error"


@pytest.mark.both
def test_bad_requests_fail_cleanly_while_good_ones_succeed(server, expected, image_urls, tokenizer):
    urls = image_urls[CASES[0]]
    bad = dict(BAD_REQUESTS)
    bad["too many images"] = ([{"type": "image_url", "image_url": {"url": urls[0]}}] * 3, *bad["too many images"][1:])

    async def go():
        async with client_for(server, REQUEST_TIMEOUT_S) as client:
            good_jobs = [(c, image_urls[c], i % 2 == 0) for i, c in enumerate(CASES)]
            tasks = [_bad(client, server, content) for content, _, _ in bad.values()]
            tasks += [ask(client, server, *job) for job in good_jobs]
            return await asyncio.wait_for(asyncio.gather(*tasks), 300)

    results = asyncio.run(go())
    bad_results, good = results[: len(bad)], results[len(bad):]
    for (name, (_, statuses, words)), (status, message) in zip(bad.items(), bad_results):
        assert status in statuses, (name, status, message)
        for w in words:
            assert w.lower() in message.lower(), (name, message)
    assert len(good) == len(CASES)
    for a in good:
        _check_answer(a, expected, tokenizer)
    # Still serving afterwards.
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as r:
        assert r.status == 200


def test_rejected_request_counts_no_images(server, image_urls):
    """A request refused before it reaches the engine (max_tokens 0) is not an image SGL pruned."""
    before = server.metrics()

    async def go():
        async with client_for(server, REQUEST_TIMEOUT_S) as client:
            with pytest.raises(openai.BadRequestError, match="max_tokens"):
                await client.chat.completions.create(
                    model=server.model, messages=user_message(image_urls[CASES[0]], CASES[0].question),
                    temperature=0, max_tokens=0,
                )

    asyncio.run(asyncio.wait_for(go(), REQUEST_TIMEOUT_S))
    after = server.metrics()
    for name in ("vllm_sgl:images_total", "vllm_sgl:visual_tokens_seen_total", "vllm_sgl:guide_requests_total"):
        assert after.get(name, 0.0) == before.get(name, 0.0), name


@pytest.mark.both
def test_request_keep_ratio_without_trust_flag(server, reference, image_urls, tokenizer):
    """The README's per-request keep ratio works on a server started without
    --trust-request-mm-kwargs; other mm_processor_kwargs still need that flag, and so does the
    spatial keep rule (its cost); a bad ratio is a 400."""
    case = CASES[1]
    ref = reference.run(case.pil_images(), case.question, SGLSettings(keep_ratio=0.1, max_new_tokens=MAX_TOKENS))

    async def with_kwargs(mm_kwargs):
        async with client_for(server, REQUEST_TIMEOUT_S) as client:
            return await client.chat.completions.create(
                model=server.model, messages=user_message(image_urls[case], case.question), temperature=0,
                max_tokens=MAX_TOKENS, extra_body={"return_token_ids": True, "mm_processor_kwargs": mm_kwargs},
            )

    r = asyncio.run(asyncio.wait_for(with_kwargs({"sgl_keep_ratio": 0.1}), REQUEST_TIMEOUT_S))
    assert r.usage.prompt_tokens == ref.target_prompt_len
    assert list(r.choices[0].model_extra["token_ids"]) == ref.target_pruned_answer_ids
    with pytest.raises(openai.BadRequestError, match=r"sgl_keep_ratio must be a number in \(0, 1\]"):
        asyncio.run(asyncio.wait_for(with_kwargs({"sgl_keep_ratio": 0}), REQUEST_TIMEOUT_S))
    with pytest.raises(openai.BadRequestError, match="trust-request-mm-kwargs"):
        asyncio.run(asyncio.wait_for(with_kwargs({"sgl_keep_ratio": 0.1, "max_pixels": 10**6}), REQUEST_TIMEOUT_S))
    # the paper's keep rule is the cheap one: allowed; the spatial one's cost needs the flag
    r = asyncio.run(asyncio.wait_for(with_kwargs({"sgl_keep_ratio": 0.1, "sgl_importance": "sgl"}), REQUEST_TIMEOUT_S))
    assert list(r.choices[0].model_extra["token_ids"]) == ref.target_pruned_answer_ids
    with pytest.raises(openai.BadRequestError,
                       match="sgl_importance 'sgl-sdpp' needs a server started with --trust-request-mm-kwargs"):
        asyncio.run(asyncio.wait_for(with_kwargs({"sgl_importance": "sgl-sdpp"}), REQUEST_TIMEOUT_S))


@pytest.mark.both
def test_request_fields_checked_without_images(server):
    """The per-request SGL fields get the same 400 naming the field on a text-only request as with
    an image (the multimodal processor, which checks them there, never runs for text); good values
    still answer."""
    bad = [({"sgl_see_threshold": 1.5}, r"sgl_see_threshold must be a number in \[0, 1\]"),
           ({"sgl_see_threshold": "abc"}, r"sgl_see_threshold must be a number in \[0, 1\]"),
           ({"sgl_see_threshold": -1}, r"sgl_see_threshold must be a number in \[0, 1\]"),
           ({"sgl_keep_ratio": 0}, r"sgl_keep_ratio must be a number in \(0, 1\]"),
           ({"sgl_importance": "topk"}, r"sgl_importance must be one of 'sgl', 'sgl-sdpp', got 'topk'"),
           ({"sgl_importance": None}, r"sgl_importance is null")]

    async def go(mm_kwargs):
        async with client_for(server, REQUEST_TIMEOUT_S) as client:
            return await client.chat.completions.create(
                model=server.model, messages=[{"role": "user", "content": "hello what is a red circle"}],
                temperature=0, max_tokens=2, extra_body={"mm_processor_kwargs": mm_kwargs})

    for mm_kwargs, message in bad:
        with pytest.raises(openai.BadRequestError, match=message):
            asyncio.run(asyncio.wait_for(go(mm_kwargs), REQUEST_TIMEOUT_S))
    ok = asyncio.run(asyncio.wait_for(go({"sgl_keep_ratio": 0.5, "sgl_see_threshold": None}), REQUEST_TIMEOUT_S))
    assert ok.choices[0].finish_reason in ("stop", "length")


# -- SEE through the OpenAI API ----------------------------------------------------------------------


@pytest.mark.both
def test_see_exit_streamed_and_plain(server, reference, image_urls, tokenizer):
    """A request that asks for SEE (threshold 0: any finished guide answer exits) gets the guide's
    answer, streamed or not, with the same text and right usage; one that does not ask is served by
    the target as before; a bad threshold is a 400 for that request only."""
    finished = []
    for case in CASES:
        ref = reference.run(case.pil_images(), case.question, SGLSettings(keep_ratio=KEEP_RATIO, max_new_tokens=MAX_TOKENS))
        if ref.guide_finished:
            finished.append((case, ref))
    assert finished, "the tiny guide finishes some of these answers"
    case, ref = finished[0]
    see = {"mm_processor_kwargs": {"sgl_see_threshold": 0.0}}

    async def go():
        async with client_for(server, REQUEST_TIMEOUT_S) as client:
            plain = await client.chat.completions.create(
                model=server.model, messages=user_message(image_urls[case], case.question), temperature=0,
                max_tokens=MAX_TOKENS, extra_body={"return_token_ids": True, **see})
            streamed = await ask(client, server, case, image_urls[case], stream=True, extra_body=see)
            target = await ask(client, server, case, image_urls[case], stream=False)
            with pytest.raises(openai.BadRequestError, match=r"sgl_see_threshold must be a number in \[0, 1\]"):
                await ask(client, server, case, image_urls[case], stream=False,
                          extra_body={"mm_processor_kwargs": {"sgl_see_threshold": 2}})
            return plain, streamed, target

    before = server.metrics()
    plain, streamed, target = asyncio.run(asyncio.wait_for(go(), REQUEST_TIMEOUT_S))
    after = server.metrics()
    answer_text = tokenizer.decode(ref.guide_answer_ids, skip_special_tokens=True)
    assert list(plain.choices[0].model_extra["token_ids"]) == ref.guide_answer_ids
    assert plain.choices[0].finish_reason == "stop"
    assert plain.choices[0].message.content.replace("\ufffd", "") == answer_text.replace("\ufffd", "")
    assert streamed.token_ids == ref.guide_answer_ids and streamed.finish_reason == "stop"
    assert streamed.text == plain.choices[0].message.content
    assert plain.usage.completion_tokens == len(ref.guide_answer_ids)
    assert plain.usage.prompt_tokens == ref.target_prompt_len
    assert target.token_ids == ref.target_pruned_answer_ids  # no SEE asked: the target answers
    delta = lambda name: after.get(name, 0.0) - before.get(name, 0.0)  # noqa: E731
    assert delta("vllm_sgl:see_exits_total") == 2 and delta("vllm_sgl:see_candidates_total") == 2
    assert after["vllm_sgl:see_exit_rate"] > 0


# -- a request that comes back after its images were evicted -----------------------------------------


def test_request_after_its_images_were_evicted(server, tokenizer):
    """Issue 10's sequence: a two-image request, sixteen requests with large other images (the
    encoder cache evicts the first request's images), then the first request again. The prefix cache
    covers its first image, so vLLM sends that image without pixels; its second image is encoded
    again. It used to kill the engine (KeyError 'pixel_values' in the worker)."""
    first = ServeCase("what is in these two images", ((201, (448, 448)), (202, (448, 448))))
    others = [ServeCase(f"question {i}: what is here", ((300 + i, (1400, 1400)),)) for i in range(16)]
    urls = {c: [png_data_url(img) for img in c.pil_images()] for c in [first, *others]}
    before = server.metrics()

    async def one(case):
        async with client_for(server, REQUEST_TIMEOUT_S) as client:
            return await ask(client, server, case, urls[case], stream=False)

    a = asyncio.run(asyncio.wait_for(one(first), REQUEST_TIMEOUT_S))
    for case in others:
        asyncio.run(asyncio.wait_for(one(case), REQUEST_TIMEOUT_S))
    again = asyncio.run(asyncio.wait_for(one(first), REQUEST_TIMEOUT_S))
    after = server.metrics()
    assert (again.token_ids, again.text) == (a.token_ids, a.text)  # greedy: the same answer
    assert after["vllm:prefix_cache_hits_total"] > before["vllm:prefix_cache_hits_total"]  # it did hit
    # the guide ran once per distinct request (17), never twice for one, and never failed; the
    # repeat reused the first request's result
    assert after["vllm_sgl:guide_requests_total"] - before["vllm_sgl:guide_requests_total"] == 17
    assert after["vllm_sgl:guide_reused_total"] - before.get("vllm_sgl:guide_reused_total", 0) == 1
    assert after.get("vllm_sgl:guide_failures_total", 0) == 0
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as r:
        assert r.status == 200


# -- memory under a stream of new images ------------------------------------------------------------

SOAK_ROUNDS, SOAK_PER_ROUND = 2, 6  # after a warm-up round


def test_engine_core_memory_levels_off_with_new_images(server):
    """Issue 22: every new image request grew the engine core by its pixels (~6 MiB for 1400 x 1400),
    up to vLLM's processor-cache size (4 GiB by default): the engine core's side of that cache stored
    each SGL image item under its prompt-salted hash, which the front end never refers to again.
    After a warm-up round the engine core's RSS must stay level over rounds of new images (before
    the fix: +6 MiB per request, about 80 MiB here)."""
    seed = iter(range(4000, 5000))

    def round_of_new_images():
        async def go():
            async with client_for(server, REQUEST_TIMEOUT_S) as client:
                for _ in range(SOAK_PER_ROUND):
                    case = ServeCase("what is here", ((next(seed), (1400, 1400)),))
                    await ask(client, server, case, [png_data_url(img) for img in case.pil_images()], stream=False,
                              max_tokens=1)

        asyncio.run(asyncio.wait_for(go(), 600))
        return server.engine_core_rss_mib()

    rss = [round_of_new_images() for _ in range(1 + SOAK_ROUNDS)]
    growth = rss[-1] - rss[0]
    print(f"engine core RSS over rounds of {SOAK_PER_ROUND} new 1400 px images: {[round(r) for r in rss]} MiB")
    assert growth < 2 * SOAK_PER_ROUND, (rss, "the engine core keeps image items nothing will ask for")


# -- client disconnect ----------------------------------------------------------------------------


@pytest.mark.both
def test_disconnected_stream_is_aborted(server, image_urls):
    idle = server.metrics()
    assert idle["vllm:num_requests_running"] == 0, idle
    long_tokens = 3000  # minutes of decoding on this machine unless the request is aborted

    async def start_and_drop():
        async with client_for(server, REQUEST_TIMEOUT_S) as client:
            s = await client.chat.completions.create(
                model=server.model, messages=user_message(image_urls[CASES[0]], CASES[0].question),
                temperature=0, max_tokens=long_tokens, stream=True, extra_body={"ignore_eos": True},
            )
            async for chunk in s:
                if any(c.delta.content for c in chunk.choices):
                    break
            busy = server.metrics()  # before closing: the request holds a slot and KV blocks
            await s.close()  # drops the connection mid-stream
            return busy, chunk.id

    busy, request_id = asyncio.run(asyncio.wait_for(start_and_drop(), REQUEST_TIMEOUT_S))
    assert busy["vllm:num_requests_running"] >= 1, busy
    assert busy["vllm:kv_cache_usage_perc"] > idle["vllm:kv_cache_usage_perc"], busy
    t0 = time.monotonic()
    while True:
        now = server.metrics()
        if (
            now["vllm:num_requests_running"] == 0
            and now.get("vllm:num_requests_waiting", 0) == 0
            and now["vllm:kv_cache_usage_perc"] <= idle["vllm:kv_cache_usage_perc"]
        ):
            break
        assert time.monotonic() - t0 < 60, f"not back to idle 60 s after the disconnect: {now}"
        time.sleep(0.5)
    # stopped well before its 3000 tokens
    generated = now.get("vllm:generation_tokens_total", 0) - idle.get("vllm:generation_tokens_total", 0)
    assert 1 <= generated < long_tokens, generated
    # the SGL model let go of the request too: its trace line is written when the worker sees it finish
    deadline = time.monotonic() + 30
    while not any(line["request_id"].startswith(request_id + "-") or line["request_id"] == request_id
                  for line in _trace(server)):
        assert time.monotonic() < deadline, f"no trace line for the aborted request {request_id}"
        time.sleep(0.5)


# -- trace + visualize ----------------------------------------------------------------------------


def _trace(server: Server) -> list[dict]:
    if not server.trace_path.exists():
        return []
    return [json.loads(raw) for raw in server.trace_path.read_text().splitlines() if raw.strip()]


@pytest.mark.both
def test_trace_keep_sets_and_visualize(server, expected, image_urls, tmp_path):
    from PIL import Image

    case = CASES[1]
    answer = asyncio.run(asyncio.wait_for(_ask_many(server, [(case, image_urls[case], False)], 1), REQUEST_TIMEOUT_S))[0]
    ref = expected[case]
    line, deadline = None, time.monotonic() + 30  # the trace line is written when the request finishes
    while line is None and time.monotonic() < deadline:
        for rec in _trace(server):
            if rec["request_id"] == answer.id or rec["request_id"].startswith(answer.id + "-"):
                line = rec
        if line is None:
            time.sleep(0.5)
    assert line is not None, f"no trace line for {answer.id}"
    assert line["num_visual_tokens"] == ref.num_visual_tokens
    assert line["keep_indices"] == ref.keep_indices
    assert line["target_prompt_len"] == ref.target_prompt_len

    image_path, out = tmp_path / "image.png", tmp_path / "keep.png"
    case.pil_images()[0].save(image_path)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [*CLI, "visualize", "--image", str(image_path), "--prompt", case.question, "--trace", str(server.trace_path),
         "--request-id", answer.id, "--target", server.model, "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    n = ref.num_visual_tokens[0]
    k = len(ref.keep_indices[0])
    assert f"kept {k}/{n}" in proc.stdout
    with Image.open(out) as img:
        w, h = img.size
    assert w >= 448 and h >= 224  # the 448x224 image as the model saw it, plus padding and caption


# -- the command itself ---------------------------------------------------------------------------


def test_server_argv():
    from vllm_sgl.engine.serve import ServeUsageError, server_argv

    argv = server_argv(["M", "--model-impl", "sgl", "--port", "1"])
    assert argv[:3] == [sys.executable, "-m", "vllm_sgl.engine.serve"]
    assert argv[3:] == ["--model", "M", "--model-impl", "sgl", "--port", "1"]
    assert server_argv(["--model", "M", "--seed", "0"])[3:] == ["--model", "M", "--seed", "0"]
    assert server_argv(["--help"])[3:] == ["--help"]
    for bad in ([], ["--port", "1"], ["M", "--model", "N"]):
        with pytest.raises(ServeUsageError):
            server_argv(bad)


def test_serve_without_model_is_one_error_line():
    proc = subprocess.run([*CLI, "serve"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "needs a model" in proc.stderr


def test_serve_bad_sgl_settings_exit_nonzero(tiny_pair):
    """The server process's own exit code and message reach the caller (os.execv, no wrapper)."""
    _, target = tiny_pair
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [*CLI, "serve", str(target), "--model-impl", "sgl", "--additional-config", '{"sgl": {"keep_ratio": 0.5}}',
         "--host", HOST, "--port", str(free_port())],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode != 0
    assert "guide_model is required" in proc.stderr, proc.stderr[-3000:]


def test_serve_help_is_vllms():
    """Arguments reach vLLM's own parser unchanged (here --help, which vLLM answers)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([*CLI, "serve", "--help"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--model-impl" in proc.stdout and "--additional-config" in proc.stdout


# -- benchmarks/throughput.py --online ------------------------------------------------------------


def test_throughput_online_mode(server, tiny_pair, tmp_path):
    """The benchmark's online path against this server (as both the 'vanilla' and the 'SGL' URL:
    this checks the client code and the report, not a speed-up)."""
    import csv

    guide, target = tiny_pair
    out = tmp_path / "bench"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--online", server.url, server.url, "--ratios", "0.25",
         "--target", str(target), "--guide", str(guide), "--num-requests", "6", "--visual-tokens", "64",
         "--output-len", "4", "--warmup", "1", "--request-rate", "20", "--block-size", "128",
         "--out-dir", str(out), "--no-plot"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "throughput.csv") as f:
        rows = {r["config"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"vanilla", "sgl@0.25"}
    for r in rows.values():
        assert r["mode"] == "online" and int(r["requests"]) == 6
        assert float(r["out_tok_per_s"]) == pytest.approx(4 * float(r["req_per_s"]), rel=1e-6)
        assert float(r["ttft_mean_s"]) > 0
    # both "configs" are this SGL server (keep 0.25): 64 -> 16 visual tokens per request
    full = _workload_prompt_tokens(script, target, ["--num-requests", "6", "--visual-tokens", "64", "--warmup", "1"])
    for r in rows.values():
        assert int(r["prompt_tokens"]) == full - 6 * (64 - 16)


def _workload_prompt_tokens(script: Path, target, argv: list[str]) -> int:
    """Unpruned prompt tokens of the benchmark's workload (its own builder + the HF processor)."""
    import importlib.util

    from transformers import AutoProcessor

    spec = importlib.util.spec_from_file_location("bench_throughput_serve", script)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--target", str(target), "--guide", str(target), *argv])
    work = bench.build_workload(args, Path(target))
    processor = AutoProcessor.from_pretrained(target)
    return sum(
        len(processor(text=[r.prompt], images=work.images(r), return_tensors="pt")["input_ids"][0])
        for r in work.requests
    )
