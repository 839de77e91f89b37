"""Qwen3-VL (dense and MoE) and InternVL, with the evidence the Qwen2 families have
(tests/test_reference.py, test_guide_runtime.py, test_engine.py run them on Qwen2-VL / Qwen2.5-VL).

Per family, on its tiny pair (CPU, float32; the MoE pair is a dense Qwen3-VL guide with a
Qwen3-VL-MoE target, as 4B guiding 30B-A3B; InternVL's images are 448 px tiles plus a thumbnail,
256 tokens each, with 1D RoPE):
- the tiny pair is complete and both checkpoints tokenize images identically;
- the reference equals transformers' own forward and generate(), and the pruned target equals
  transformers' language model fed the kept rows at their unpruned positions, with *their*
  deepstack features (and not with another visual row's);
- one engine (chunked prefill of 64 tokens, prefix caching) gives the reference's keep sets, guide
  answers and greedy target tokens at keep 0.25 and 0.1 (per request), single and two-image
  prompts, videos (each frame after its text, Qwen3-VL's timestamp or InternVL's "FrameI:", with
  its own keep set), again from the prefix cache; keep 1.0 equals vanilla vLLM token for token;
- a mixed-family pair and an incompatible pair fail at start-up naming the field.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine_utils import (
    ENGINE_KW, MIXED, VIDEO_LIMITS, assert_matches_reference, close, greedy, prompts_for, read_trace, sgl_llm,
    trace_by_request, vanilla_llm, video_cases,
)
from vllm_sgl.images import synthetic_image
from vllm_sgl.pair import PairError, check_pair

FAMILIES = ["qwen3_vl", "qwen3_vl_moe", "internvl"]
ARCH = {"qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
        "internvl": "InternVLForConditionalGeneration"}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, family_pairs):
    """(name, pair, reference, processor, reference_results)."""
    from transformers import AutoProcessor

    from engine_utils import MAX_TOKENS
    from vllm_sgl.reference import SGLReference, SGLSettings

    pair = family_pairs(request.param)
    ref = SGLReference(*pair)
    cache = {}

    def results(case, ratio, importance="sgl"):
        key = (case.question, tuple(case.images), tuple(case.videos), ratio, importance)
        if key not in cache:
            cache[key] = ref.run(case.pil_images(), case.question,
                                 SGLSettings(keep_ratio=ratio, max_new_tokens=MAX_TOKENS, importance=importance),
                                 videos=case.clips())
        return cache[key]

    return request.param, pair, ref, AutoProcessor.from_pretrained(pair[1]), results


# ----------------------------------------------------------------------------------------------
# The tiny pair and the reference


def test_tiny_pair_is_complete_and_tokenizes_identically(family):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    name, (guide, target), _, processor, _ = family
    cg, ct = AutoConfig.from_pretrained(guide), AutoConfig.from_pretrained(target)
    assert ct.model_type == name and ct.architectures == [ARCH[name]]
    assert ct.text_config.num_hidden_layers > cg.text_config.num_hidden_layers
    if name.startswith("qwen3"):
        assert cg.model_type == "qwen3_vl"  # the dense guide of the lineage
        assert cg.vision_config.patch_size == ct.vision_config.patch_size == 16
        assert len(ct.vision_config.deepstack_visual_indexes) >= 1
        assert ct.text_config.rope_parameters.get("mrope_interleaved")
        assert type(processor).__name__ == "Qwen3VLProcessor"
    else:
        assert type(processor).__name__ == "InternVLProcessor"
        assert processor.image_processor.crop_to_patches and ct.image_seq_length == 256
    model = AutoModelForImageTextToText.from_pretrained(target, dtype=torch.float32)
    assert type(model).__name__ == ARCH[name]
    pg = AutoProcessor.from_pretrained(guide)
    images = [synthetic_image(1), synthetic_image(2, (224, 336))]
    msgs = [{"role": "user", "content": [{"type": "image"}] * 2 + [{"type": "text", "text": "count the circles"}]}]
    eg, et = (p(text=[p.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)], images=images,
                return_tensors="pt") for p in (pg, processor))
    for key in ("input_ids", "image_grid_thw", "pixel_values"):
        if key in et:
            assert torch.equal(eg[key], et[key]), key
    n_visual = int((et["input_ids"] == processor.image_token_id).sum())
    if "image_grid_thw" in et:
        assert n_visual == int(et["image_grid_thw"].prod(-1).sum()) // 4
    else:  # 256 tokens per tile; the 224 x 336 image is tiled (2 tiles + thumbnail)
        assert n_visual == 256 * et["pixel_values"].shape[0] and et["pixel_values"].shape[0] >= 3
    check_pair(guide, target)


def test_reference_matches_transformers(family):
    from test_reference import check_matches_transformers

    _, _, ref, _, _ = family
    check_matches_transformers(ref, seed=2)


# ----------------------------------------------------------------------------------------------
# Engines


@pytest.mark.both
def test_engine_matches_reference_and_vanilla(family, tmp_path):
    """One SGL engine with chunked prefill and prefix caching: the mixed batch at keep 0.25 (the
    engine's ratio), the same again (prefix-cache hits), at 0.1 and at 1.0 per request; the
    reference's keep sets, guide answers and tokens, and vanilla vLLM's tokens at 1.0."""
    name, (guide, target), _, processor, results = family
    # Videos: each frame after its text (Qwen3-VL's timestamp, InternVL's "FrameI:") keeps its own
    # k_f tokens (Family.frame_spans); a clip of one frame (Qwen3-VL: one temporal patch) is one run.
    cases, limits = MIXED + video_cases(name), VIDEO_LIMITS
    prompts = prompts_for(cases, processor)
    trace_path = tmp_path / "trace.jsonl"
    llm = sgl_llm(target, guide, keep_ratio=0.25, trace_path=trace_path, enable_prefix_caching=True,
                  enable_chunked_prefill=True, max_num_batched_tokens=64, max_num_seqs=4, limit_mm_per_prompt=limits,
                  sgl_settings={"guide_step_tokens": 4096})  # the guide reads whole requests (InternVL: 2106)
    try:
        first, lens, outs = greedy(llm, prompts)
        again, _, _ = greedy(llm, prompts)
        low, low_lens, low_outs = greedy(llm, [dict(p, mm_processor_kwargs={"sgl_keep_ratio": 0.1}) for p in prompts])
        full, full_lens, _ = greedy(llm, [dict(p, mm_processor_kwargs={"sgl_keep_ratio": 1.0}) for p in prompts])
        after, _, _ = greedy(llm, prompts[:2])  # still serving
    finally:
        close(llm)
    trace = read_trace(trace_path)
    assert_matches_reference(cases, first, lens, trace_by_request(trace, outs), results, 0.25)
    assert again == first and after == first[:2]
    assert_matches_reference(cases, low, low_lens, trace_by_request(trace, low_outs), results, 0.1)
    llm = vanilla_llm(target, limit_mm_per_prompt=limits)
    try:
        vanilla, vanilla_lens, _ = greedy(llm, prompts)
    finally:
        close(llm)
    assert (full, full_lens) == (vanilla, vanilla_lens)


# ----------------------------------------------------------------------------------------------
# Pairs that cannot work


def test_mixed_family_pair_fails_at_startup(tiny_pair, tiny_pair_qwen2_vl, tiny_pair_qwen3_vl, tiny_pair_internvl):
    from vllm import LLM

    with pytest.raises(Exception, match=r"family is 'qwen2_5_vl' in the guide .* but 'qwen3_vl' in the target"):
        LLM(model=str(tiny_pair_qwen3_vl[1]), model_impl="sgl",
            additional_config={"sgl": {"guide_model": str(tiny_pair[0])}}, **ENGINE_KW)
    # a dense guide serves an MoE target of its lineage; Qwen2-VL and Qwen2.5-VL are not one lineage
    with pytest.raises(PairError, match="family is 'qwen2_vl' in the guide"):
        check_pair(tiny_pair_qwen2_vl[0], tiny_pair[1])
    with pytest.raises(PairError, match="family is 'internvl' in the guide"):
        check_pair(tiny_pair_internvl[0], tiny_pair_qwen3_vl[1])


def test_incompatible_pair_names_the_field(tiny_pair_qwen3_vl_moe, tmp_path):
    guide, target = tiny_pair_qwen3_vl_moe
    for field, path, value in (("vision_config.patch_size", "config.json", 14),
                               ("image_processor.patch_size", "processor_config.json", 14)):
        bad = tmp_path / field
        shutil.copytree(guide, bad)
        cfg = json.loads((bad / path).read_text())
        section = cfg["vision_config"] if path == "config.json" else cfg["image_processor"]
        section["patch_size"] = value
        (bad / path).write_text(json.dumps(cfg))
        with pytest.raises(PairError, match=field.replace(".", r"\.")):
            check_pair(bad, target)


def test_incompatible_internvl_tiling_names_the_field(tiny_pair_internvl, tmp_path):
    guide, target = tiny_pair_internvl
    bad = tmp_path / "guide"
    shutil.copytree(guide, bad)
    cfg = json.loads((bad / "processor_config.json").read_text())
    cfg["image_processor"]["max_patches"] = 12
    (bad / "processor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PairError, match=r"image_processor\.max_patches is 12 in the guide"):
        check_pair(bad, target)
    # the guide reads the target's processed frames: their size and normalisation must agree too
    cfg = json.loads((guide / "processor_config.json").read_text())
    cfg["video_processor"]["size"] = {"height": 384, "width": 384}
    (bad / "processor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PairError, match=r"video_processor\.size is .*384.* in the guide"):
        check_pair(bad, target)


def test_qwen3_rotary_table_has_room_for_unpruned_positions(tiny_pair_qwen3_vl):
    """SGL's Qwen3-VL targets size their rotary table for positions past the pruned token count
    (x4, as vLLM does for video pruning); vanilla engines are unchanged."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.models import qwen3_vl, qwen3_vl_moe

    import vllm_sgl.engine.model  # noqa: F401 - the wrappers' module widens the table

    guide, target = tiny_pair_qwen3_vl
    kw = dict(model=str(target), dtype="float32", max_model_len=4096, kv_cache_memory_bytes=2**26)
    sgl = EngineArgs(**kw, model_impl="sgl", additional_config={"sgl": {"guide_model": str(guide)}}).create_engine_config()
    vanilla = EngineArgs(**kw).create_engine_config()
    assert qwen3_vl.mrope_positions_factor is qwen3_vl_moe.mrope_positions_factor
    assert qwen3_vl.mrope_positions_factor(sgl) == 4
    assert qwen3_vl.mrope_positions_factor(vanilla) == 1
