"""The spatial split: square blocks dealt to train/val/test by a seeded hash, and a buffer around held-out tiles.

Locations fall in square blocks of ``block_m`` metres (an equirectangular frame at the region's
mid-latitude, origin at its south-west corner); each block goes to train, val or test by a seeded hash of
its id against the cumulative ``splits`` fractions. Then the buffer: every *train* location within a
distance (great-circle, via unit-sphere chords in a KD-tree) of any val or test location is dropped, so no
train tile overlaps or touches an evaluation tile. The evaluation's blocked folds use the same blocks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import numpy as np
from sklearn.neighbors import KDTree

from loc2vec.core.config import SPLITS
from loc2vec.core.geo import MEAN_EARTH_RADIUS_M, chord, unit_xyz

DEFAULT_SPLITS: Mapping[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}


def unit_hash(seed: int, value: int) -> float:
    """A uniform number in [0, 1) from (seed, value): the same everywhere, whatever else is drawn."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{value}".encode(), digest_size=8).digest(), "little") / 2.0**64


def assign_blocks(
    lat: np.ndarray,
    lon: np.ndarray,
    box: tuple[float, float, float, float],
    block_m: float,
    seed: int,
    splits: Mapping[str, float] = DEFAULT_SPLITS,
) -> tuple[np.ndarray, np.ndarray]:
    """(block id, split) per location: square blocks in a local metric frame, split by a seeded hash."""
    w, s, e, n = box
    k = MEAN_EARTH_RADIUS_M * math.pi / 180.0
    cos0 = math.cos(math.radians((s + n) / 2))
    nx = int(math.ceil((e - w) * k * cos0 / block_m)) + 1
    ix = np.floor((np.asarray(lon) - w) * k * cos0 / block_m).astype(np.int64)
    iy = np.floor((np.asarray(lat) - s) * k / block_m).astype(np.int64)
    block = iy * nx + ix
    edges = np.cumsum([splits[name] for name in SPLITS])
    by_block = {b: SPLITS[min(int(np.searchsorted(edges, unit_hash(seed, b), "right")), 2)] for b in set(block)}
    return block, np.asarray([by_block[b] for b in block], dtype=object)


def buffer_violations(lat: np.ndarray, lon: np.ndarray, split: np.ndarray, distance_m: float) -> np.ndarray:
    """Mask of train locations within distance_m of any val/test location (these get dropped)."""
    split = np.asarray(split)
    train, held = split == "train", split != "train"
    out = np.zeros(len(split), dtype=bool)
    if train.any() and held.any():
        tree = KDTree(unit_xyz(lat[held], lon[held]))
        counts = tree.query_radius(unit_xyz(lat[train], lon[train]), chord(distance_m), count_only=True)
        out[np.flatnonzero(train)] = counts > 0
    return out
