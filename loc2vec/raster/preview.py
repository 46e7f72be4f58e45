"""Pictures of tiles for people: RGB composites, channel grids and triplet grids, always attributed.

The channel masks are blended with each channel's colour (land use first, roads and POIs on top); every
saved picture carries "© OpenStreetMap contributors" (the data's ODbL licence asks for it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from loc2vec.core.atomic import atomic_path
from loc2vec.raster.channels import CHANNELS

ATTRIBUTION = "© OpenStreetMap contributors"

# Drawn bottom-up: land use first, roads and POIs on top.
_DRAW_ORDER = (
    "farmland", "residential", "commercial_industrial", "green", "water_areas", "waterways",
    "buildings", "paths", "roads_minor", "roads_major", "rail", "pois",
)  # fmt: skip


def composite_rgb(tile: np.ndarray, background: tuple[int, int, int] = (250, 248, 242)) -> np.ndarray:
    """Blend the channel masks with their colours into an (H, W, 3) uint8 image."""
    by_name = {c.name: (i, c.colour) for i, c in enumerate(CHANNELS)}
    rgb = np.empty((*tile.shape[1:], 3), dtype=np.float32)
    rgb[:] = background
    for name in _DRAW_ORDER:
        i, colour = by_name[name]
        alpha = tile[i].astype(np.float32)[..., None] / 255.0
        rgb = rgb * (1 - alpha) + np.asarray(colour, dtype=np.float32) * alpha
    return rgb.clip(0, 255).astype(np.uint8)


def attributed_image(rgb: np.ndarray, scale: int = 4):
    """A PIL image of an RGB array, upscaled, with the ODbL attribution drawn in a corner."""
    img = Image.fromarray(rgb).resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    small = font(11)
    x0, y0, x1, y1 = draw.textbbox((0, 0), ATTRIBUTION, font=small)
    w, h = x1 - x0, y1 - y0
    draw.rectangle((img.width - w - 8, img.height - h - 8, img.width, img.height), fill=(255, 255, 255))
    draw.text((img.width - w - 4, img.height - h - 6), ATTRIBUTION, fill=(40, 40, 40), font=small)
    return img


def write_preview(tile: np.ndarray, path: Path, scale: int = 4) -> Path:
    """Write the RGB composite of a tile as a PNG carrying "© OpenStreetMap contributors"."""
    with atomic_path(path) as tmp:
        attributed_image(composite_rgb(tile), scale).save(tmp, format="PNG")
    return path


def font(size: int = 12) -> ImageFont.ImageFont:
    """DejaVu Sans (Debian's fonts-dejavu-core), else PIL's built-in bitmap font."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def sheet(cells: Sequence[tuple[np.ndarray, str]], cols: int, cell: int, title: str | None = None) -> Image.Image:
    """Lay out (RGB array, caption) cells on a white sheet, attribution at the bottom."""
    text = font(12)
    rows = (len(cells) + cols - 1) // cols
    caption_h, head_h, foot_h, pad = 16, (22 if title else 0), 18, 4
    page = Image.new("RGB", (cols * (cell + pad) + pad, head_h + rows * (cell + caption_h + pad) + foot_h), "white")
    draw = ImageDraw.Draw(page)
    if title:
        draw.text((pad, 4), title, fill=(0, 0, 0), font=font(14))
    for k, (rgb, caption) in enumerate(cells):
        r, c = divmod(k, cols)
        x, y = pad + c * (cell + pad), head_h + r * (cell + caption_h + pad)
        page.paste(Image.fromarray(rgb).resize((cell, cell), Image.NEAREST), (x, y))
        draw.rectangle((x - 1, y - 1, x + cell, y + cell), outline=(150, 150, 150))
        draw.text((x, y + cell + 1), caption, fill=(30, 30, 30), font=text)
    draw.text((pad, page.height - foot_h + 2), ATTRIBUTION, fill=(60, 60, 60), font=text)
    return page


def save_png(img: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def channel_grid(tile: np.ndarray, path: Path, title: str | None = None, cell: int = 160) -> Path:
    """The RGB composite followed by each of the 12 channels as a grey mask, one per cell."""
    cells = [(composite_rgb(tile), "RGB composite")]
    for i, ch in enumerate(CHANNELS):
        mask = 255 - tile[i]
        cells.append((np.repeat(mask[..., None], 3, axis=-1), f"{i}: {ch.name}"))
    return save_png(sheet(cells, cols=5, cell=cell, title=title), path)


def triplet_grid(
    anchors: np.ndarray, positives: np.ndarray, negatives: np.ndarray, path: Path, title: str | None = None
) -> Path:
    """Rows of (anchor, positive, negative) RGB composites from (B, 12, H, W) uint8 arrays."""
    cells = []
    for a, p, n in zip(anchors, positives, negatives, strict=True):
        cells += [(composite_rgb(a), "anchor"), (composite_rgb(p), "positive"), (composite_rgb(n), "negative")]
    return save_png(sheet(cells, cols=3, cell=160, title=title), path)
