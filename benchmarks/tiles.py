"""Direct Mapnik rendering vs the fast path (metatiles + torch cutter), same locations, every core each.

direct: one Mapnik process per core (a spawn pool; each worker builds its renderer once and
warms up), timing only the rendering (workers return a checksum, not the tiles).
fast: `cut_tiles` with torch on all threads, after the metatiles exist; the time to render
the metatiles is reported separately: `metatile_render_s` for the ones this run had to render
(none when they are on disk already) and `metatile_render_s_each` for one, rendered anew.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time

import numpy as np
import torch

from loc2vec.config import load_params
from loc2vec.cutter import cut_tiles
from loc2vec.db import require_import
from loc2vec.metatiles import MetatileRenderer, ensure_metatiles

from .common import bench_locations

SEED = 0
BATCH = 100  # tiles per cut_tiles call: a training batch (triplets.locations_per_batch × pairs_per_location)


def _bench_locations(region: str, n: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """The region's sampled training locations (`loc2vec sample`) when there are, else points on
    buildings/roads inside the region's extent."""
    samples = load_params().root / "data" / "samples" / f"{region}.parquet"
    if samples.is_file():
        import pandas as pd

        frame = pd.read_parquet(samples).sample(frac=1.0, random_state=seed).head(n)
        return frame["lat"].to_numpy(), frame["lon"].to_numpy()
    west, south, east, north = require_import(region).bbox
    lats, lons = bench_locations(region, 2 * n + 50, seed)
    inside = (lats >= south) & (lats <= north) & (lons >= west) & (lons <= east)
    return lats[inside][:n], lons[inside][:n]


def _worker_init(region: str, lat: float, lon: float) -> None:
    from loc2vec.render import get_renderer

    renderer = get_renderer(region)
    for angle in (0.0, 45.0):  # warm-up: map parsing, DB connections, PROJ
        renderer.render(lat, lon, angle, (10.0, 10.0))


def _worker_render(args: tuple[str, np.ndarray]) -> int:
    from loc2vec.render import get_renderer

    region, rows = args
    renderer = get_renderer(region)
    total = 0
    for lat, lon, angle, dx, dy in rows:
        total += int(renderer.render(lat, lon, angle, (dx, dy)).sum(dtype=np.int64) & 0xFFFF)
    return total


def _direct(region: str, lats, lons, angles, shifts, cores: int) -> float:
    rows = np.column_stack([lats, lons, angles, shifts])
    chunks = [(region, c) for c in np.array_split(rows, cores * 8) if len(c)]
    with mp.get_context("spawn").Pool(cores, initializer=_worker_init, initargs=(region, lats[0], lons[0])) as pool:
        pool.map(_worker_render, [(region, rows[:2])] * cores)  # every worker started and warm
        started = time.perf_counter()
        pool.map(_worker_render, chunks, chunksize=1)
        return time.perf_counter() - started


def _fast(index, lats, lons, angles, shifts, device: str, repeats: int = 5) -> float:
    """Median seconds to cut all n tiles in BATCH-sized calls (first pass untimed: warm caches)."""

    def once() -> float:
        started = time.perf_counter()
        for i in range(0, len(lats), BATCH):
            s = slice(i, i + BATCH)
            tiles = cut_tiles(index, lats[s], lons[s], angles[s], shifts[s], device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        del tiles
        return time.perf_counter() - started

    once()
    return statistics.median(once() for _ in range(repeats))


def _one_metatile_s(index, lat: float, lon: float) -> float:
    """Seconds to render one metatile (in memory, not stored): the cold cost per metatile, even when
    this run found every metatile already on disk."""
    renderer = MetatileRenderer(index.region, index.grid)
    meta = index.entries[index.keys_for([lat], [lon])[0]]
    started = time.perf_counter()
    renderer.render(meta)
    return time.perf_counter() - started


def run(*, region: str | None = None, n: int | None = None) -> dict:
    region = region or load_params().regions.default
    n = n or 400
    cores = os.cpu_count() or 1
    lats, lons = _bench_locations(region, n)
    n = len(lats)
    rng = np.random.default_rng(SEED)
    max_shift = load_params().augment.max_shift_m
    angles = rng.uniform(0.0, 360.0, n)
    shifts = rng.uniform(-max_shift, max_shift, (n, 2))

    direct_s = _direct(region, lats, lons, angles, shifts, cores)

    started = time.perf_counter()
    index = ensure_metatiles(region, lats, lons, progress=False)
    metatile_s = time.perf_counter() - started
    used = len(set(index.keys_for(lats, lons)))

    each_s = _one_metatile_s(index, lats[0], lons[0])
    torch.set_num_threads(cores)
    fast_s = _fast(index, lats, lons, angles, shifts, "cpu")
    out = {
        "region": region,
        "n": n,
        "cores": cores,
        "direct_tiles_per_s": round(n / direct_s, 1),
        "fast_tiles_per_s": round(n / fast_s, 1),
        "ratio": round(direct_s / fast_s, 2),
        "metatile_render_s": round(metatile_s, 2),
        "metatile_render_s_each": round(each_s, 2),
        "metatiles_rendered": len(index.rendered),
        "metatiles_used": used,
        "metatile_px": index.grid.side_px,
        "batch": BATCH,
    }
    if torch.cuda.is_available():
        out["gpu_tiles_per_s"] = round(n / _fast(index, lats, lons, angles, shifts, "cuda"), 1)
    return out
