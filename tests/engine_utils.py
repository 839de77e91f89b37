"""Helpers for tests that start real vLLM engines on the tiny pair (CPU, float32)."""

from __future__ import annotations

import gc
import dataclasses
from dataclasses import dataclass, field
from importlib.util import find_spec

from vllm_sgl.images import synthetic_clip, synthetic_image
from vllm_sgl.reference import build_prompt_text

# Enough KV cache for the tests; the default fraction of node memory is too much for several engines.
ENGINE_KW = dict(
    dtype="float32",
    max_model_len=4096,
    kv_cache_memory_bytes=256 * 2**20,
    limit_mm_per_prompt={"image": 2},
    seed=0,
    # Eager: torch.compile is 13-15 s of each engine's start here, and SGL's code (the front end,
    # scheduler, guide, embeddings and positions) runs outside the compiled backbone. Compiled
    # engines stay where users' conditions are the point: test_engine's keep-0.25 engine (0.32),
    # the bf16 test (0.34), throughput.py's smoke run; and the pipeline-parallel engine on 0.32,
    # which vLLM's CPU runner cannot run eager (test_parallel).
    enforce_eager=True,
)
MAX_TOKENS = 8

# vLLM 0.34 (scripts/with-vllm-0.34.sh): Model Runner V2 only, its Triton kernels in Triton's
# interpreter (TRITON_INTERPRET must reach its engines).
MRV2_ONLY = find_spec("vllm.v1.worker.gpu_model_runner") is None


@dataclass
class Case:
    """One request: images (by seed and optional size), videos (by seed, frames, size, fps; after
    the images in the prompt) and a question."""

    question: str
    images: list[tuple[int, tuple[int, int] | None]] = field(default_factory=list)
    videos: list[tuple[int, int, tuple[int, int], float]] = field(default_factory=list)

    def pil_images(self):
        return [synthetic_image(seed, size) for seed, size in self.images]

    def clips(self):
        return [synthetic_clip(seed, frames, size, fps) for seed, frames, size, fps in self.videos]


# A mixed batch: text only, one image, two images, different sizes, the same image twice with
# different questions (their keep sets must differ).
MIXED = [
    Case("hello what is a red circle"),
    Case("what is in the image", [(1, None)]),
    Case("how many objects are there", [(2, (448, 224))]),
    Case("describe the picture in one short sentence", [(3, (112, 112))]),
    Case("where is the small blue shape", [(4, None), (5, (224, 336))]),
    Case("what is in the image", [(6, (336, 336))]),
    Case("count the circles", [(6, (336, 336))]),
    Case("write one word"),
    Case("what shape is at the top", [(7, (280, 168)), (8, (168, 280))]),
    Case("is there a red square on the left", [(9, (56, 56))]),
]


# Videos: a clip alone, an image and a clip, two clips (one of a single temporal patch at 2 fps: its
# time positions spaced twice as far on Qwen2.5-VL). Clips keep (t - 1) x t_factor within the
# spatial extent, where transformers' positions (the reference's check against it) agree with vLLM's.
# InternVL takes them with its own frame counts (video_cases).
VIDEO = [
    Case("what happens in the video", videos=[(1, 4, (112, 112), 4.0)]),
    Case("where is the red shape", [(2, (112, 168))], videos=[(3, 6, (112, 84), 4.0)]),
    Case("compare the two clips", videos=[(4, 4, (84, 112), 4.0), (5, 2, (112, 112), 2.0)]),
]
VIDEO_LIMITS = {"image": 2, "video": 2}  # engines that serve VIDEO


def video_cases(family: str) -> list[Case]:
    """VIDEO for a family. An InternVL frame is 256 tokens at any size: a clip of one frame, then two
    frames a clip (one count per prompt: transformers' InternVL processor stacks a prompt's videos)."""
    if family != "internvl":
        return VIDEO
    return [dataclasses.replace(c, videos=[(seed, 1 if i == 0 else 2, size, fps) for seed, _, size, fps in c.videos])
            for i, c in enumerate(VIDEO)]


def prompts_for(cases, processor):
    out = []
    for c in cases:
        p = {"prompt": build_prompt_text(processor, len(c.images), c.question, len(c.videos))}
        if c.images or c.videos:
            p["multi_modal_data"] = {}
        if c.images:
            p["multi_modal_data"]["image"] = c.pil_images()
        if c.videos:
            p["multi_modal_data"]["video"] = c.clips()
        out.append(p)
    return out


def sgl_llm(target, guide, keep_ratio, trace_path=None, sgl_settings: dict | None = None, **kw):
    from vllm import LLM

    sgl = {"guide_model": str(guide), "keep_ratio": keep_ratio, "guide_max_tokens": MAX_TOKENS,
           **(sgl_settings or {})}
    if trace_path is not None:
        sgl["trace_path"] = str(trace_path)
    return LLM(model=str(target), model_impl="sgl", additional_config={"sgl": sgl}, **{**ENGINE_KW, **kw})


def vanilla_llm(target, **kw):
    from vllm import LLM

    return LLM(model=str(target), **{**ENGINE_KW, **kw})


def greedy(llm, prompts):
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [len(o.prompt_token_ids) for o in outs], outs


def close(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort; the process exits anyway
        pass
    del llm
    gc.collect()


def read_trace(path):
    import json

    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def trace_by_request(trace, outputs):
    """Trace lines keyed by the index of the output they belong to (LLM request ids are counters)."""
    by_id = {}
    for line in trace:
        by_id[line["request_id"]] = line
    out = []
    for o in outputs:
        matches = [v for k, v in by_id.items() if k == o.request_id or k.split("-")[0] == o.request_id]
        assert len(matches) == 1, (o.request_id, list(by_id))
        out.append(matches[0])
    return out


def assert_matches_reference(cases, tokens, lens, trace, reference_results, ratio, importance="sgl",
                             phases=("scheduler", "reused")) -> None:
    """Per request: the engine's prompt length, keep sets, guide answer and greedy target tokens
    equal the reference's (at that keep rule); image requests took the scheduler's guide phase."""
    for case, toks, n, line in zip(cases, tokens, lens, trace, strict=True):
        ref = reference_results(case, ratio, importance)
        assert n == ref.target_prompt_len
        assert line["target_prompt_len"] == n
        if case.images or case.videos:
            assert line["num_visual_tokens"] == ref.num_visual_tokens
            assert line["keep_indices"] == ref.keep_indices, (case, line["keep_indices"], ref.keep_indices)
            assert line["importance"] == importance
            assert line["guide_answer_ids"] == ref.guide_answer_ids
            # The guide ran in the scheduler's guide phase (or an identical earlier request's result
            # was reused there): the keep sets came with the request's first target step, so the
            # answer and scores existed before its prefill was scheduled.
            assert line["guide_phase"] in phases
            # text tokens + sum of k over items (a Qwen3-VL video: k_f per frame, Family.frame_spans)
            text = ref.prompt_len - sum(ref.num_visual_tokens)
            assert n == text + sum(len(k) for k in ref.keep_indices)
        else:
            assert line["keep_indices"] == [] and line["num_visual_tokens"] == []
            assert line["guide_phase"] is None
        assert toks == ref.target_pruned_answer_ids, case
