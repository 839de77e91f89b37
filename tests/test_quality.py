"""The trained shapes pair: it loads like any checkpoint, it answers, and SGL keeps its accuracy.

The quality bar is what the random pairs cannot give: a bug that keeps the wrong visual tokens in
the engine (the same way as in the reference) passes every exactness test but fails here.
"""

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
         "--val-examples", "4", "--eval-every", "2", "--log-every", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "guide.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r] == [1, 2]
    assert records[0]["loss"] > 0 and "val_exact" in records[1]
    final = records[-1]["final"]
    assert final["steps"] == 2 and set(final["val_exact"]) >= {"all", "color"}
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "guide.safetensors"))
    assert weights and all(str(v.dtype) == "torch.float16" for v in weights.values())
    assert (tmp_path / "guide" / "config.json").exists() and (tmp_path / "guide" / "tokenizer.json").exists()


def test_make_tiny_pair_task_shapes(tmp_path):
    """`vllm-sgl make-tiny-pair OUT --task shapes`: the trained pair in seconds, complete, and the
    target answers the test split in transformers (greedy generate)."""
    proc = subprocess.run([sys.executable, "-m", "vllm_sgl.cli", "make-tiny-pair", str(tmp_path), "--task", "shapes"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vllm_sgl.reference import build_prompt_text
    from vllm_sgl.tasks import shapes

    processor = AutoProcessor.from_pretrained(tmp_path / "target")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "target").eval()
    right = 0
    examples = shapes.split_examples("test", 10)
    for e in examples:
        enc = processor(text=[build_prompt_text(processor, 1, e.question)], images=[e.image], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=32, do_sample=False)
        reply = processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        right += shapes.is_correct(reply, e.answer)
    assert right >= 9, f"{right}/10 right"
    proc = subprocess.run([sys.executable, "-m", "vllm_sgl.cli", "make-tiny-pair", str(tmp_path / "x"), "--task",
                           "shapes", "--family", "qwen3_vl"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--task shapes writes the trained qwen2_5_vl pair" in proc.stderr


@pytest.fixture(scope="module")
def quality(shapes_pair, tmp_path_factory):
    """benchmarks/quality.py at a smoke size: three engines (SGL score-only, SGL with SEE, vanilla)
    and the reference's alternatives, on 40 test examples at keep 1 and 0.1."""
    out = tmp_path_factory.mktemp("quality")
    proc = subprocess.run(
        [sys.executable, "benchmarks/quality.py", "--pair-dir", str(Path(shapes_pair[0]).parent),
         "--examples", "40", "--calib-examples", "20", "--ratios", "1,0.1", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=1500, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((out / "quality.json").read_text())
    acc = {(r["method"], r["ratio"]): r["accuracy"] for r in data["rows"] if r["kind"] == "all"}
    return acc, data, out, proc.stdout


def test_quality_bar(quality):
    acc, _, _, _ = quality
    target, sgl = acc[("target", 1.0)], acc[("sgl", 0.1)]
    assert target >= 0.9, acc
    assert sgl >= 0.85 * target, acc
    # the engine computes the method: the reference's SGL at the same ratio answers the same
    assert abs(acc[("sgl-ref", 0.1)] - sgl) <= 0.05, acc
    # and the guide's ranking is what carries it: random tokens at the same count fall well below
    assert acc[("random", 0.1)] < sgl - 0.2, acc


def test_quality_outputs(quality):
    acc, data, out, stdout = quality
    methods = {m for m, _ in acc}
    assert {"target", "guide", "sgl", "downscaled", "random", "fastv", "guide-1-layer", "sgl-ref",
            "sgl-rho0.4"} <= methods
    kinds = {r["kind"] for r in data["rows"]}
    assert kinds == {"all", "color", "shape", "exists", "where", "list"}
    assert all(r["req_per_s"] > 0 for r in data["rows"] if r["method"] in ("sgl", "downscaled", "target"))
    see = data["see"]
    assert see["test"] and {"threshold", "exit_rate", "accuracy_with_see"} <= set(see["test"][0])
    if see["threshold"] is not None:
        assert ("sgl+see", 0.1) in acc
    assert (out / "quality.csv").read_text().startswith("method,ratio,kind")
    assert (out / "quality.png").stat().st_size > 10_000
    assert "SGL at keep 0.1 keeps" in stdout
