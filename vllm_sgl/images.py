"""Synthetic images and questions for the demo, tests and benchmarks (no data sets can be fetched).

Images have structure (a background gradient, coloured shapes, a little noise) so that patches
differ the way real photos do, which is what gives the guide's attention something to rank.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

QUESTIONS = [
    "what is in the image",
    "how many objects are there",
    "describe the picture in one short sentence",
    "what color is the large circle",
    "is there a red square on the left",
    "where is the small blue shape",
    "what shape is at the top",
    "count the circles",
]


def synthetic_image(seed: int, size: tuple[int, int] | None = None) -> Image.Image:
    """A deterministic image with shapes; size (width, height) defaults to a random 112..448 px."""
    rng = random.Random(seed)
    w, h = size if size is not None else (rng.randrange(112, 449, 28), rng.randrange(112, 449, 28))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = np.array([rng.random() for _ in range(3)]), np.array([rng.random() for _ in range(3)])
    t = (x / max(w - 1, 1))[..., None]
    arr = (c0 * (1 - t) + c1 * t) * 255
    img = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 6)):
        x0, y0 = rng.randrange(0, w), rng.randrange(0, h)
        r = rng.randrange(8, max(9, min(w, h) // 3))
        color = tuple(rng.randrange(256) for _ in range(3))
        box = [x0 - r, y0 - r, x0 + r, y0 + r]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    noise = np.random.default_rng(seed).normal(0, 6, (h, w, 3))
    out = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def synthetic_question(seed: int) -> str:
    return random.Random(seed).choice(QUESTIONS)


def synthetic_clip(seed: int, frames: int = 4, size: tuple[int, int] = (112, 112), fps: float = 4.0):
    """A deterministic clip as vLLM takes a video: (frames (T, H, W, 3) uint8, metadata), the
    metadata vLLM's video loader would give (all frames kept: do_sample_frames False). Its frames
    are synthetic images: scenes that change from frame to frame."""
    clip = np.stack([np.asarray(synthetic_image(seed * 1000 + i, size)) for i in range(frames)])
    return as_video(clip, fps)


def as_video(frames: np.ndarray, fps: float = 2.0):
    """(frames, metadata) as vLLM takes a video whose frames are all kept (do_sample_frames False)."""
    n = len(frames)
    metadata = {"fps": float(fps), "duration": n / fps, "total_num_frames": n, "frames_indices": list(range(n)),
                "video_backend": "opencv", "do_sample_frames": False}
    return frames, metadata
