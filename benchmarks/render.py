"""Direct rendering speed: full 12-channel tiles per second, one process (Mapnik from PostGIS)."""

from __future__ import annotations

import time

import numpy as np

from loc2vec.cli.project import Project
from loc2vec.raster.render import get_renderer

from .common import bench_locations, bench_region


def run(project: Project, *, region: str | None = None, n: int | None = None) -> dict:
    region = bench_region(project, region)
    n = n or 500
    lats, lons = bench_locations(project, region, n)
    rng = np.random.default_rng(0)
    angles = rng.uniform(0, 360, len(lats))
    shifts = rng.uniform(0, project.params.augment.max_shift_m, (len(lats), 2))
    renderer = get_renderer(region, project.params.render, project.info)
    for i in range(min(10, len(lats))):  # warm-up: connections, caches
        renderer.render(lats[i], lons[i])
    started = time.perf_counter()
    nonempty = 0
    for lat, lon, angle, shift in zip(lats, lons, angles, shifts, strict=True):
        nonempty += int(renderer.render(lat, lon, angle, (shift[0], shift[1])).any())
    seconds = time.perf_counter() - started
    return {
        "region": region,
        "n": len(lats),
        "processes": 1,
        "direct_tiles_per_s": round(len(lats) / seconds, 1),
        "ms_per_tile": round(1000 * seconds / len(lats), 2),
        "nonempty_fraction": round(nonempty / len(lats), 3),
        "tile": {"size": renderer.spec.size, "radius_m": renderer.spec.radius_m, "channels": 12},
    }
