"""Metatile storage: raw .npy (memory-mapped) against zarr (LZ4, chunked), side by side in one run.

Source: a region's metatiles in the raw layout an older loc2vec wrote (index.json version 1, one .npy per
metatile): ``$LOC2VEC_BENCH_NPY_METATILES`` (e.g. another checkout's data/metatiles/<region>), else the
project's data/metatiles/<region> if it is still raw. They are converted into a temporary directory with
`write_metatile` (the source stays as it was), then:

* ``bytes``: on disk before (the .npy files) and after (the zarr arrays), and the ratio;
* ``cutter``: `cut_tiles` on CPU over the same `n` random locations (uniform over the metatiles' cores,
  random angles and shifts), in batches of 100 as training cuts them; npy and zarr (both in memory) timed
  in quarters ordered ABBA so that a drifting load weighs on both, zarr_windows after them (its full-size
  arrays disturb what runs next); wall and CPU time (``cpu_s``, ``cpu_ratio``: less sensitive to other
  processes on the cores) per layout; the tiles are compared bit for bit.
  ``zarr``: with params ``tiles.host_cache_mb`` (the region's metatiles fit: read whole once, then held);
  ``zarr_windows``: with a cache of a quarter of them, so most batches read only their tiles' windows;
* ``read``: one whole metatile read (page-cache-warm .npy copied out of its memory map, against zarr
  decompression): what the dense embedding pays per metatile.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from loc2vec.cli.project import Project
from loc2vec.core.geo import EARTH_RADIUS_M
from loc2vec.raster.cutter import cut_tiles
from loc2vec.raster.grid import Metatile
from loc2vec.raster.metatiles import STORAGE, MetatileIndex, MetatileSpec, read_metatile, write_metatile

from .common import bench_region

SEED = 0
BATCH = 100
SOURCE_ENV = "LOC2VEC_BENCH_NPY_METATILES"


class _NpyIndex(MetatileIndex):
    """The raw layout as older loc2vec versions read it: each .npy memory-mapped."""

    def array(self, key: str) -> np.ndarray:
        arr = self._arrays.get(key)
        if arr is None:
            arr = self._arrays[key] = np.load(self.directory / f"{key}.npy", mmap_mode="r")
        return arr


def _index(cls: type[MetatileIndex], region: str, spec: MetatileSpec, directory: Path, raw: dict) -> MetatileIndex:
    entries = {k: Metatile(**v) for k, v in raw["metatiles"].items()}
    xs = [v for m in entries.values() for v in (m.minx, m.maxx)]
    ys = [v for m in entries.values() for v in (m.miny, m.maxy)]
    lat = np.degrees(2 * np.arctan(np.exp(np.array([min(ys), max(ys)]) / EARTH_RADIUS_M)) - np.pi / 2)
    lon = np.degrees(np.array([min(xs), max(xs)]) / EARTH_RADIUS_M)
    index = cls(region, spec, raw["signature"], directory, (lon[0], lat[0], lon[1], lat[1]))
    index.entries = entries
    return index


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(project: Project, *, region: str | None = None, n: int | None = None) -> dict:
    params = project.params
    region = bench_region(project, region)
    source = Path(os.environ.get(SOURCE_ENV) or project.paths.metatiles(region))
    raw = json.loads((source / "index.json").read_text())
    if raw.get("version") != 1:
        raise ValueError(f"{source} is not a raw .npy metatile directory (index version 1): set ${SOURCE_ENV}")
    spec = MetatileSpec.from_config(params.render, params.augment, params.tiles)
    keys = sorted(raw["metatiles"])
    if any(raw["metatiles"][k]["width"] != spec.grid.side_px for k in keys):
        raise ValueError(f"{source} was rendered with another metatile size than params tiles/render give")
    npy_bytes = sum((source / f"{k}.npy").stat().st_size for k in keys)
    n = n or 2000
    with tempfile.TemporaryDirectory(prefix="loc2vec-bench-metatiles-", dir=project.paths.data) as tmp:
        target = Path(tmp) / region
        target.mkdir()
        started = time.perf_counter()
        for k in keys:
            write_metatile(target / f"{k}.zarr", np.load(source / f"{k}.npy", mmap_mode="r"))
        convert_s = time.perf_counter() - started
        zarr_bytes = _size(target)
        before = _index(_NpyIndex, region, spec, source, raw)
        after = _index(MetatileIndex, region, spec, target, raw)
        quarter = max(1, len(keys) // 4) * spec.grid.side_px**2 * 12 >> 20
        small = _index(MetatileIndex, region, replace(spec, host_cache_mb=quarter), target, raw)
        layouts = {"npy": before, "zarr": after, "zarr_windows": small}

        rng = np.random.default_rng(SEED)
        west, south, east, north = before.bbox
        lats, lons = np.empty(0), np.empty(0)
        while len(lats) < n:  # uniform over the metatiles' cores
            la, lo = rng.uniform(south, north, 4 * n), rng.uniform(west, east, 4 * n)
            ok = np.isin(np.asarray(before.keys_for(la, lo)), keys)
            lats, lons = np.concatenate([lats, la[ok]])[:n], np.concatenate([lons, lo[ok]])[:n]
        angles = rng.uniform(0, 360, n)
        shift = params.augment.max_shift_m
        shifts = rng.uniform(-shift, shift, (n, 2))
        batches = [slice(i, min(n, i + BATCH)) for i in range(0, n, BATCH)]
        quarters = [batches[i * len(batches) // 4 : (i + 1) * len(batches) // 4] for i in range(4)]
        for index in layouts.values():  # warm: every metatile read once (page cache, LRU)
            for k in keys:
                np.asarray(index.array(k))[::97, ::97].sum()
        seconds = dict.fromkeys(layouts, 0.0)
        cpu = dict.fromkeys(layouts, 0.0)
        tiles: dict[str, list[torch.Tensor]] = {name: [] for name in layouts}

        def timed(name: str, part: list[slice]) -> None:
            t0, c0 = time.perf_counter(), time.process_time()
            for b in part:
                cut = cut_tiles(layouts[name], lats[b], lons[b], angles[b], shifts[b], device="cpu")
                tiles[name].append(cut.clone())
            seconds[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0

        # the two in-memory layouts in quarters ordered ABBA (a drifting load weighs on both alike); the window
        # path apart, after them: it allocates and faults a full-size array per metatile and batch, which
        # disturbs whatever is timed next
        for i, part in enumerate(quarters):
            for name in ("npy", "zarr") if i % 3 == 0 else ("zarr", "npy"):
                timed(name, part)
        timed("zarr_windows", batches)
        same = all(
            torch.equal(a, b) and torch.equal(a, c)
            for a, b, c in zip(tiles["npy"], tiles["zarr"], tiles["zarr_windows"], strict=True)
        )

        k = keys[len(keys) // 2]
        t0 = time.perf_counter()
        np.array(np.load(source / f"{k}.npy", mmap_mode="r"))
        npy_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        read_metatile(target / f"{k}.zarr")
        zarr_read = time.perf_counter() - t0
    return {
        "region": region,
        "source": str(source),
        "metatiles": len(keys),
        "storage": STORAGE,
        "bytes": {"npy": npy_bytes, "zarr": zarr_bytes, "ratio": round(npy_bytes / zarr_bytes, 1)},
        "convert_s": round(convert_s, 2),
        "cutter": {
            "n": n,
            "threads": torch.get_num_threads(),
            "npy_tiles_per_s": round(n / seconds["npy"], 1),
            "zarr_tiles_per_s": round(n / seconds["zarr"], 1),
            "ratio": round(seconds["npy"] / seconds["zarr"], 3),
            "cpu_s": {name: round(v, 2) for name, v in cpu.items()},
            "cpu_ratio": round(cpu["npy"] / cpu["zarr"], 3),
            "host_cache_mb": spec.host_cache_mb,
            "zarr_windows_tiles_per_s": round(n / seconds["zarr_windows"], 1),
            "zarr_windows_cache_mb": quarter,
            "bit_identical": same,
        },
        "read_metatile_ms": {"npy": round(npy_read * 1000, 1), "zarr": round(zarr_read * 1000, 1)},
    }
