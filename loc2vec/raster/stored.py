"""Direct tiles, the article's scheme: per location an anchor plus K rotated/shifted positives.

Every tile is a real Mapnik render (one process per core, one renderer per process). Tiles
are stored in one zarr array per region, shape (N, 1+K, 12, S, S) uint8: index 0 is the
anchor (angle 0, no shift), 1..K the positives. Chunks are single tiles (random access) and
zarr v3 *sharding* packs `locations_per_shard` locations into one file, zstd-compressed
(~30× smaller than raw masks) — DVC is slow with many small files, fine with a few shards.
A Parquet manifest maps rows to locations and records each positive's angle and shift.
The whole store is written to a temporary directory and swapped in atomically.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from tqdm import tqdm
from zarr.codecs import ZstdCodec

from loc2vec.core.atomic import swap_dir
from loc2vec.core.config import RenderConfig, ShardsConfig
from loc2vec.core.errors import Loc2VecError
from loc2vec.core.pools import spawn_pool, worker_count
from loc2vec.osm.db import ConnInfo
from loc2vec.raster.channels import N_CHANNELS

log = logging.getLogger(__name__)


def positive_augmentations(n: int, k: int, max_shift_m: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Angles (n, k) uniform in [0, 360) and shifts (n, k, 2) with each axis uniform in ±[0, max]."""
    rng = np.random.default_rng(seed)
    angles = rng.uniform(0.0, 360.0, size=(n, k))
    shifts = rng.uniform(-max_shift_m, max_shift_m, size=(n, k, 2))
    return angles.astype(np.float32), shifts.astype(np.float32)


_WORKER: dict = {}


def _init_worker(region: str, render: RenderConfig, info: ConnInfo) -> None:
    from loc2vec.raster.render import get_renderer

    _WORKER["renderer"] = get_renderer(region, render, info)


def _render_block(job: tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> tuple[int, np.ndarray]:
    start, lats, lons, angles, shifts = job
    renderer = _WORKER["renderer"]
    k = angles.shape[1]
    size = renderer.spec.size
    out = np.empty((len(lats), k + 1, N_CHANNELS, size, size), dtype=np.uint8)
    for i, (lat, lon) in enumerate(zip(lats, lons, strict=True)):
        out[i, 0] = renderer.render(lat, lon)
        for j in range(k):
            out[i, j + 1] = renderer.render(
                lat, lon, float(angles[i, j]), (float(shifts[i, j, 0]), float(shifts[i, j, 1]))
            )
    return start, out


def render_direct_tiles(
    region: str,
    samples: pd.DataFrame,
    out: Path,
    *,
    cfg: ShardsConfig,
    render_cfg: RenderConfig,
    max_shift_m: float,
    info: ConnInfo,
) -> Path:
    """Render anchor + K positives for every sampled location into a zarr store at `out` (atomic)."""
    if samples.empty:
        raise Loc2VecError(f"no sampled locations for region {region!r}: run `loc2vec sample --region {region}`")
    n, k, size, per = len(samples), cfg.k_positives, render_cfg.size, cfg.locations_per_shard
    angles, shifts = positive_augmentations(n, k, max_shift_m, cfg.seed)
    lats, lons = samples["lat"].to_numpy(np.float64), samples["lon"].to_numpy(np.float64)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    store = zarr.create_array(
        tmp,
        shape=(n, k + 1, N_CHANNELS, size, size),
        dtype="uint8",
        chunks=(1, 1, N_CHANNELS, size, size),
        shards=(per, k + 1, N_CHANNELS, size, size),
        compressors=ZstdCodec(level=cfg.zstd_level),
        fill_value=0,
        attributes={
            "region": region,
            "k_positives": k,
            "radius_m": render_cfg.radius_m,
            "size": size,
            "layout": "(location, 0=anchor|1..K=positives, channel, row, col)",
        },
    )
    jobs = [
        (s, lats[s : s + per], lons[s : s + per], angles[s : s + per], shifts[s : s + per]) for s in range(0, n, per)
    ]
    processes = worker_count(cfg.processes)
    started = time.monotonic()
    with (
        spawn_pool(processes, initializer=_init_worker, initargs=(region, render_cfg, info)) as pool,
        tqdm(total=n * (k + 1), unit="tile", desc=f"render {region}") as bar,
    ):
        if pool is None:
            _init_worker(region, render_cfg, info)
        for start, block in pool.imap_unordered(_render_block, jobs) if pool else map(_render_block, jobs):
            store[start : start + len(block)] = block
            bar.update(block.shape[0] * block.shape[1])
    seconds = time.monotonic() - started

    manifest = samples.reset_index(drop=True).copy()
    manifest["row"] = np.arange(n)
    manifest["angles"] = list(angles)
    manifest["shifts_m"] = [s.reshape(-1) for s in shifts]
    manifest.to_parquet(tmp / "manifest.parquet", index=False)
    swap_dir(tmp, out)
    log.info(
        "rendered %d tiles (%d locations × %d) in %.1fs: %.0f tiles/s with %d processes",
        n * (k + 1),
        n,
        k + 1,
        seconds,
        n * (k + 1) / seconds,
        processes,
    )
    return out


class TileStore:
    """Read access to a direct-tile store: anchors and positives by location row."""

    def __init__(self, path: Path):
        if not (path / "manifest.parquet").is_file():
            raise Loc2VecError(f"no tile store at {path}: run `loc2vec render-tiles`")
        self.path = path
        self.array = zarr.open_array(path, mode="r")
        self.manifest = pd.read_parquet(path / "manifest.parquet")
        self.k = int(self.array.shape[1]) - 1

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def location(self, row: int) -> np.ndarray:
        """(1+K, 12, S, S): the anchor and all positives of one location (one shard read)."""
        return np.asarray(self.array[row])
