"""`vllm-sgl calibrate` on the tiny pair, as users run it (a subprocess over a JSONL of images and
questions): one engine run with SEE scored but no exits, then a table per threshold."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from vllm_sgl.images import QUESTIONS, synthetic_image

SCRIPT = Path(sys.executable).parent / "vllm-sgl"
CLI = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "vllm_sgl.cli"]


def test_calibrate_table_and_recommendation(tiny_pair, tmp_path):
    guide, target = tiny_pair
    data = tmp_path / "data.jsonl"
    lines = []
    for i in range(8):
        names = []
        for j in range(1 + i % 2):
            name = f"img{i}_{j}.png"
            synthetic_image(700 + 10 * i + j, (224 + 56 * (i % 3), 224)).save(tmp_path / name)
            names.append(name)
        rec = {"images": names, "question": QUESTIONS[i % len(QUESTIONS)]}
        if i % 2 == 0:
            rec["answer"] = "yes"
        lines.append(json.dumps(rec))
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "calib"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [*CLI, "calibrate", "--target", str(target), "--guide", str(guide), "--data", str(data),
         "--guide-max-tokens", "16", "--max-tokens", "16", "--thresholds", "0:0.2:0.05", "--min-agreement", "0",
         "--dtype", "float32", "--max-model-len", "4096", "--kv-cache-memory-bytes", str(256 * 2**20),
         "--out-dir", str(out)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "calibrate.csv") as f:
        rows = list(csv.DictReader(f))
    assert [round(float(r["threshold"]), 6) for r in rows] == [0.0, 0.05, 0.1, 0.15, 0.2]
    rates = [float(r["exit_rate"]) for r in rows]
    assert rates == sorted(rates, reverse=True)  # a higher threshold never exits more
    assert rates[0] > 0  # the tiny guide finishes some answers: at threshold 0 they would exit
    for r in rows:
        assert float(r["expected_speedup"]) >= 1.0
        assert 0.0 <= float(r["accuracy_with_see"]) <= 1.0 and 0.0 <= float(r["accuracy_target_only"]) <= 1.0
        if int(r["exits"]):
            assert 0.0 <= float(r["agreement"]) <= 1.0
    # min agreement 0: the lowest threshold with an exit is recommended
    assert "recommended see_threshold: 0 " in proc.stdout, proc.stdout
    meta = json.loads((out / "calibrate.json").read_text())
    assert meta["recommended_threshold"] == 0.0
    assert (out / "calibrate.png").stat().st_size > 0

    bad = subprocess.run([*CLI, "calibrate", "--target", str(target), "--guide", str(guide), "--data",
                          str(tmp_path / "missing.jsonl")], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "missing.jsonl" in bad.stderr and "Traceback" not in bad.stderr
