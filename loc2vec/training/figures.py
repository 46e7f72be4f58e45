"""Training pictures: the loss and accuracy curves, and what conv filters respond to (article figures 13–14)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loc2vec.raster.preview import save_png, sheet


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
    axes[1].set_title("d+ / d- (SoftPN's terms, train batches)")  # logged whatever the loss: not what InfoNCE minimises
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
        page = sheet(
            cells,
            cols=8,
            cell=96,
            title=f"activation maximisation, {label} conv layer {convs.index(idx) + 1} ({n} filters)",
        )
        paths.append(save_png(page, out_dir / f"activation_max_{label}.png"))
    return paths
