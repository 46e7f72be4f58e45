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

from loc2vec.cli.project import Project
from loc2vec.core.config import RenderConfig
from loc2vec.osm.db import ConnInfo, require_import
from loc2vec.raster.cutter import cut_tiles
from loc2vec.raster.metatiles import MetatileRenderer, MetatileSpec, ensure_metatiles

from .common import bench_locations, bench_region

SEED = 0
BATCH = 100  # tiles per cut_tiles call: a training batch (triplets.locations_per_batch × pairs_per_location)


def _bench_locations(project: Project, region: str, n: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """The region's sampled training locations (`loc2vec sample`) when there are, else points on
    buildings/roads inside the region's extent."""
    samples = project.paths.samples(region)
    if samples.is_file():
        import pandas as pd

        frame = pd.read_parquet(samples).sample(frac=1.0, random_state=seed).head(n)
        return frame["lat"].to_numpy(), frame["lon"].to_numpy()
    west, south, east, north = require_import(region, project.info).bbox
    lats, lons = bench_locations(project, region, 2 * n + 50, seed)
    inside = (lats >= south) & (lats <= north) & (lons >= west) & (lons <= east)
    return lats[inside][:n], lons[inside][:n]


def _worker_init(region: str, render: RenderConfig, info: ConnInfo, lat: float, lon: float) -> None:
    from loc2vec.raster.render import get_renderer

    renderer = get_renderer(region, render, info)
    for angle in (0.0, 45.0):  # warm-up: map parsing, DB connections, PROJ
        renderer.render(lat, lon, angle, (10.0, 10.0))


def _worker_render(args: tuple[str, RenderConfig, ConnInfo, np.ndarray]) -> int:
    from loc2vec.raster.render import get_renderer

    region, render, info, rows = args
    renderer = get_renderer(region, render, info)
    total = 0
    for lat, lon, angle, dx, dy in rows:
        total += int(renderer.render(lat, lon, angle, (dx, dy)).sum(dtype=np.int64) & 0xFFFF)
    return total


def _direct(project: Project, region: str, lats, lons, angles, shifts, cores: int) -> float:
    render, info = project.params.render, project.info
    rows = np.column_stack([lats, lons, angles, shifts])
    chunks = [(region, render, info, c) for c in np.array_split(rows, cores * 8) if len(c)]
    init = (region, render, info, lats[0], lons[0])
    with mp.get_context("spawn").Pool(cores, initializer=_worker_init, initargs=init) as pool:
        pool.map(_worker_render, [(region, render, info, rows[:2])] * cores)  # every worker started and warm
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


def _one_metatile_s(index, info: ConnInfo, lat: float, lon: float) -> float:
    """Seconds to render one metatile (in memory, not stored): the cold cost per metatile, even when
    this run found every metatile already on disk."""
    renderer = MetatileRenderer(index.region, index.grid, info, index.spec.buffer_px)
    meta = index.entries[index.keys_for([lat], [lon])[0]]
    started = time.perf_counter()
    renderer.render(meta)
    return time.perf_counter() - started


def run(project: Project, *, region: str | None = None, n: int | None = None) -> dict:
    params, paths = project.params, project.paths
    region = bench_region(project, region)
    n = n or 400
    cores = os.cpu_count() or 1
    lats, lons = _bench_locations(project, region, n)
    n = len(lats)
    rng = np.random.default_rng(SEED)
    max_shift = params.augment.max_shift_m
    angles = rng.uniform(0.0, 360.0, n)
    shifts = rng.uniform(-max_shift, max_shift, (n, 2))

    direct_s = _direct(project, region, lats, lons, angles, shifts, cores)

    started = time.perf_counter()
    index = ensure_metatiles(
        region,
        lats,
        lons,
        spec=MetatileSpec.from_config(params.render, params.augment, params.tiles),
        paths=paths,
        info=project.info,
        orchestrate=params.orchestrate,
        progress=False,
    )
    metatile_s = time.perf_counter() - started
    used = len(set(index.keys_for(lats, lons)))

    each_s = _one_metatile_s(index, project.info, lats[0], lons[0])
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
