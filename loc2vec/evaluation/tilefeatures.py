"""Featuresets computed from a tile: a trained or untrained encoder, and wide random convolutional features.

``random_wide`` is the fair "no learning" control (MOSAIKS, Rolf et al. 2021: thousands of random
convolutional features, pooled, and a linear model reach much of what learned features reach). A
16-D untrained encoder (``random_encoder``) is a weak control: it has 16 outputs. Here: the tile
(coverage 0..1) is average-pooled 2×2, convolved with K seeded Gaussian filters of 12×5×5 (each
made zero-mean, so it responds to structure rather than to coverage, which `histogram` has), and each
filter gives two features, the spatial means of relu(z) and relu(−z): 2K features in all, filter by filter,
so the first 2k columns are a bank of k random filters (the tree model sees at most ``suite.hgb_max_dims``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from loc2vec.core.errors import ConfigError
from loc2vec.training.model import Encoder, to_input

TileFn = Callable[[np.ndarray], np.ndarray]


def encoder_tiles(encoder: Encoder, wide: bool = False) -> TileFn:
    """The encoder (eval mode) as a tile function: (b, 12, s, s) uint8 → (b, D) embeddings.

    Args:
        encoder: a trained (or seeded untrained) Encoder.
        wide: its representation before the projection (`Encoder.representation`, ``loc2vec_wide``) instead.

    Returns:
        A function of a batch of tiles.
    """
    encoder = encoder.eval()
    fn = encoder.representation if wide else encoder

    def run(tiles: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return fn(_as_input(tiles)).float().numpy()

    return run


def _as_input(tiles: np.ndarray) -> torch.Tensor:
    """(b, 12, s, s) uint8 numpy tiles as the encoder's float input."""
    return to_input(torch.from_numpy(np.ascontiguousarray(tiles)))


def encoder_tiles_both(encoder: Encoder) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """`encoder_tiles` and `encoder_tiles(wide=True)` in one pass of the trunk per batch: (embeddings, representations),
    the same numbers as the two functions give."""
    encoder = encoder.eval()

    def run(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            emb, rep = encoder.embedding_and_representation(_as_input(tiles))
            return emb.float().numpy(), rep.float().numpy()

    return run


def untrained_encoder(encoder_cfg, seed: int) -> Encoder:
    """The Encoder architecture with seeded random weights (eval mode): the `random_encoder` baseline."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Encoder(encoder_cfg).eval()


class RandomWide:
    """A bank of seeded random convolutional features over the tile, pooled (see the module docstring)."""

    def __init__(self, n_features: int, seed: int, channels: int = 12, kernel: int = 5):
        if n_features < 2 or n_features % 2:
            raise ConfigError(f"random_wide needs an even number of features ≥ 2, got {n_features}")
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(n_features // 2, channels, kernel, kernel, generator=gen)
        w -= w.mean(dim=(1, 2, 3), keepdim=True)
        self.weight = w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        self.n_features = n_features

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """(b, n_features) features of a batch of (b, 12, s, s) uint8 tiles."""
        with torch.no_grad():
            x = to_input(torch.from_numpy(np.ascontiguousarray(tiles)))
            z = torch.nn.functional.conv2d(torch.nn.functional.avg_pool2d(x, 2), self.weight, stride=2)
            pos, neg = z.clamp(min=0).mean(dim=(2, 3)), (-z).clamp(min=0).mean(dim=(2, 3))
            return (
                torch.stack([pos, neg], dim=2).flatten(1).numpy()
            )  # filter by filter: the first 2k columns are k filters
