"""Figures for people: channel grids and triplet grids, always with the ODbL attribution."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from loc2vec.channels import CHANNELS
from loc2vec.render import ATTRIBUTION, composite_rgb


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def _grid(cells: Sequence[tuple[np.ndarray, str]], cols: int, cell: int, title: str | None = None) -> Image.Image:
    """Lay out (RGB array, caption) cells on a white sheet, attribution at the bottom."""
    font = _font(12)
    rows = (len(cells) + cols - 1) // cols
    caption_h, head_h, foot_h, pad = 16, (22 if title else 0), 18, 4
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, head_h + rows * (cell + caption_h + pad) + foot_h), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, 4), title, fill=(0, 0, 0), font=_font(14))
    for k, (rgb, caption) in enumerate(cells):
        r, c = divmod(k, cols)
        x, y = pad + c * (cell + pad), head_h + r * (cell + caption_h + pad)
        sheet.paste(Image.fromarray(rgb).resize((cell, cell), Image.NEAREST), (x, y))
        draw.rectangle((x - 1, y - 1, x + cell, y + cell), outline=(150, 150, 150))
        draw.text((x, y + cell + 1), caption, fill=(30, 30, 30), font=font)
    draw.text((pad, sheet.height - foot_h + 2), ATTRIBUTION, fill=(60, 60, 60), font=font)
    return sheet


def _save(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def channel_grid(tile: np.ndarray, path: Path, title: str | None = None, cell: int = 160) -> Path:
    """The RGB composite followed by each of the 12 channels as a grey mask, one per cell."""
    cells = [(composite_rgb(tile), "RGB composite")]
    for i, ch in enumerate(CHANNELS):
        mask = 255 - tile[i]
        cells.append((np.repeat(mask[..., None], 3, axis=-1), f"{i}: {ch.name}"))
    return _save(_grid(cells, cols=5, cell=cell, title=title), path)


def triplet_grid(
    anchors: np.ndarray, positives: np.ndarray, negatives: np.ndarray, path: Path, title: str | None = None
) -> Path:
    """Rows of (anchor, positive, negative) RGB composites from (B, 12, H, W) uint8 arrays."""
    cells = []
    for a, p, n in zip(anchors, positives, negatives, strict=True):
        cells += [(composite_rgb(a), "anchor"), (composite_rgb(p), "positive"), (composite_rgb(n), "negative")]
    return _save(_grid(cells, cols=3, cell=160, title=title), path)
