"""Triplet batches the article's way, from either tile source.

A batch is L locations × P (anchor, positive) pairs: the anchor is the location's
unaugmented tile, each positive a rotated/shifted tile of the same location with random
channels switched off, and each negative a positive of another location of the same
batch. The same `TripletBatches` serves stored direct tiles and tiles cut on the fly from
metatiles (training/sources.py), and yields plain (anchor, positive, negative)
uint8 tensors, so any loss can consume it.

Neighbourhood batches (hard negatives from one neighbourhood, seeds 002/004) were measured to give no
downstream gain (README, Evaluation) and were removed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset

from loc2vec.core.config import AugmentConfig, TripletsConfig


@dataclass(frozen=True)
class TripletConfig:
    """A batch's shape (params `triplets:`) and its positives' augmentation (params `augment:`), together."""

    locations_per_batch: int = 20  # L
    pairs_per_location: int = 5  # P
    channel_drop_p: float = 0.2  # probability that each channel of a positive is switched off
    max_shift_m: float = 80.0  # fast path: |shift| ~ U(0, max) on each axis, random sign

    @classmethod
    def from_config(cls, triplets: TripletsConfig, augment: AugmentConfig) -> TripletConfig:
        """Batch shape from params `triplets:`, augmentation strengths from params `augment:`."""
        return cls(
            locations_per_batch=triplets.locations_per_batch,
            pairs_per_location=triplets.pairs_per_location,
            channel_drop_p=augment.channel_drop_p,
            max_shift_m=augment.max_shift_m,
        )


class TileSource(Protocol):
    """Anchors and positives of locations, whatever renders or stores them (training/sources.py)."""

    def __len__(self) -> int: ...

    def pairs(self, rows: np.ndarray, n_pairs: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(anchors, positives), each (len(rows)·n_pairs, 12, S, S) uint8, grouped by location; a location's
        n_pairs anchors are one tile (its unaugmented tile), repeated."""
        ...


@dataclass
class TripletBatch:
    anchor: torch.Tensor  # (B, 12, S, S) uint8; every row of a location holds the same anchor tile
    positive: torch.Tensor
    negative: torch.Tensor
    location: torch.Tensor  # (B,) row of the anchor's location
    # (B,) the row of `positive` each negative is an exact copy of; None where the positives were changed after
    # the copy (channel drop) or the rows are a slice of a batch (DDP)
    negative_row: torch.Tensor | None = None


def anchor_rows(location: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, inverse): the first row of each location in the batch, and each row's index into them.

    Every row of a location holds the same anchor (TileSource.pairs: its unaugmented tile), so
    `anchor[first][inverse]` equals `anchor`: a batch's anchors are encoded once per location, not once per pair.
    """
    locations, inverse = torch.unique(location, return_inverse=True)
    rows = torch.arange(len(location))
    first = torch.full((len(locations),), len(location), dtype=torch.long).scatter_reduce_(0, inverse, rows, "amin")
    return first, inverse


def stand_in_negatives(location: torch.Tensor) -> torch.Tensor | None:
    """Row indices that give each row a positive of another location: the rows rolled by one location's run.

    For the triplet metrics of a loss that reads no negatives (losses.NEGATIVE_FREE), so the batch's negative
    tiles need not be encoded. Rows come in contiguous runs of one location (make_batch, and a DDP rank's slice
    of it); None when there is only one location, or the runs are uneven, and no roll can give another one.
    """
    b = len(location)
    changes = torch.nonzero(location != location[0])
    if b == 0 or len(changes) == 0:
        return None
    index = (torch.arange(b) + int(changes[0])) % b
    return index if bool((location[index] != location).all()) else None


def drop_channels(tiles: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Switch off each channel of each tile with probability p (never all channels of a tile)."""
    if p <= 0:
        return tiles
    keep = torch.rand(tiles.shape[:2], generator=generator) >= p
    none_left = ~keep.any(dim=1)
    if none_left.any():
        keep[none_left, torch.randint(tiles.shape[1], (int(none_left.sum()),), generator=generator)] = True
    return tiles * keep[:, :, None, None].to(tiles.device, tiles.dtype)


def make_batch(
    source: TileSource, rows: np.ndarray, cfg: TripletConfig, rng: np.random.Generator, gen: torch.Generator
) -> TripletBatch:
    """One batch for the given L location rows: negatives are positives of *other* batch locations."""
    n_loc, n_pairs = len(rows), cfg.pairs_per_location
    anchors, positives = source.pairs(rows, n_pairs, rng)
    owner = np.repeat(np.arange(n_loc), n_pairs)
    other = (owner + rng.integers(1, n_loc, size=len(owner))) % n_loc  # uniform over the other locations
    negative_row = torch.from_numpy(other * n_pairs + rng.integers(0, n_pairs, size=len(owner)))
    negatives = positives[negative_row]
    positives = drop_channels(positives, cfg.channel_drop_p, gen)
    copied = negative_row if cfg.channel_drop_p <= 0 else None  # drop_channels left the positives as they were
    return TripletBatch(anchors, positives, negatives, torch.from_numpy(np.asarray(rows)[owner]), copied)


class TripletBatches(IterableDataset):
    """An endless (or n_batches long) stream of triplet batches over the given location rows.

    Locations are drawn without replacement within a batch, with probability ∝ weight
    (low-information locations are down-weighted by the sampler).
    """

    def __init__(
        self,
        source: TileSource,
        rows: np.ndarray,
        cfg: TripletConfig | None = None,
        *,
        weights: np.ndarray | None = None,
        seed: int = 0,
        n_batches: int | None = None,
    ):
        self.source, self.rows = source, np.asarray(rows)
        self.cfg = cfg or TripletConfig()
        if len(self.rows) < 2:
            raise ValueError("triplet batches need at least 2 locations (negatives come from other locations)")
        w = np.ones(len(self.rows)) if weights is None else np.asarray(weights, dtype=np.float64)
        self.w = w
        self.p = w / w.sum()
        self.seed, self.n_batches = seed, n_batches

    def batch(self, k: int) -> TripletBatch:
        """Batch number k: a pure function of (seed, k), so training resumes exactly at any step."""
        rng = np.random.default_rng([self.seed, k])
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        n_loc = min(self.cfg.locations_per_batch, len(self.rows))
        rows = rng.choice(self.rows, size=n_loc, replace=False, p=self.p)
        return make_batch(self.source, rows, self.cfg, rng, gen)

    def __iter__(self) -> Iterator[TripletBatch]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        k = worker
        while self.n_batches is None or k < self.n_batches:
            yield self.batch(k)
            k += workers
