"""Pictures of SGL keep sets: which visual tokens of an image the target sees.

An image of grid (t, h, w) patches is what the model saw after resizing to (w * patch) x (h * patch)
pixels; every merged visual token covers a (merge * patch)^2 pixel cell, numbered row-major over
the (h / merge, w / merge) grid. Kept cells are drawn as they are with a thin outline, pruned cells
darkened and greyed. PIL only.
"""

from __future__ import annotations

import os
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

PATCH = 14  # Qwen2-VL / Qwen2.5-VL vision patch size in pixels
OUTLINE = (255, 214, 0)  # kept-cell outline
BAND_BG = (24, 24, 24)
BAND_FG = (240, 240, 240)
PRUNED_BRIGHTNESS = 0.3


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _grid(grid_thw) -> tuple[int, int, int]:
    t, h, w = (int(x) for x in (grid_thw.tolist() if hasattr(grid_thw, "tolist") else grid_thw))
    return t, h, w


def draw_keep_set(
    image: Image.Image,
    grid_thw,
    merge_size: int,
    keep_indices: Sequence[int],
    title: str | None = None,
    patch_size: int = PATCH,
) -> Image.Image:
    """The image as the model saw it with its pruned token cells darkened and its kept cells
    outlined, above a caption band "kept k/N" (and the title).

    grid_thw: (t, h, w) in patches (the processor's image_grid_thw row). For t > 1 (video) the
    (h, w) cells are shared by every frame: a cell counts as kept if any frame keeps it.
    """
    t, h, w = _grid(grid_thw)
    m = int(merge_size)
    if m < 1 or h % m or w % m:
        raise ValueError(f"grid (t={t}, h={h}, w={w}) is not divisible by merge_size {m}")
    gh, gw = h // m, w // m
    per_frame = gh * gw
    n = t * per_frame
    keep = sorted({int(i) for i in keep_indices})
    bad = [i for i in keep if not 0 <= i < n]
    if bad:
        raise ValueError(f"keep indices {bad[:5]} out of range for {n} visual tokens")
    kept_cells = {i % per_frame for i in keep}

    seen = image.convert("RGB").resize((w * patch_size, h * patch_size), Image.BICUBIC)
    grey = ImageOps.grayscale(seen).convert("RGB")
    dark = Image.blend(Image.new("RGB", seen.size, (0, 0, 0)), grey, PRUNED_BRIGHTNESS)
    cell = m * patch_size
    # paste the darkened picture everywhere except the kept cells
    mask = Image.new("L", seen.size, 255)
    mdraw = ImageDraw.Draw(mask)
    for c in kept_cells:
        r, col = divmod(c, gw)
        mdraw.rectangle([col * cell, r * cell, (col + 1) * cell - 1, (r + 1) * cell - 1], fill=0)
    shown = seen.copy()
    shown.paste(dark, (0, 0), mask)
    draw = ImageDraw.Draw(shown)
    for c in kept_cells:
        r, col = divmod(c, gw)
        draw.rectangle([col * cell, r * cell, (col + 1) * cell - 1, (r + 1) * cell - 1], outline=OUTLINE, width=1)

    caption = f"kept {len(keep)}/{n}" + (f"  {title}" if title else "")
    font = _font(12)
    tw, th = _text_size(draw, caption, font)
    band = th + 8
    width = max(shown.width, tw + 8)
    out = Image.new("RGB", (width, shown.height + band), BAND_BG)
    out.paste(shown, (0, 0))
    ImageDraw.Draw(out).text((4, shown.height + 3), caption, fill=BAND_FG, font=font)
    return out


def tile(pictures: Sequence[Image.Image], columns: int = 4, pad: int = 8, background=(255, 255, 255)) -> Image.Image:
    """Pictures left to right in rows of `columns`, top-aligned."""
    if not pictures:
        raise ValueError("nothing to tile")
    columns = max(1, min(columns, len(pictures)))
    rows = [pictures[i : i + columns] for i in range(0, len(pictures), columns)]
    col_w = [max(r[c].width for r in rows if c < len(r)) for c in range(columns)]
    row_h = [max(p.height for p in r) for r in rows]
    out = Image.new("RGB", (sum(col_w) + pad * (columns + 1), sum(row_h) + pad * (len(rows) + 1)), background)
    y = pad
    for r, hgt in zip(rows, row_h):
        x = pad
        for c, p in enumerate(r):
            out.paste(p, (x, y))
            x += col_w[c] + pad
        y += hgt + pad
    return out


def save_keep_sets(
    images: Sequence[Image.Image],
    grids: Sequence,
    keep_indices_per_image: Sequence[Sequence[int]],
    path: str | os.PathLike,
    titles: Sequence[str | None] | None = None,
    merge_size: int = 2,
    columns: int = 4,
) -> Image.Image:
    """draw_keep_set for every image, tiled into one PNG at `path`; returns the tiled picture."""
    if not (len(images) == len(grids) == len(keep_indices_per_image)):
        raise ValueError(
            f"{len(images)} images, {len(grids)} grids and {len(keep_indices_per_image)} keep sets: "
            "one of each per image"
        )
    titles = list(titles) if titles is not None else [None] * len(images)
    if len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    pictures = [
        draw_keep_set(img, grid, merge_size, keep, title)
        for img, grid, keep, title in zip(images, grids, keep_indices_per_image, titles)
    ]
    out = tile(pictures, columns=columns)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    out.save(path)
    return out
