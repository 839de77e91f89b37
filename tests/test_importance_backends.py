"""The reference's three importance backends on the tiny pair: explicit probabilities (eager), the
kernel's PyTorch definition on captured q/k (torch), and the fused Triton kernel (triton: the
interpreter on CPU, in a subprocess so this process never sees TRITON_INTERPRET)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from vllm_sgl.capture import importance_from_capture
from vllm_sgl.images import synthetic_image
from vllm_sgl.reference import QKCapture


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    paths = []
    for seed, size in ((11, (336, 224)), (12, (224, 224))):
        p = d / f"{seed}.png"
        synthetic_image(seed, size).save(p)
        paths.append(str(p))
    return paths


def test_definition_matches_eager_importance(reference):
    for seed, q in ((21, "what is in the image"), (22, "count the circles")):
        prep = reference.prepare([synthetic_image(seed), synthetic_image(seed + 100, (224, 168))], q)
        capture = QKCapture(prep.visual_spans, reference.guide.num_layers)
        _, _, _, _, eager = reference.guide_pass(prep, 8, capture)
        defined = importance_from_capture(prep, capture, backend="torch")
        for e, d in zip(eager, defined):
            torch.testing.assert_close(d, e, rtol=1e-5, atol=1e-6)


def _cli(tiny_pair, images, backend):
    guide, target = tiny_pair
    cmd = [sys.executable, "-m", "vllm_sgl.cli", "reference", "--guide", str(guide), "--target", str(target),
           "--prompt", "where is the small blue shape", "--keep-ratio", "0.25", "--max-new-tokens", "6",
           "--importance-backend", backend, "--json"]
    for p in images:
        cmd += ["--image", p]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_three_backends_same_keep_set(tiny_pair, images):
    import triton

    if triton.__version__ != "3.8.0":
        pytest.skip(f"interpreter checked with triton 3.8.0 only, have {triton.__version__}")
    results = {b: _cli(tiny_pair, images, b) for b in ("eager", "torch", "triton")}
    for b in ("torch", "triton"):
        assert results[b]["importance_backend"] == b
        assert results[b]["keep_indices"] == results["eager"]["keep_indices"], b
        for mine, eager in zip(results[b]["importance"], results["eager"]["importance"]):
            torch.testing.assert_close(torch.tensor(mine), torch.tensor(eager), rtol=1e-4, atol=1e-5)
        assert results[b]["target_pruned_answer_ids"] == results["eager"]["target_pruned_answer_ids"]
