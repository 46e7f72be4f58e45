"""Metatiles: each channel rendered once, as large rasters, only where locations need them.

Rendering every augmented tile with Mapnik costs ~5 ms per tile per core; training draws
K rotated and shifted positives per anchor, so the "fast path" renders big metatiles once
and cuts tiles out of them (raster/cutter.py).

Geometry (a fixed grid, so a location's metatile is pure arithmetic, with no search; raster/grid.py):

* Rows are bands of constant *true* height: row = ⌊R·φ / (C·mpp)⌋, φ in radians, C the core
  side in px, mpp = 2·radius_m/size the tiles' metres per pixel. Each row has one Mercator
  scale k = 1/cos(φ_mid) of its mid latitude, so a core is C×C px at the tiles' mpp wherever
  on Earth (a fixed Mercator grid would shrink to C·cos φ px in the north).
* Columns split the row's Mercator x in cells of C·mpp·k units.
* A metatile is its core plus a margin of M px on every side, M covering the farthest pixel of
  any tile whose location lies in the core: the shift (≤ max_shift_m per axis) plus a rotated
  tile's half extent (≤ √2·radius_m per axis), plus 2 px of slack for nearest-neighbour
  rounding and the Mercator-scale drift below. So every tile is cut from exactly one metatile.
* Scale: the metatile is drawn at its row's k; the cutter samples it with a step of
  k(location)/k(row) metatile px per tile px from the location's exact Mercator position, so
  positions match render_tile (up to float32 rounding, ~2·10⁻⁴ px). What is not exact are line
  widths and marker sizes, drawn in px at the row's k: their relative error is
  |k(φ)/k(φ_mid) − 1| ≈ tan φ·Δφ/2, at most 2.7·10⁻⁴ at 47° N with C = 2048 (3.2 km rows;
  4.3·10⁻⁴ at 60°, 6.9·10⁻⁴ at 70°): a 16 m road is 0.003 px too thin or thick, invisible next
  to anti-aliasing. (A core is 2048.0001 px tall in Mercator, not 2048: the slack covers it.)

Storage: one channels-last (H, W, 12) uint8 zarr v3 array per metatile under
data/metatiles/<region>/<key>.zarr (core/paths.py), written atomically (a temporary directory renamed), and
an index.json with
each metatile's Mercator bounds, scale and mpp and the parameters it was rendered with (tile
geometry, grid, channel definitions, the region's import): if any of them changes, the old
metatiles are deleted and re-rendered on demand. The import is named by its extract's sha256 and import
format, never by when it happened: the directory is a DVC output, so the same extract must give the same
bytes on every machine and after a re-import (the wall-clock import time made `render@R` stale everywhere
but on the machine that rendered it).

Compression (STORAGE): a metatile is ~95% zero bytes (empty channels, empty land). Chunks of 256×256×12 px
(a rotated tile spans ≤ 2×2 of them), Blosc LZ4, all-zero chunks not stored, every chunk in one shard file
(two files per metatile: DVC is slow with many small files). Measured on a Liechtenstein metatile: 65.5 MB
raw, 89× smaller with LZ4 (zstd level 1: 57×, and twice as slow to read), whole-array read 55 ms, a
200×200 px window 3 ms. Readers get whole arrays decompressed (`MetatileIndex.array`), kept in a per-process
LRU of `tiles.host_cache_mb` (what the page cache held of the raw memory maps before). An index of the raw
`.npy` layout (INDEX_VERSION 1, what older loc2vec versions wrote) is converted in place on load when its
signature still holds (re-rendering is minutes; converting one metatile ~1 s), and never read as zarr.

Rendering fans out over the configured task runner (orchestration/): in-process with a spawned pool of
Mapnik processes (inline), Prefect threads that hand renders to that pool (threads), or Dask workers
that render themselves (dask). A metatile is the same render wherever it is drawn.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mapnik
import numpy as np
from tqdm import tqdm

from loc2vec.core.atomic import file_lock, write_text
from loc2vec.core.config import AugmentConfig, OrchestrateConfig, RenderConfig, TilesConfig
from loc2vec.core.names import validate_region_name
from loc2vec.core.paths import ProjectPaths
from loc2vec.core.pools import spawn_pool, worker_count
from loc2vec.orchestration.runners import RunnerKind, map_tasks, runner_kind
from loc2vec.osm.db import ConnInfo, ImportRecord, require_import
from loc2vec.raster.channels import CHANNELS, N_CHANNELS
from loc2vec.raster.grid import Metatile, MetatileGrid
from loc2vec.raster.render import MAX_FEATURE_M, RenderError, channel_map_xml

log = logging.getLogger(__name__)
INDEX_VERSION = 2  # 1: raw .npy metatiles (converted on load); 2: zarr (STORAGE)
STORAGE = {"format": "zarr", "chunk_px": 256, "codec": "blosc-lz4-5"}  # recorded in index.json
MAX_LAT = 85.0  # Web Mercator's useful range


@dataclass(frozen=True)
class MetatileSpec:
    """How a project's metatiles are drawn and used: the grid, Mapnik's query margin, processes, device cache."""

    grid: MetatileGrid
    buffer_px: int = 16  # render.buffer_px
    render_processes: int = 0  # tiles.render_processes; 0 = one per core
    device_cache_mb: int = 4096  # tiles.device_cache_mb
    host_cache_mb: int = 4096  # tiles.host_cache_mb

    @classmethod
    def from_config(cls, render: RenderConfig, augment: AugmentConfig, tiles: TilesConfig) -> MetatileSpec:
        return cls(
            grid=MetatileGrid.from_config(render, augment, tiles),
            buffer_px=render.buffer_px,
            render_processes=tiles.render_processes,
            device_cache_mb=tiles.device_cache_mb,
            host_cache_mb=tiles.host_cache_mb,
        )


# ---------------------------------------------------------------- the on-disk index


def _channels_digest() -> str:
    """Changing a channel's SQL or drawing must invalidate the metatiles drawn with the old one."""
    text = json.dumps([(c.name, c.kind, c.sql) for c in CHANNELS])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class MetatileIndex:
    """The metatiles of one region for one tile geometry: what exists on disk, and their arrays."""

    def __init__(
        self,
        region: str,
        spec: MetatileSpec,
        signature: dict,
        directory: Path,
        bbox: tuple[float, float, float, float],
    ):
        self.region = region
        self.spec = spec
        self.grid = spec.grid
        self.signature = signature
        self.directory = directory
        self.entries: dict[str, Metatile] = {}
        self.rendered: tuple[str, ...] = ()  # keys the ensure_metatiles() call that returned this index rendered
        self.render_seconds = 0.0
        self._arrays: OrderedDict[str, np.ndarray] = OrderedDict()  # decompressed, least recently used first
        self._lock = threading.Lock()
        self.bbox = bbox  # the region's import extent (west, south, east, north): cut locations must be inside

    @property
    def path(self) -> Path:
        return self.directory / "index.json"

    def keys_for(self, lats: np.ndarray, lons: np.ndarray) -> list[str]:
        rows, cols = self.grid.rows_cols(lats, lons)
        return [f"r{r}_c{c}" for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]

    def file(self, key: str) -> Path:
        """A metatile's zarr array (a directory)."""
        return self.directory / f"{key}.zarr"

    def _check(self, key: str) -> Metatile:
        meta = self.entries.get(key)
        if meta is None:
            raise RenderError(
                f"metatile {key} of region {self.region!r} has not been rendered; call ensure_metatiles() first"
            )
        return meta

    def cached(self, key: str) -> np.ndarray | None:
        """The decompressed metatile if this process holds it (marked as just used), else None."""
        with self._lock:
            arr = self._arrays.get(key)
            if arr is not None:
                self._arrays.move_to_end(key)
            return arr

    def has_room(self) -> bool:
        """Whether one more decompressed metatile fits in `spec.host_cache_mb` without evicting one."""
        side = self.grid.side_px
        with self._lock:
            used = sum(a.nbytes for a in self._arrays.values())
        return used + side * side * N_CHANNELS <= self.spec.host_cache_mb << 20

    def array(self, key: str, *, keep: bool = True) -> np.ndarray:
        """The (H, W, 12) uint8 metatile, decompressed (read-only), from this process's LRU of decompressed
        metatiles (`spec.host_cache_mb`; the least recently used ones make room).

        `keep=False`: a metatile not in the LRU is read without being added to it. For readers that visit each
        metatile once (the dense embedding: one task per metatile), whose reads would otherwise fill the LRU up to
        host_cache_mb (measured: `loc2vec embed` of Liechtenstein's 38 metatiles peaked at 3.9 GB) for nothing."""
        arr = self.cached(key)
        if arr is not None:
            return arr
        meta = self._check(key)
        arr = read_metatile(self.file(key))
        if arr.shape != (meta.height, meta.width, N_CHANNELS) or arr.dtype != np.uint8:
            raise RenderError(f"metatile {self.file(key)} is {arr.shape} {arr.dtype}, the index says otherwise")
        arr.flags.writeable = False
        if not keep:
            return arr
        with self._lock:
            self._arrays[key] = arr
            budget = self.spec.host_cache_mb << 20
            while len(self._arrays) > 1 and sum(a.nbytes for a in self._arrays.values()) > budget:
                self._arrays.popitem(last=False)
        return arr

    def windows(self, key: str, windows: Iterable[tuple[tuple[int, int], tuple[int, int]]]) -> np.ndarray:
        """A full-size (H, W, 12) array holding the metatile's pixels in each (rows, cols) window (zero
        elsewhere), read from only the chunks the windows overlap, not cached: what the cutter reads when the
        LRU is full. The zeros are pages never touched outside the windows."""
        meta = self._check(key)
        out = np.zeros((meta.height, meta.width, N_CHANNELS), dtype=np.uint8)
        import zarr

        z = zarr.open_array(self.file(key), mode="r")
        for rows, cols in windows:
            r0, r1 = max(0, rows[0]), min(meta.height, rows[1])
            c0, c1 = max(0, cols[0]), min(meta.width, cols[1])
            if r1 > r0 and c1 > c0:
                out[r0:r1, c0:c1] = z[r0:r1, c0:c1, :]
        return out

    def __getstate__(self) -> dict:
        """Pickled (sent to a Dask worker) without its decompressed arrays: the worker reads what it needs."""
        state = {**self.__dict__, "_arrays": OrderedDict()}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        """A fresh lock for the process that unpickles it."""
        self.__dict__.update(state, _lock=threading.Lock())

    def to_json(self) -> dict:
        return {
            "version": INDEX_VERSION,
            "storage": STORAGE,
            "region": self.region,
            "signature": self.signature,
            "metatiles": {k: asdict(m) for k, m in sorted(self.entries.items())},
        }

    def save(self) -> None:
        write_text(self.path, json.dumps(self.to_json(), indent=1))

    def __len__(self) -> int:
        return len(self.entries)


def _signature(record: ImportRecord, grid: MetatileGrid) -> dict:
    return {
        **asdict(grid),
        "margin_px": grid.margin_px,
        "mpp": grid.mpp,
        "channels": _channels_digest(),
        "import_sha256": record.sha256,
        "import_format": record.import_format,
    }


_INDEXES: dict[Path, MetatileIndex] = {}


def load_index(region: str, spec: MetatileSpec, directory: Path, info: ConnInfo) -> MetatileIndex:
    """The region's index in `directory` for this spec and the current import; stale metatiles are removed.

    The same object is returned while the signature holds, so its memory maps (and the pages a
    process has already mapped) and the cutter's caches live on across calls.
    """
    record = require_import(region, info)
    signature = _signature(record, spec.grid)
    index = _INDEXES.get(directory)
    if (
        index is None
        or index.signature != signature
        or index.spec != spec
        or (index.entries and not index.path.is_file())
    ):
        index = _INDEXES[directory] = MetatileIndex(region, spec, signature, directory, record.bbox)
    index.rendered, index.render_seconds = (), 0.0
    if index.path.is_file():
        raw = json.loads(index.path.read_text())
        if raw.get("version") == 1 and raw.get("signature") == signature:
            convert_npy_metatiles(directory, raw)  # an older loc2vec's raw .npy: converted, never misread
            raw = json.loads(index.path.read_text())
        if raw.get("version") == INDEX_VERSION and raw.get("storage") == STORAGE and raw.get("signature") == signature:
            for key, value in raw["metatiles"].items():  # other processes may have added some
                if key not in index.entries and (index.file(key) / "zarr.json").is_file():
                    index.entries[key] = Metatile(**value)
        else:
            log.info("metatiles of %s were rendered with other params, storage or import: re-rendering", region)
            _remove_metatiles(directory)
            index.path.unlink()
            index = _INDEXES[directory] = MetatileIndex(region, spec, signature, directory, record.bbox)
    return index


def _remove_metatiles(directory: Path) -> None:
    for old in directory.glob("*.npy"):
        old.unlink()
    for old in directory.glob("*.zarr"):
        shutil.rmtree(old)


def convert_npy_metatiles(directory: Path, raw: dict, progress: bool = True) -> int:
    """Convert a region's raw .npy metatiles (index version 1) to zarr in place (each written before its .npy
    is removed; the index is rewritten as version 2 last, so a killed conversion resumes); returns how many."""
    keys = sorted(raw["metatiles"])
    done = 0
    for key in tqdm(keys, desc=f"metatiles .npy → zarr ({directory.name})", unit="mt", disable=not progress):
        npy, zarr_dir = directory / f"{key}.npy", directory / f"{key}.zarr"
        if npy.is_file():
            if not (zarr_dir / "zarr.json").is_file():
                write_metatile(zarr_dir, np.load(npy, mmap_mode="r"))
            npy.unlink()
            done += 1
    kept = {k: v for k, v in raw["metatiles"].items() if (directory / f"{k}.zarr" / "zarr.json").is_file()}
    write_text(
        directory / "index.json",
        json.dumps({**raw, "version": INDEX_VERSION, "storage": STORAGE, "metatiles": kept}, indent=1),
    )
    log.info("converted %d .npy metatiles of %s to zarr", done, directory)
    return done


def write_metatile(path: Path, array: np.ndarray) -> None:
    """Store one (H, W, 12) uint8 metatile as zarr (STORAGE), atomically: a temporary directory renamed."""
    import zarr
    from zarr.codecs import BloscCodec

    chunk = STORAGE["chunk_px"]
    h, w, c = array.shape
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    z = zarr.create_array(
        tmp,
        shape=array.shape,
        dtype="uint8",
        chunks=(chunk, chunk, c),
        shards=(-(-h // chunk) * chunk, -(-w // chunk) * chunk, c),
        compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")],
        fill_value=0,
        config={"write_empty_chunks": False},
    )
    z[...] = array
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def shared_memory_array(shape: tuple[int, ...]) -> np.ndarray:
    """A zeroed uint8 array in a shared anonymous mapping (memory the kernel manages like the page cache).

    Why: the cutter gathers 12 bytes per output pixel from scattered rows of a 200 MB metatile, and on these
    VMs (kernel 6.18, a DAMON `pageout` scheme on physical memory) it gathered more slowly from numpy's private
    anonymous memory than from a memory-mapped .npy in the page cache: 0.84–0.90× the CPU time-rate in
    interleaved runs, 0.82–0.85× with private memory advised for huge pages, and 0.97–1.04× from a shared
    anonymous mapping (benchmarks/README.md, "metatiles"). The mechanism is not pinned down; the contents
    are the same either way. Freed when the last array viewing it goes.
    """
    n = int(np.prod(shape))
    buf = mmap.mmap(-1, max(n, 1), flags=mmap.MAP_SHARED)
    return np.frombuffer(buf, dtype=np.uint8, count=n).reshape(shape)


def read_metatile(path: Path, window: tuple[slice, slice] | None = None) -> np.ndarray:
    """A stored metatile (or a window of it: only the chunks it overlaps are read), decompressed; whole ones
    straight into shared anonymous memory (`shared_memory_array`), where the cutter gathers from them."""
    import zarr

    z = zarr.open_array(path, mode="r")
    if window is not None:
        return np.ascontiguousarray(z[window[0], window[1], :])
    from zarr.core.buffer.cpu import NDBuffer

    out = shared_memory_array(tuple(z.shape))
    z.get_basic_selection(Ellipsis, out=NDBuffer.from_numpy_array(out))
    return out


# ---------------------------------------------------------------- rendering


class MetatileRenderer:
    """The 12 channel maps at metatile size, parsed once and re-aimed per metatile."""

    def __init__(self, region: str, grid: MetatileGrid, info: ConnInfo, buffer_px: int):
        px_per_m = 1.0 / grid.mpp
        # A line's round cap or a marker just outside the extent must still be drawn.
        buffer_px = buffer_px + int(math.ceil(MAX_FEATURE_M * px_per_m))
        side = grid.side_px
        self.side = side
        self._maps = []
        for channel in CHANNELS:
            m = mapnik.Map(side, side)
            mapnik.load_map_from_string(m, channel_map_xml(channel, region, info, px_per_m, buffer_px, side))
            self._maps.append(m)
        self._image = mapnik.Image(side, side)

    def render(self, meta: Metatile) -> np.ndarray:
        out = np.empty((meta.height, meta.width, N_CHANNELS), dtype=np.uint8)
        box = mapnik.Box2d(meta.minx, meta.miny, meta.maxx, meta.maxy)
        for i, m in enumerate(self._maps):
            m.zoom_to_box(box)
            self._image.clear()
            mapnik.render_with_vars(m, self._image, {"angle": 0.0})
            rgba = np.frombuffer(self._image.to_string(), dtype=np.uint8).reshape(meta.height, meta.width, 4)
            out[..., i] = rgba[..., 3]
        return out


_RENDERERS: dict[tuple[str, MetatileGrid, ConnInfo, int, int], MetatileRenderer] = {}


@dataclass(frozen=True)
class RenderJob:
    """Everything a process needs to render and store one region's metatiles (picklable)."""

    region: str
    grid: MetatileGrid
    info: ConnInfo
    buffer_px: int
    directory: Path


def render_metatile(job: RenderJob, key: str) -> Metatile:
    """Render and store one metatile (in a pool worker, a Dask worker or in-process); the maps are built once
    per process and thread (a renderer's maps and image are not shared between threads: Dask workers may run
    several)."""
    slot = (job.region, job.grid, job.info, job.buffer_px, threading.get_ident())
    renderer = _RENDERERS.get(slot)
    if renderer is None:
        renderer = _RENDERERS[slot] = MetatileRenderer(job.region, job.grid, job.info, job.buffer_px)
    row, col = (int(v) for v in key[1:].split("_c"))
    meta = job.grid.metatile(row, col)
    write_metatile(job.directory / f"{key}.zarr", renderer.render(meta))
    return meta


def _render_task(task: tuple[RenderJob, str]) -> Metatile:
    return render_metatile(*task)


def _render_in_pool(job: RenderJob, key: str) -> Metatile:
    """A Prefect task: the render itself goes to this process's Mapnik pool when there is one (the threads
    runner: threads only orchestrate); elsewhere (a Dask worker) it renders right here."""
    pool = _RENDER_POOLS.get(os.getpid())
    if pool is not None:
        return pool.apply(render_metatile, (job, key))
    return render_metatile(job, key)


_RENDER_POOLS: dict[int, Any] = {}  # pid → the Mapnik process pool of a render_missing call in that process


def render_missing(
    job: RenderJob,
    missing: Iterable[str],
    on_done: Callable[[Metatile], None],
    *,
    kind: RunnerKind,
    processes: int,
    orchestrate: OrchestrateConfig,
) -> None:
    """Render the `missing` metatiles; `on_done` records each as it lands (in the calling process).

    inline: a spawned pool of `processes` Mapnik processes (or this process). threads: one Prefect task per
    metatile, whose thread hands the render to that pool. dask: one task per metatile on the cluster's
    workers, which are processes already.
    """
    keys = list(missing)
    workers = worker_count(processes, len(keys)) if kind in ("inline", "threads") else 0
    with spawn_pool(workers) as pool:
        if kind == "inline":
            tasks = [(job, k) for k in keys]
            for meta in pool.imap_unordered(_render_task, tasks) if pool else map(_render_task, tasks):
                on_done(meta)
            return
        if pool is not None:
            _RENDER_POOLS[os.getpid()] = pool
        try:
            map_tasks(
                _render_in_pool,
                [{"job": job, "key": k} for k in keys],
                lambda _i, meta: on_done(meta),
                flow_name="loc2vec-metatiles",
                run_name=f"{job.region}-{len(keys)}",
                task_name="render-metatile",
                task_run_name=f"{job.region}-" + "{key}",
                cfg=orchestrate,
                kind=kind,
            )
        finally:
            _RENDER_POOLS.pop(os.getpid(), None)


def check_locations(
    region: str,
    lats: Sequence[float] | np.ndarray,
    lons: Sequence[float] | np.ndarray,
    bbox: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """Locations as float64 arrays, each finite and inside the region's extent (else a clear error)."""
    lats = np.atleast_1d(np.asarray(lats, dtype=np.float64))
    lons = np.atleast_1d(np.asarray(lons, dtype=np.float64))
    if lats.ndim != 1 or lats.shape != lons.shape:
        raise RenderError(f"lats and lons must be 1-D of equal length, got {lats.shape} and {lons.shape}")
    bad = ~(np.isfinite(lats) & np.isfinite(lons) & (np.abs(lats) <= MAX_LAT) & (np.abs(lons) <= 180))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RenderError(f"location {i} ({lats[i]}, {lons[i]}) is not a finite lat/lon within ±{MAX_LAT:g}°, ±180°")
    west, south, east, north = bbox
    outside = (lats < south) | (lats > north) | (lons < west) | (lons > east)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise RenderError(
            f"{int(outside.sum())} location(s) outside region {region!r} (lat {south:.4f}..{north:.4f}, "
            f"lon {west:.4f}..{east:.4f}), e.g. #{i}: ({lats[i]}, {lons[i]})"
        )
    return lats, lons


def ensure_metatiles(
    region: str,
    lats: Sequence[float] | np.ndarray,
    lons: Sequence[float] | np.ndarray,
    *,
    spec: MetatileSpec,
    paths: ProjectPaths,
    info: ConnInfo,
    orchestrate: OrchestrateConfig,
    progress: bool = True,
) -> MetatileIndex:
    """Render the metatiles these locations need that are not on disk yet; return the index.

    Args:
        region: an ingested region.
        lats: latitudes of the locations whose tiles will be cut.
        lons: their longitudes.
        spec: grid, margin and processes (params render, augment, tiles).
        paths: the project's paths: the region's metatile directory (a DVC output for pipeline regions) and
            a lock outside it (one process renders a region's metatiles at a time: data-loader workers may
            race, and the DVC output changes only when metatiles do).
        info: the database.
        orchestrate: which task runner fans the renders out.
        progress: show a progress bar.
    """
    validate_region_name(region)
    directory, lock = paths.metatiles(region), paths.lock(f"metatiles-{region}")
    lats, lons = check_locations(region, lats, lons, require_import(region, info).bbox)
    directory.mkdir(parents=True, exist_ok=True)
    with file_lock(lock):
        index = load_index(region, spec, directory, info)
        needed = sorted(set(index.keys_for(lats, lons)))
        missing = [k for k in needed if k not in index.entries]
        if missing:
            started = time.perf_counter()
            kind = runner_kind(orchestrate)
            bar = tqdm(total=len(missing), desc=f"metatiles {region} ({kind})", unit="mt", disable=not progress)

            def done(meta: Metatile) -> None:
                index.entries[meta.key] = meta
                index.save()  # after each one: an interrupted run keeps what it finished
                bar.update()

            job = RenderJob(region, spec.grid, info, spec.buffer_px, directory)
            with bar:
                render_missing(job, missing, done, kind=kind, processes=spec.render_processes, orchestrate=orchestrate)
            index.rendered = tuple(missing)
            index.render_seconds = time.perf_counter() - started
            log.info("rendered %d metatiles of %s in %.1f s", len(missing), region, index.render_seconds)
    return index


def clear_metatiles(directory: Path) -> None:
    """Delete a region's metatiles (they are a cache: everything is re-rendered on demand)."""
    _INDEXES.pop(directory, None)
    if directory.is_dir():
        shutil.rmtree(directory)
