"""The low-information rule: a location whose tile shows (almost) nothing is dropped, a one-channel tile counts less.

Each candidate's anchor tile is rendered and scored: ``f_c = mean(tile_c > 0)`` per channel; ``coverage`` =
fraction of pixels where any channel is drawn; ``coverage_without_water`` = the same without the water areas;
``entropy`` = Shannon entropy of ``p_c = f_c / Σ f`` divided by ln 12 (0 = one channel only, 1 = all channels
equally). Candidates with ``coverage_without_water < min_coverage`` are dropped: bare mountain, outside the
data, and the open sea (or the middle of a large lake), which ``water_areas`` draws wall to wall since the sea
is built from the coastline: water alone says only that nobody is there. The rest get ``weight = min_weight +
(1 − min_weight) · min(1, entropy / entropy_floor)`` in (0, 1], so a tile of nothing but forest counts less
than a village.

Tiles are rendered in a spawned pool of Mapnik processes (core.pools), one renderer per process.
"""

from __future__ import annotations

import math
import multiprocessing.pool
from collections.abc import Iterable

import numpy as np
import pandas as pd
from tqdm import tqdm

from loc2vec.core.config import RenderConfig, SampleConfig
from loc2vec.core.pools import spawn_pool, worker_count
from loc2vec.osm.db import ConnInfo
from loc2vec.raster.channels import N_CHANNELS, channel_index
from loc2vec.raster.render import TileRenderer, get_renderer

WATER = channel_index("water_areas")  # drawn alone, it is no information (the open sea)


def tile_information(tile: np.ndarray) -> tuple[float, float, float]:
    """(coverage, entropy, coverage without water) of a (12, H, W) tile: drawn fraction, channel diversity
    in [0, 1], and the fraction where something other than the water areas is drawn."""
    on = tile > 0
    f = on.mean(axis=(1, 2))
    coverage = float(on.any(axis=0).mean())
    dry = float(np.delete(on, WATER, axis=0).any(axis=0).mean())
    total = f.sum()
    if total <= 0:
        return coverage, 0.0, dry
    p = f[f > 0] / total
    return coverage, max(0.0, float(-(p * np.log(p)).sum() / math.log(N_CHANNELS))), dry


def information_weight(entropy: np.ndarray, cfg: SampleConfig) -> np.ndarray:
    if cfg.entropy_floor <= 0:
        return np.ones_like(entropy)
    return cfg.min_weight + (1.0 - cfg.min_weight) * np.minimum(1.0, np.asarray(entropy) / cfg.entropy_floor)


_RENDERER: list[TileRenderer] = []  # this worker process's renderer


def init_worker(region: str, render: RenderConfig, info: ConnInfo) -> None:
    """Parse the 12 maps once per process."""
    _RENDERER[:] = [get_renderer(region, render, info)]


def _score(point: tuple[float, float]) -> tuple[float, float, float]:
    return tile_information(_RENDERER[0].render(point[0], point[1]))


def scoring_pool(region: str, render: RenderConfig, info: ConnInfo, workers: int):
    """A pool of `workers` Mapnik processes (0 = one per core) scoring tiles; None when one process is enough."""
    return spawn_pool(worker_count(workers), initializer=init_worker, initargs=(region, render, info))


def score_locations(
    region: str,
    lat: Iterable[float],
    lon: Iterable[float],
    *,
    render: RenderConfig,
    info: ConnInfo,
    pool: multiprocessing.pool.Pool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coverage, entropy, coverage without water) of each anchor tile, rendered in `pool` (one renderer
    per process) or here."""
    points = [(float(a), float(b)) for a, b in zip(lat, lon, strict=True)]
    if not points:
        return np.empty(0), np.empty(0), np.empty(0)
    bar = {"total": len(points), "desc": f"score {region}", "unit": "tile", "disable": None}
    if pool is None:
        init_worker(region, render, info)
        scores = [_score(p) for p in tqdm(points, **bar)]
    else:
        scores = list(tqdm(pool.imap(_score, points, chunksize=16), **bar))
    arr = np.asarray(scores, dtype=float)
    return arr[:, 0], arr[:, 1], arr[:, 2]


def information(
    region: str,
    lat: Iterable[float],
    lon: Iterable[float],
    cfg: SampleConfig,
    *,
    render: RenderConfig,
    info: ConnInfo,
    pool: multiprocessing.pool.Pool | None = None,
) -> pd.DataFrame:
    """The low-information rule applied to locations: coverage, coverage without water, entropy, weight and
    keep (coverage without water ≥ min)."""
    coverage, entropy, dry = score_locations(region, lat, lon, render=render, info=info, pool=pool)
    return pd.DataFrame(
        {
            "coverage": coverage,
            "coverage_without_water": dry,
            "entropy": entropy,
            "weight": information_weight(entropy, cfg),
            "keep": dry >= cfg.min_coverage,
        }
    )
