"""`vllm-sgl visualize`: the kept visual tokens drawn over the image(s), from the reference or from an
engine trace line. Run as a subprocess, like users do; the PNG is read back and every kept cell
must carry the outline colour at its corner, every pruned cell must not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vllm_sgl.images import synthetic_image
from vllm_sgl.reference import SGLSettings
from vllm_sgl.visualize import OUTLINE, PATCH

SCRIPT = Path(sys.executable).parent / "vllm-sgl"
CLI = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "vllm_sgl.cli"]
PAD = 8  # visualize.tile's padding
CELL = 2 * PATCH  # merge 2


def run_cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def kept_cells(png: Path, origins: list[tuple[int, int]], grids: list[tuple[int, int]]) -> list[list[int]]:
    """Per picture (top-left corner in the PNG, (rows, cols) of merged cells): the cells whose
    top-left pixel is the kept-cell outline colour."""
    with Image.open(png) as img:
        rgb = img.convert("RGB")
        out = []
        for (x0, y0), (rows, cols) in zip(origins, grids):
            out.append([
                r * cols + c for r in range(rows) for c in range(cols)
                if rgb.getpixel((x0 + c * CELL, y0 + r * CELL)) == OUTLINE
            ])
        return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("vis")
    a, b = d / "a.png", d / "b.png"
    synthetic_image(11, size=(448, 336)).save(a)  # 24 x 32 patches -> 12 x 16 = 192 tokens
    synthetic_image(12, size=(168, 280)).save(b)  # 20 x 12 patches -> 10 x 6 = 60 tokens
    return a, b


def test_from_reference(tiny_pair, reference, images, tmp_path):
    import torch

    guide, target = tiny_pair
    prompt = "what is in the image"
    out = tmp_path / "ref.png"
    proc = run_cli("visualize", "--image", images[0], "--prompt", prompt, "--guide", guide, "--target", target,
                   "--keep-ratio", "0.1", "--max-new-tokens", "8", "--out", out)
    assert proc.returncode == 0, proc.stderr
    torch.set_num_threads(1)
    with Image.open(images[0]) as img:
        ref = reference.run([img.convert("RGB")], prompt, SGLSettings(keep_ratio=0.1, max_new_tokens=8))
    assert ref.num_visual_tokens == [192]
    assert "kept 19/192" in proc.stdout
    assert out.exists()
    with Image.open(out) as img:
        w, h = img.size
    # the picture as the model saw it (448 x 336), padding on both sides, a caption band below
    assert w == 448 + 2 * PAD
    assert 336 + 2 * PAD + 10 <= h <= 336 + 2 * PAD + 40
    assert kept_cells(out, [(PAD, PAD)], [(12, 16)]) == ref.keep_indices


def test_from_trace_two_images(tiny_pair, images, tmp_path):
    _, target = tiny_pair
    keeps = [[0, 5, 17, 191], [1, 2, 59]]
    trace = tmp_path / "trace.jsonl"
    lines = [
        {"request_id": "chatcmpl-other-1", "num_visual_tokens": [], "keep_indices": [], "target_prompt_len": 9},
        {"request_id": "chatcmpl-abc-5f3e", "num_visual_tokens": [192, 60], "keep_indices": keeps,
         "guide_answer_ids": [1, 2], "target_prompt_len": 40},
    ]
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "trace.png"
    proc = run_cli("visualize", "--image", images[0], "--image", images[1], "--trace", trace,
                   "--request-id", "chatcmpl-abc", "--processor", target, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "kept 4/192, 3/60" in proc.stdout
    # pictures side by side, top-aligned: the second starts after the first one's width + padding
    with Image.open(out) as img:
        assert img.size[0] == PAD + 448 + PAD + 168 + PAD
    assert kept_cells(out, [(PAD, PAD), (PAD + 448 + PAD, PAD)], [(12, 16), (10, 6)]) == keeps

    # errors: one line, exit 2
    for args, words in [
        (["--request-id", "nope"], "not in trace"),
        (["--request-id", "chatcmpl-other-1"], "no keep sets"),
    ]:
        p = run_cli("visualize", "--image", images[0], "--image", images[1], "--trace", trace, *args,
                    "--processor", target, "--out", tmp_path / "x.png")
        assert p.returncode == 2 and words in p.stderr and p.stderr.count("\n") == 1, p.stderr
    # the wrong image for the request: its token count differs from the trace's
    p = run_cli("visualize", "--image", images[1], "--image", images[0], "--trace", trace,
                "--request-id", "chatcmpl-abc", "--processor", target, "--out", tmp_path / "x.png")
    assert p.returncode == 2 and "visual tokens" in p.stderr, p.stderr
    p = run_cli("visualize", "--image", images[0], "--trace", trace, "--request-id", "chatcmpl-abc",
                "--guide", target, "--target", target, "--out", tmp_path / "x.png")
    assert p.returncode == 2 and "either" in p.stderr, p.stderr


def test_tiled_processor_is_refused_in_one_line(tiny_pair_internvl, images, tmp_path):
    """InternVL tiles its images: no token grid to draw on, so a clear error, not a traceback."""
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"request_id": "r", "keep_indices": [[0, 1]], "num_visual_tokens": [256]}) + "\n")
    p = run_cli("visualize", "--image", images[0], "--trace", trace, "--request-id", "r",
                "--processor", tiny_pair_internvl[1], "--out", tmp_path / "x.png")
    assert p.returncode == 2 and "tiles its images" in p.stderr and p.stderr.count("\n") == 1, p.stderr
