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


def test_calibrate_bad_data_and_flags_fail_before_the_engine(tiny_pair, tmp_path, capsys):
    """Each bad input is one error line naming the line and the file, or the flag and what it accepts,
    before any engine starts (in-process: an engine start here would take a minute, not milliseconds)."""
    import time

    from vllm_sgl.cli import main

    guide, target = tiny_pair
    synthetic_image(1).save(tmp_path / "img0.png")
    (tmp_path / "notimage.png").write_bytes(b"this is not a png\n" * 8)
    (tmp_path / "dir.png").mkdir()
    good = {"images": ["img0.png"], "question": "what is in the image"}
    lines = {
        "not an image": ({"images": ["notimage.png"], "question": "q"}, ["notimage.png", ":2:", "not an image"]),
        "a string": ({"images": "img0.png", "question": "q"}, [":2:", "must be a list"]),
        "a directory": ({"images": ["dir.png"], "question": "q"}, [":2:", "dir.png", "is a directory"]),
        "no image": ({"images": [], "question": "q"}, [":2:", "no image", "cannot be calibrated"]),
    }
    base = ["calibrate", "--target", str(target), "--guide", str(guide)]
    cases = []
    for name, (rec, words) in lines.items():
        data = tmp_path / f"{name.replace(' ', '_')}.jsonl"
        data.write_text(json.dumps(good) + "\n" + json.dumps(rec) + "\n")
        cases.append((name, [*base, "--data", str(data)], words))
    data = tmp_path / "good.jsonl"
    data.write_text(json.dumps(good) + "\n")
    flags = {
        "--thresholds abc": (["--thresholds", "abc"], ["--thresholds", "LO:HI:STEP", "[0, 1]", "'abc'"]),
        "--thresholds step 0": (["--thresholds", "0:1:0"], ["--thresholds", "STEP > 0"]),
        "--thresholds 1.5": (["--thresholds", "0.5,1.5"], ["--thresholds", "[0, 1]"]),
        "--min-agreement 1.5": (["--min-agreement", "1.5"], ["--min-agreement", "[0, 1]", "1.5"]),
        "--keep-ratio 0": (["--keep-ratio", "0"], ["--keep-ratio", "(0, 1]"]),
    }
    cases += [(name, [*base, "--data", str(data), *extra], words) for name, (extra, words) in flags.items()]
    for name, argv, words in cases:
        t0 = time.monotonic()
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, (name, code, err)
        assert err.strip().count("\n") == 0 and "error" in err, (name, err)
        for w in words:
            assert w in err, (name, w, err)
        assert time.monotonic() - t0 < 10, (name, "an engine started?")
