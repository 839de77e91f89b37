"""Shared fixtures: tiny checkpoint pairs are built once and cached under .cache/ (or
$VLLM_SGL_CACHE), so repeated test runs and the demo reuse them."""

from __future__ import annotations

import os

import pytest

from engine_utils import MRV2_ONLY

# vLLM 0.34 (scripts/with-vllm-0.34.sh) has only Model Runner V2, whose kernels run in Triton's
# interpreter on these CPUs; there, only the tests marked `both` run (the engine, serving, SEE,
# drafting and parallel tests: README, "Testing on vLLM 0.34").
if not MRV2_ONLY:
    # vLLM's CPU build must never see Triton's interpreter (it changes behaviour when Triton looks
    # usable); kernel tests set it only inside their own subprocesses.
    os.environ.pop("TRITON_INTERPRET", None)


def pytest_collection_modifyitems(config, items):
    if not MRV2_ONLY:
        return
    keep = [item for item in items if item.get_closest_marker("both")]
    dropped = [item for item in items if not item.get_closest_marker("both")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """In-process reference runs: the tiny models gain nothing from intra-op threads, and on a
    shared 2-core machine spinning OpenMP threads make them 10-50x slower. Engines run in their
    own processes and are not affected."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_pair():
    """(guide_dir, target_dir) of the default Qwen2.5-VL tiny pair."""
    from vllm_sgl.tiny import TinyPairSpec, default_pair_dir, ensure_tiny_pair

    return ensure_tiny_pair(default_pair_dir("tiny-qwen2_5_vl"), TinyPairSpec())


@pytest.fixture(scope="session")
def shapes_pair():
    """(guide_dir, target_dir) of the trained shapes pair (vllm_sgl/tasks/weights)."""
    from vllm_sgl.tasks import has_trained_weights
    from vllm_sgl.tiny import SHAPES_SPEC, default_pair_dir, ensure_tiny_pair

    assert has_trained_weights("shapes"), "vllm_sgl/tasks/weights holds no trained shapes pair"
    return ensure_tiny_pair(default_pair_dir("shapes-pair"), SHAPES_SPEC)


@pytest.fixture(scope="session")
def tiny_pair_qwen2_vl():
    from vllm_sgl.tiny import TinyPairSpec, default_pair_dir, ensure_tiny_pair

    return ensure_tiny_pair(default_pair_dir("tiny-qwen2_vl"), TinyPairSpec(family="qwen2_vl"))


@pytest.fixture(scope="session")
def tiny_pair_qwen3_vl():
    """Qwen3-VL: deepstack, interleaved M-RoPE, per-head q/k norms, 16 px patches."""
    from vllm_sgl.tiny import TinyPairSpec, default_pair_dir, ensure_tiny_pair

    return ensure_tiny_pair(default_pair_dir("tiny-qwen3_vl"), TinyPairSpec(family="qwen3_vl"))


@pytest.fixture(scope="session")
def tiny_pair_qwen3_vl_moe():
    """A dense Qwen3-VL guide with a Qwen3-VL-MoE target (as 4B guiding 30B-A3B)."""
    from vllm_sgl.tiny import TinyPairSpec, default_pair_dir, ensure_tiny_pair

    return ensure_tiny_pair(default_pair_dir("tiny-qwen3_vl_moe"), TinyPairSpec(family="qwen3_vl_moe"))


@pytest.fixture(scope="session")
def tiny_pair_internvl():
    """InternVL (transformers format): 448 px tiles + thumbnail, 256 tokens each, 1D RoPE."""
    from vllm_sgl.tiny import TinyPairSpec, default_pair_dir, ensure_tiny_pair

    return ensure_tiny_pair(default_pair_dir("tiny-internvl"), TinyPairSpec(family="internvl"))


@pytest.fixture(scope="session")
def family_pairs(request):
    """Family name -> (guide_dir, target_dir) of its tiny pair, built on first use."""
    names = {"qwen2_5_vl": "tiny_pair", "qwen2_vl": "tiny_pair_qwen2_vl", "qwen3_vl": "tiny_pair_qwen3_vl",
             "qwen3_vl_moe": "tiny_pair_qwen3_vl_moe", "internvl": "tiny_pair_internvl"}
    return lambda family: request.getfixturevalue(names[family])


@pytest.fixture(scope="session")
def reference(tiny_pair):
    from vllm_sgl.reference import SGLReference

    return SGLReference(*tiny_pair)


@pytest.fixture(scope="session")
def processor(tiny_pair):
    """The target's processor (chat template, image processor) of the default tiny pair."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_pair[1])


@pytest.fixture(scope="session")
def reference_results(reference):
    """The reference's answer for a case (engine_utils.Case) at a keep ratio, computed once per
    session (engine_utils.MAX_TOKENS new tokens)."""
    from engine_utils import MAX_TOKENS
    from vllm_sgl.reference import SGLSettings

    cache = {}

    def get(case, ratio: float, importance: str = "sgl"):
        key = (case.question, tuple(case.images), tuple(case.videos), ratio, importance)
        if key not in cache:
            cache[key] = reference.run(
                case.pil_images(), case.question,
                SGLSettings(keep_ratio=ratio, max_new_tokens=MAX_TOKENS, importance=importance), videos=case.clips(),
            )
        return cache[key]

    return get

