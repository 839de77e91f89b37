"""The `vllm-sgl` command line, run as a subprocess (the installed console script when present)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vllm_sgl.images import synthetic_image
from vllm_sgl.reference import SGLSettings

SCRIPT = Path(sys.executable).parent / "vllm-sgl"
CLI = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "vllm_sgl.cli"]

REFERENCE_KEYS = {
    "num_visual_tokens", "visual_span", "importance", "keep_indices", "guide_answer_ids", "confidence",
    "consistency", "exit_score", "target_pruned_answer_ids", "target_full_answer_ids",
}


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # one thread, as in-process
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "error" in lines[0]
    assert proc.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("cli-images")
    paths = [d / "a.png", d / "b.png"]
    synthetic_image(0).save(paths[0])
    synthetic_image(1, size=(140, 112)).save(paths[1])
    return paths


def _ref_args(tiny_pair, images, *extra):
    guide, target = tiny_pair
    args = ["reference", "--guide", guide, "--target", target]
    for p in images:
        args += ["--image", p]
    return args + ["--prompt", "what is in the image", *extra]


def test_reference_json_matches_in_process(tiny_pair, reference, images):
    proc = run_cli(*_ref_args(tiny_pair, images, "--keep-ratio", "0.3", "--max-new-tokens", "8", "--json"))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])
    assert isinstance(out, dict)
    assert REFERENCE_KEYS <= out.keys()
    pil = [Image.open(p).convert("RGB") for p in images]
    want = reference.run(pil, "what is in the image", SGLSettings(keep_ratio=0.3, max_new_tokens=8))
    assert out["keep_indices"] == want.keep_indices
    assert out["num_visual_tokens"] == want.num_visual_tokens and len(out["num_visual_tokens"]) == 2
    assert out["visual_span"] == want.visual_span
    assert out["guide_answer_ids"] == want.guide_answer_ids
    assert out["target_pruned_answer_ids"] == want.target_pruned_answer_ids
    assert out["target_full_answer_ids"] == want.target_full_answer_ids
    for a, b in zip(out["importance"], want.importance):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    for key in ("confidence", "consistency", "exit_score"):
        assert out[key] == pytest.approx(getattr(want, key), rel=1e-5, abs=1e-30)
    assert out["settings"]["keep_ratio"] == 0.3


def test_reference_human_readable(tiny_pair, images):
    proc = run_cli(*_ref_args(tiny_pair, images[1:], "--keep-ratio", "0.5", "--max-new-tokens", "4"))
    assert proc.returncode == 0, proc.stderr
    assert "image 0: kept " in proc.stdout
    assert "guide answer:" in proc.stdout and "target (pruned):" in proc.stdout


# ----------------------------------------------------------------------------------------------
# Bad input: non-zero exit, one line on stderr naming the problem


def test_missing_image(tiny_pair, tmp_path):
    missing = tmp_path / "nope.png"
    line = one_error_line(run_cli(*_ref_args(tiny_pair, [missing])))
    assert "not found" in line and str(missing) in line


def test_unreadable_image(tiny_pair, tmp_path):
    bad = tmp_path / "text.png"
    bad.write_text("this is not an image\n")
    line = one_error_line(run_cli(*_ref_args(tiny_pair, [bad])))
    assert "cannot read image" in line and str(bad) in line


def test_missing_guide_dir(tiny_pair, images, tmp_path):
    missing = tmp_path / "no-such-guide"
    line = one_error_line(run_cli(*_ref_args((missing, tiny_pair[1]), images[:1])))
    assert "guide" in line and str(missing) in line and "not found" in line


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


@pytest.mark.parametrize(
    "file, edit, field",
    [
        ("processor_config.json", lambda d: d["image_processor"].__setitem__("patch_size", 16),
         "image_processor.patch_size"),
        ("config.json", lambda d: d["vision_config"].__setitem__("spatial_merge_size", 4),
         "vision_config.spatial_merge_size"),
    ],
    ids=["patch_size", "spatial_merge_size"],  # merge_size: test_tiny_pair.py
)
def test_mismatched_pair_names_the_field(tiny_pair, images, tmp_path, file, edit, field):
    guide = tmp_path / "guide"
    shutil.copytree(tiny_pair[0], guide)
    _edit_json(guide / file, edit)
    line = one_error_line(run_cli(*_ref_args((guide, tiny_pair[1]), images[:1])))
    assert field in line and "guide" in line and "target" in line


@pytest.mark.parametrize("flag", ["--keep-ratio", "--consistency-ratio"])
@pytest.mark.parametrize("value", ["0", "-0.1", "1.5", "abc"])
def test_ratio_out_of_range(tiny_pair, images, flag, value):
    line = one_error_line(run_cli(*_ref_args(tiny_pair, images[:1], f"{flag}={value}")))
    assert flag in line and "(0, 1]" in line


def test_ratio_negative_as_separate_argument(tiny_pair, images):
    line = one_error_line(run_cli(*_ref_args(tiny_pair, images[:1], "--keep-ratio", "-0.1")))
    assert "--keep-ratio" in line


@pytest.mark.parametrize("value", ["1.0", "1.5", "-0.1"])
def test_prune_layer_out_of_range(tiny_pair, images, value):
    line = one_error_line(run_cli(*_ref_args(tiny_pair, images[:1], f"--prune-layer={value}")))
    assert "--prune-layer" in line and "[0, 1)" in line


# ----------------------------------------------------------------------------------------------
# make-tiny-pair


def test_make_tiny_pair_qwen2_vl(tmp_path, tiny_pair_qwen2_vl):
    from safetensors.torch import load_file

    from vllm_sgl.pair import check_pair

    out = tmp_path / "pair"
    proc = run_cli("make-tiny-pair", out, "--family", "qwen2_vl", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    for step in ("1/4", "2/4", "3/4", "4/4"):
        assert f"[make-tiny-pair] {step}" in proc.stderr
    assert str(out / "guide") in proc.stdout and str(out / "target") in proc.stdout
    for role in ("guide", "target"):
        cfg = json.loads((out / role / "config.json").read_text())
        assert cfg["model_type"] == "qwen2_vl"
        assert cfg["architectures"] == ["Qwen2VLForConditionalGeneration"]
    spec = json.loads((out / "tiny_pair.json").read_text())
    assert spec["family"] == "qwen2_vl" and spec["seed"] == 3
    check_pair(out / "guide", out / "target")
    # seed 3 is not the fixture's seed 0
    a = load_file(str(out / "guide" / "model.safetensors"))
    b = load_file(str(tiny_pair_qwen2_vl[0] / "model.safetensors"))
    assert a.keys() == b.keys() and any(not (a[k] == b[k]).all() for k in a)


def test_make_tiny_pair_bad_family(tmp_path):
    line = one_error_line(run_cli("make-tiny-pair", tmp_path / "x", "--family", "llava"))
    assert "--family" in line and "llava" in line
    assert not (tmp_path / "x").exists()


def test_bench_serve_is_vllms_client():
    """`vllm-sgl bench serve` is vLLM's serving benchmark client (the CPU build's `vllm bench serve`
    cannot start); anything else after `bench` is one clear error."""
    proc = run_cli("bench", "serve", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: vllm-sgl bench serve" in proc.stdout
    assert "--request-rate" in proc.stdout and "--dataset-name" in proc.stdout
    line = one_error_line(run_cli("bench", "throughput"))
    assert "bench serve" in line and "throughput" in line


# ----------------------------------------------------------------------------------------------
# The demo: --reference in process (the default engine mode runs on the trained pair in test_quality.py)


def test_demo_runs(tiny_pair, tmp_path, capsys):
    from vllm_sgl import demo

    pair_dir = Path(tiny_pair[0]).parent
    out = tmp_path / "demo"
    assert demo.main(["--reference", "--out", str(out), "--pair-dir", str(pair_dir), "--images", "2",
                      "--max-new-tokens", "4", "--keep-ratio", "0.25"]) == 0
    printed = capsys.readouterr()
    assert printed.out.count("visual tokens kept:") == 2
    assert "[demo] image 2/2" in printed.err
    results = json.loads((out / "results.json").read_text())["results"]
    assert len(results) == 2
    for r in results:
        n = r["num_visual_tokens"][0]
        assert len(r["keep_indices"][0]) == max(1, n // 4)
        assert {"guide_answer", "target_pruned_answer", "target_full_answer", "exit"} <= r.keys()
    with Image.open(out / "keep_sets.png") as picture:
        assert picture.width > 0 and picture.height > 0


