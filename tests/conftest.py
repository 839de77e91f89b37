"""Shared fixtures: tiny checkpoint pairs are built once and cached under .cache/ (or
$VLLM_SGL_CACHE), so repeated test runs and the demo reuse them."""

from __future__ import annotations

import os

import pytest

# Engine tests must never see Triton's interpreter (vLLM changes behaviour when Triton looks
# usable); kernel tests set it only inside their own subprocesses.
os.environ.pop("TRITON_INTERPRET", None)


@pytest.fixture(scope="session")
def tiny_pair():
    """(guide_dir, target_dir) of the default Qwen2.5-VL tiny pair."""
    from vllm_sgl.tiny import TinyPairSpec, default_pair_dir, ensure_tiny_pair

    return ensure_tiny_pair(default_pair_dir("tiny-qwen2_5_vl"), TinyPairSpec())


@pytest.fixture(scope="session")
def tiny_pair_qwen2_vl():
    from vllm_sgl.tiny import TinyPairSpec, default_pair_dir, ensure_tiny_pair

    return ensure_tiny_pair(default_pair_dir("tiny-qwen2_vl"), TinyPairSpec(family="qwen2_vl"))


@pytest.fixture(scope="session")
def reference(tiny_pair):
    from vllm_sgl.reference import SGLReference

    return SGLReference(*tiny_pair)
