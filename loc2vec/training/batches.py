"""Triplet batches the article's way, from either tile source.

A batch is L locations × P (anchor, positive) pairs: the anchor is the location's
unaugmented tile, each positive a rotated/shifted tile of the same location with random
channels switched off, and each negative a positive of another location of the same
batch. The same `TripletBatches` serves stored direct tiles and tiles cut on the fly from
metatiles (training/sources.py), and yields plain (anchor, positive, negative)
uint8 tensors, so any loss can consume it.

**Neighbourhood batches (hard negatives).** Locations drawn across a whole region are told
apart by land cover alone (forest vs town), so the article's random in-batch negatives stop
teaching early: validation triplet accuracy saturates near 1 within a few hundred steps and
the finer structure (which roads, paths and rail are there) is never needed. A fraction of
batches (``triplets.local_fraction``) therefore takes its L locations from one neighbourhood
(``triplets.neighbourhood_m`` around a drawn centre), at least ``triplets.min_separation_m``
apart so that no negative shares the anchor's tile. Negatives from the same valley or town
differ in the details a downstream task needs (metric-learning hard negatives, seed 004;
location-aware sampling, seed 002).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset

from loc2vec.core.config import AugmentConfig, TripletsConfig
from loc2vec.core.geo import chord


@dataclass(frozen=True)
class TripletConfig:
    """A batch's shape (params `triplets:`) and its positives' augmentation (params `augment:`), together."""

    locations_per_batch: int = 20  # L
    pairs_per_location: int = 5  # P
    channel_drop_p: float = 0.2  # probability that each channel of a positive is switched off
    max_shift_m: float = 80.0  # fast path: |shift| ~ U(0, max) on each axis, random sign
    local_fraction: float = 0.0  # share of batches whose locations come from one neighbourhood
    neighbourhood_m: float = 1500.0  # radius of that neighbourhood
    min_separation_m: float = 200.0  # locations of a neighbourhood batch are at least this far apart

    def __post_init__(self) -> None:
        if not 0.0 <= self.local_fraction <= 1.0:
            raise ValueError(f"triplets.local_fraction must be in [0, 1], got {self.local_fraction}")
        if self.neighbourhood_m <= 0 or self.min_separation_m < 0:
            raise ValueError(
                f"triplets.neighbourhood_m must be > 0 and min_separation_m >= 0, got "
                f"{self.neighbourhood_m} and {self.min_separation_m}"
            )

    @classmethod
    def from_config(cls, triplets: TripletsConfig, augment: AugmentConfig) -> TripletConfig:
        """Batch shape from params `triplets:`, augmentation strengths from params `augment:`."""
        return cls(
            locations_per_batch=triplets.locations_per_batch,
            pairs_per_location=triplets.pairs_per_location,
            channel_drop_p=augment.channel_drop_p,
            max_shift_m=augment.max_shift_m,
            local_fraction=triplets.local_fraction,
            neighbourhood_m=triplets.neighbourhood_m,
            min_separation_m=triplets.min_separation_m,
        )


class TileSource(Protocol):
    """Anchors and positives of locations, whatever renders or stores them (training/sources.py)."""

    def __len__(self) -> int: ...

    def pairs(self, rows: np.ndarray, n_pairs: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(anchors, positives), each (len(rows)·n_pairs, 12, S, S) uint8, grouped by location."""
        ...


@dataclass
class TripletBatch:
    anchor: torch.Tensor  # (B, 12, S, S) uint8
    positive: torch.Tensor
    negative: torch.Tensor
    location: torch.Tensor  # (B,) row of the anchor's location


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
    negatives = positives[other * n_pairs + rng.integers(0, n_pairs, size=len(owner))]
    positives = drop_channels(positives, cfg.channel_drop_p, gen)
    return TripletBatch(anchors, positives, negatives, torch.from_numpy(np.asarray(rows)[owner]))


class TripletBatches(IterableDataset):
    """An endless (or n_batches long) stream of triplet batches over the given location rows.

    Locations are drawn without replacement within a batch, with probability ∝ weight
    (low-information locations are down-weighted by the sampler). With ``cfg.local_fraction``
    > 0, `xyz` (unit-sphere positions of every source row, `core.geo.unit_xyz`) is required:
    that share of batches is drawn from one neighbourhood (module docstring).
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
        xyz: np.ndarray | None = None,
    ):
        self.source, self.rows = source, np.asarray(rows)
        self.cfg = cfg or TripletConfig()
        if len(self.rows) < 2:
            raise ValueError("triplet batches need at least 2 locations (negatives come from other locations)")
        w = np.ones(len(self.rows)) if weights is None else np.asarray(weights, dtype=np.float64)
        self.w = w
        self.p = w / w.sum()
        self.seed, self.n_batches = seed, n_batches
        self._tree = None
        if self.cfg.local_fraction > 0:
            if xyz is None:
                raise ValueError("neighbourhood batches (triplets.local_fraction > 0) need the locations' xyz")
            from scipy.spatial import cKDTree

            self._xyz = np.asarray(xyz, dtype=np.float64)[self.rows]
            self._tree = cKDTree(self._xyz)
            self._radius, self._min_sep = chord(self.cfg.neighbourhood_m), chord(self.cfg.min_separation_m)

    def _neighbourhood(self, n_loc: int, rng: np.random.Generator) -> np.ndarray:
        """Indices into self.rows: a weighted centre, then weighted neighbours at least min_sep apart.

        A sparse neighbourhood is topped up with locations drawn as usual, so a batch always
        has n_loc locations.
        """
        centre = rng.choice(len(self.rows), p=self.p)
        near = np.asarray(self._tree.query_ball_point(self._xyz[centre], self._radius), dtype=np.int64)
        near = near[near != centre]
        keys = rng.random(len(near)) ** (1.0 / np.maximum(self.w[near], 1e-12))
        order = near[np.argsort(-keys, kind="stable")]  # weighted, without replacement (Efraimidis–Spirakis)
        picked = [int(centre)]
        for i in order:
            if len(picked) == n_loc:
                break
            if np.min(np.linalg.norm(self._xyz[picked] - self._xyz[i], axis=1)) >= self._min_sep:
                picked.append(int(i))
        if len(picked) < n_loc:
            rest = np.setdiff1d(np.arange(len(self.rows)), picked)
            p = self.p[rest] / self.p[rest].sum()
            picked += rng.choice(rest, size=n_loc - len(picked), replace=False, p=p).tolist()
        return np.asarray(picked)

    def batch(self, k: int) -> TripletBatch:
        """Batch number k: a pure function of (seed, k), so training resumes exactly at any step."""
        rng = np.random.default_rng([self.seed, k])
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        n_loc = min(self.cfg.locations_per_batch, len(self.rows))
        if self._tree is not None and rng.random() < self.cfg.local_fraction:
            rows = self.rows[self._neighbourhood(n_loc, rng)]
        else:
            rows = rng.choice(self.rows, size=n_loc, replace=False, p=self.p)
        return make_batch(self.source, rows, self.cfg, rng, gen)

    def __iter__(self) -> Iterator[TripletBatch]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        k = worker
        while self.n_batches is None or k < self.n_batches:
            yield self.batch(k)
            k += workers
