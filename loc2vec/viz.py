"""Figures for people: channel grids and triplet grids, always with the ODbL attribution."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from loc2vec.atomic import atomic_path
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
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
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


def training_curves(history, path: Path) -> Path:
    """Loss, d+/d- and triplet accuracy (train and val) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(history["step"], history["loss"], lw=0.8, label="train")
    if "val_loss" in history:
        v = history.dropna(subset=["val_loss"])
        axes[0].plot(v["step"], v["val_loss"], "o-", label="val")
    axes[0].set_title("loss")
    axes[1].plot(history["step"], history["d_pos"], lw=0.8, label="d+")
    axes[1].plot(history["step"], history["d_neg"], lw=0.8, label="d-")
    axes[1].set_title("SoftPN terms (train)")
    axes[2].plot(history["step"], history["triplet_accuracy"], lw=0.8, label="train")
    if "val_triplet_accuracy" in history:
        v = history.dropna(subset=["val_triplet_accuracy"])
        axes[2].plot(v["step"], v["val_triplet_accuracy"], "o-", label="val")
    axes[2].set_ylim(0, 1.02)
    axes[2].set_title("triplet accuracy")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _equalize(x: np.ndarray) -> np.ndarray:
    """Histogram equalization of one channel to uint8 (as the article does for its figures)."""
    flat = x.ravel()
    ranks = np.empty_like(flat)
    ranks[np.argsort(flat, kind="stable")] = np.arange(flat.size)
    return (255 * ranks / max(flat.size - 1, 1)).reshape(x.shape).astype(np.uint8)


def activation_maximization(
    model, out_dir: Path, steps: int = 25, lr: float = 0.1, max_filters: int = 32, size: int = 64
) -> list[Path]:
    """Inputs that maximise each filter of a bottom and an upper conv layer (article figures 13–14).

    Gradient ascent from noise on the mean activation of each filter (the forward pass stops at
    that layer, and the convs are size-agnostic, so a 64² input keeps it cheap); the 3 channels with the highest mean magnitude become RGB, each
    histogram-equalized.
    """
    import torch

    features = model.features
    convs = [i for i, m in enumerate(features) if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    if not convs:
        return []
    picks = {"bottom": convs[1 if len(convs) > 1 else 0], "upper": convs[-1]}
    model = model.eval()
    cfg = model.cfg
    paths = []
    for label, idx in picks.items():
        trunk = features[: idx + 1]
        n = min(features[idx].out_channels, max_filters)
        gen = torch.Generator().manual_seed(0)
        x = (0.5 + 0.1 * torch.randn(n, cfg.in_channels, size, size, generator=gen)).requires_grad_()
        opt = torch.optim.Adam([x], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            act = trunk(x.clamp(0, 1))
            loss = -act[torch.arange(n), torch.arange(n)].mean(dim=(1, 2)).sum()
            loss.backward()
            opt.step()
        imgs = x.detach().clamp(0, 1).numpy()
        cells = []
        for i, img in enumerate(imgs):
            top3 = np.argsort(-np.abs(img).mean(axis=(1, 2)))[:3]
            rgb = np.stack([_equalize(img[c]) for c in top3], axis=-1)
            cells.append((rgb, f"conv{convs.index(idx) + 1} #{i}"))
        sheet = _grid(
            cells,
            cols=8,
            cell=96,
            title=f"activation maximisation, {label} conv layer {convs.index(idx) + 1} ({n} filters)",
        )
        paths.append(_save(sheet, out_dir / f"activation_max_{label}.png"))
    return paths
