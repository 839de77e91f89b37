"""The shapes pair's tools: the training script runs, and `make-tiny-pair --task shapes` writes the
trained pair (or says it has not been trained into the repo yet)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent


def test_training_script_runs(tmp_path):
    """A few steps of the training script, so it cannot rot (the real run: vllm_sgl/tasks/train.py)."""
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_sgl.tasks.train", "--role", "guide", "--steps", "2", "--batch", "2",
         "--val-examples", "4", "--eval-every", "1", "--log-every", "1", "--grids", "2:1,8", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "guide.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r] == [1, 2]
    assert records[0]["loss"] > 0 and "val_exact" in records[1]
    # the first step trains on 2 x 2 cells (and reports its own validation there), the second on the task's 8 x 8
    assert [r["grid"] for r in records if "step" in r] == [2, 8] and "val_exact_grid2" in records[0]
    final = records[-1]["final"]
    assert final["steps"] == 2 and "all" in final["val_exact"]
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "guide.safetensors"))
    assert weights and all(str(v.dtype) == "torch.float16" for v in weights.values())
    assert (tmp_path / "guide" / "config.json").exists() and (tmp_path / "guide" / "tokenizer.json").exists()


def test_make_tiny_pair_task_shapes(tmp_path):
    """`vllm-sgl make-tiny-pair OUT --task shapes`: the trained pair, or, while the repo holds no
    trained weights, one line saying so and how to train them (exit 2, no traceback)."""
    from vllm_sgl.tasks import has_trained_weights

    proc = subprocess.run([sys.executable, "-m", "vllm_sgl.cli", "make-tiny-pair", str(tmp_path), "--task", "shapes"],
                          capture_output=True, text=True, timeout=300)
    if has_trained_weights("shapes"):
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (tmp_path / "guide" / "model.safetensors").exists() and (tmp_path / "target" / "config.json").exists()
    else:
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "has not been trained into the repo yet" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "vllm_sgl.cli", "make-tiny-pair", str(tmp_path / "x"), "--task",
                           "shapes", "--family", "qwen3_vl"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--task shapes writes the trained qwen2_5_vl pair" in proc.stderr


# The trained pair through the engine, as the main job shows it: the demo (vanilla vLLM and SGL at
# the demo's keep ratio and rule, two real engines) on a fixed sample of the test split, 8
# questions of each kind. The bars are what this pair achieves with margin, not the goals
# (target >= 0.90, SGL >= 90% of it): benchmarks/README.md ("quality.py") has the measured figures.
DEMO_IMAGES = 40
TARGET_BAR = 0.5         # the target alone, all kinds
# SGL at the demo's keep ratio, as a fraction of the target's accuracy: on these 40, 24 vs 31 (77%;
# 92% on quality.py's 600); with the guide's ranking inverted 7 (23%)
SGL_RETAINED_BAR = 0.7
SHAPE_BAR = 0.875        # "What shape is the <colour> object?": one object's 4 of 256 tokens decide it


def _accuracy(reqs, key, kind=None):
    picked = [r for r in reqs if kind is None or r["kind"] == kind]
    return sum(r[key] for r in picked) / len(picked)


def test_demo_on_the_trained_pair_keeps_the_tokens_the_target_needs(shapes_pair, tmp_path):
    """The main job on the trained pair: it loads in vLLM (vanilla and --model-impl sgl) and in
    transformers; SGL at the demo's keep ratio keeps the target's accuracy. A keep set that misses the objects
    fails this (checked by hand with the guide's ranking inverted: the issue's closing note)."""
    guide, target = shapes_pair
    from vllm_sgl.demo import DEMO_KEEP_RATIO
    from vllm_sgl.pruning import keep_count

    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_sgl.demo", "--out", str(out), "--pair-dir", str(Path(guide).parent),
         "--images", str(DEMO_IMAGES), "--max-new-tokens", "32"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "total prompt tokens" in proc.stdout and "right answers: vanilla" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    reqs, text_only = results["requests"][:DEMO_IMAGES], results["requests"][DEMO_IMAGES]
    for r in reqs:  # the target saw only the kept visual tokens
        assert r["num_visual_tokens"] == 256 and r["kept"] == keep_count(256, DEMO_KEEP_RATIO)
        assert r["importance"] == results["importance"]  # the engine chose them by the demo's keep rule
        assert r["prompt_tokens_sgl"] == r["prompt_tokens_vanilla"] - (r["num_visual_tokens"] - r["kept"])
    assert text_only["prompt_tokens_sgl"] == text_only["prompt_tokens_vanilla"]
    assert text_only["answer_sgl"] == text_only["answer_vanilla"]  # text-only bypasses the guide
    from PIL import Image

    with Image.open(out / "keep_sets.png") as picture:
        assert picture.width > 0

    target_acc, sgl_acc = _accuracy(reqs, "right_vanilla"), _accuracy(reqs, "right_sgl")
    wrong_shapes = [(r["question"], r["answer"], r["answer_sgl"]) for r in reqs if r["kind"] == "shape" and not r["right_sgl"]]
    assert target_acc >= TARGET_BAR, [(r["question"], r["answer"], r["answer_vanilla"]) for r in reqs]
    assert sgl_acc >= SGL_RETAINED_BAR * target_acc, (sgl_acc, target_acc)
    assert _accuracy(reqs, "right_sgl", "shape") >= SHAPE_BAR, wrong_shapes
    # the demo drafts with the guide's answer (draft_tokens 4): accepted where guide and target agree
    assert results["draft_tokens"] == 4 and sum(r["draft_accepted"] for r in reqs) > 0
    assert text_only["draft_proposed"] == 0

    # transformers' own class answers as vLLM does: the checkpoint is an ordinary one
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from vllm_sgl.reference import build_prompt_text
    from vllm_sgl.tasks import shapes

    processor = AutoProcessor.from_pretrained(target)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(target, dtype=torch.float32).eval()
    example = shapes.make_example(shapes.example_seed("test", 0), shapes.KINDS[0])
    assert example.question == reqs[0]["question"]
    enc = processor(text=[build_prompt_text(processor, 1, example.question)], images=[example.image], return_tensors="pt")
    ids = model.generate(**enc, max_new_tokens=32, do_sample=False)[0, enc["input_ids"].shape[1]:]
    assert processor.tokenizer.decode(ids, skip_special_tokens=True).strip() == reqs[0]["answer_vanilla"].strip()
