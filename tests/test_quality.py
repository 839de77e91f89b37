"""The shapes pair's tools: the training script runs, and `make-tiny-pair --task shapes` writes the
trained pair (or says it has not been trained into the repo yet)."""

import json
import subprocess
import sys
from pathlib import Path


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
