"""Metatiles: each channel rendered once, as large rasters, only where locations need them.

Rendering every augmented tile with Mapnik costs ~5 ms per tile per core; training draws
K rotated and shifted positives per anchor, so the "fast path" renders big metatiles once
and cuts tiles out of them (loc2vec/cutter.py).

Geometry (a fixed grid, so a location's metatile is pure arithmetic, with no search):

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

Storage: one channels-last (H, W, 12) uint8 `.npy` per metatile under
data/metatiles/<region>/<key>.npy (opened with mmap, so a country never needs to fit in
memory: only the pages a batch touches are read), written atomically, and an index.json with
each metatile's Mercator bounds, scale and mpp and the parameters it was rendered with (tile
geometry, grid, channel definitions, the region's import): if any of them changes, the old
metatiles are deleted and re-rendered on demand.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import multiprocessing.pool
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import mapnik
import numpy as np
from tqdm import tqdm

from loc2vec.atomic import file_lock, save_npy, write_text
from loc2vec.channels import CHANNELS, N_CHANNELS
from loc2vec.config import ConfigError, load_params, section_config
from loc2vec.db import ConnInfo, ImportRecord, conninfo, require_import
from loc2vec.osm import check_region_name
from loc2vec.render import EARTH_RADIUS_M, MAX_FEATURE_M, RenderError, channel_map_xml

log = logging.getLogger(__name__)
INDEX_VERSION = 1
MAX_LAT = 85.0  # Web Mercator's useful range
SLACK_PX = 2  # nearest-neighbour rounding (1 px) + Mercator-scale drift (< 0.1 px), with room to spare


@dataclass(frozen=True)
class TilesConfig:
    """params.yaml `tiles:` — the fast path (metatiles + cutter). The largest shift, which sizes the
    margin, is `augment.max_shift_m`: one value for direct shards and the fast path alike."""

    metatile_core_px: int = 2048  # core side C (3.2 km at 1.5625 m/px); a metatile is C + 2·margin px square
    render_processes: int = 0  # Mapnik processes rendering missing metatiles; 0 = one per core
    device_cache_mb: int = 4096  # metatiles kept on an accelerator by the cutter (LRU)

    def __post_init__(self) -> None:
        if not 256 <= self.metatile_core_px <= 8192:
            raise ConfigError(f"tiles.metatile_core_px must be in [256, 8192], got {self.metatile_core_px}")
        if self.render_processes < 0 or self.device_cache_mb < 0:
            raise ConfigError("tiles.render_processes and tiles.device_cache_mb must be ≥ 0")


def tiles_config() -> TilesConfig:
    return section_config(TilesConfig, "tiles")


# ---------------------------------------------------------------- the grid (pure arithmetic)


@dataclass(frozen=True)
class MetatileGrid:
    radius_m: float
    size: int
    core_px: int
    max_shift_m: float

    @property
    def mpp(self) -> float:
        """True metres per pixel of the tiles (and of every metatile at its row's latitude)."""
        return 2.0 * self.radius_m / self.size

    @property
    def margin_px(self) -> int:
        return int(math.ceil((self.max_shift_m + math.sqrt(2.0) * self.radius_m) / self.mpp)) + SLACK_PX

    @property
    def side_px(self) -> int:
        return self.core_px + 2 * self.margin_px

    @property
    def core_m(self) -> float:
        return self.core_px * self.mpp

    def rows_cols(self, lats: np.ndarray, lons: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (row, col) of the metatile whose core contains each location."""
        lats, lons = np.asarray(lats, dtype=np.float64), np.asarray(lons, dtype=np.float64)
        rows = np.floor(EARTH_RADIUS_M * np.radians(lats) / self.core_m).astype(np.int64)
        cell_x = self.core_m * self.row_scale(rows)
        cols = np.floor(EARTH_RADIUS_M * np.radians(lons) / cell_x).astype(np.int64)
        return rows, cols

    def row_scale(self, rows: np.ndarray | int) -> np.ndarray:
        """Mercator units per true metre of a row: 1/cos of its mid latitude."""
        mid = (np.asarray(rows, dtype=np.float64) + 0.5) * self.core_m / EARTH_RADIUS_M
        return 1.0 / np.cos(mid)

    def metatile(self, row: int, col: int) -> Metatile:
        phi0, phi1 = row * self.core_m / EARTH_RADIUS_M, (row + 1) * self.core_m / EARTH_RADIUS_M
        scale = float(self.row_scale(row))
        cx = (col + 0.5) * self.core_m * scale
        cy = 0.5 * (_merc_y(phi0) + _merc_y(phi1))
        half = 0.5 * self.side_px * self.mpp * scale
        return Metatile(
            key=f"r{row}_c{col}",
            row=row,
            col=col,
            minx=cx - half,
            miny=cy - half,
            maxx=cx + half,
            maxy=cy + half,
            scale=scale,
            mpp=self.mpp,
            width=self.side_px,
            height=self.side_px,
            lat=math.degrees(0.5 * (phi0 + phi1)),
        )


def _merc_y(phi: float) -> float:
    return EARTH_RADIUS_M * math.log(math.tan(math.pi / 4 + phi / 2))


@dataclass(frozen=True)
class Metatile:
    """One metatile: its Mercator bounds (EPSG:3857), scale (Mercator units per true metre) and size."""

    key: str
    row: int
    col: int
    minx: float
    miny: float
    maxx: float
    maxy: float
    scale: float
    mpp: float  # true metres per pixel
    width: int
    height: int
    lat: float  # mid latitude of the row (degrees), where `scale` is exact

    @property
    def units_per_px(self) -> float:
        """Mercator units per metatile pixel."""
        return self.mpp * self.scale


# ---------------------------------------------------------------- the on-disk index


def metatile_dir(region: str) -> Path:
    """data/metatiles/<region> for the pipeline's regions (a DVC output, and the train stage's input);
    data/scratch/metatiles/<region> for any other region (evaluated or explored ad hoc), so that
    rendering it never changes what DVC tracks."""
    params = load_params()
    name = check_region_name(region)
    pipeline = params.section("pipeline").get("regions") or [params.regions.default]
    base = params.root / "data" if name in pipeline else params.root / "data" / "scratch"
    return base / "metatiles" / name


def _channels_digest() -> str:
    """Changing a channel's SQL or drawing must invalidate the metatiles drawn with the old one."""
    text = json.dumps([(c.name, c.kind, c.sql) for c in CHANNELS])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class MetatileIndex:
    """The metatiles of one region for one tile geometry: what exists on disk, and their arrays."""

    def __init__(
        self, region: str, grid: MetatileGrid, signature: dict, directory: Path, bbox: tuple[float, float, float, float]
    ):
        self.region = region
        self.grid = grid
        self.signature = signature
        self.directory = directory
        self.entries: dict[str, Metatile] = {}
        self.rendered: tuple[str, ...] = ()  # keys the ensure_metatiles() call that returned this index rendered
        self.render_seconds = 0.0
        self._arrays: dict[str, np.ndarray] = {}
        self.bbox = bbox  # the region's import extent (west, south, east, north): cut locations must be inside

    @property
    def path(self) -> Path:
        return self.directory / "index.json"

    def keys_for(self, lats: np.ndarray, lons: np.ndarray) -> list[str]:
        rows, cols = self.grid.rows_cols(lats, lons)
        return [f"r{r}_c{c}" for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]

    def file(self, key: str) -> Path:
        return self.directory / f"{key}.npy"

    def array(self, key: str) -> np.ndarray:
        """The (H, W, 12) uint8 metatile, memory-mapped (read-only; pages are read as touched)."""
        arr = self._arrays.get(key)
        if arr is None:
            if key not in self.entries:
                raise RenderError(
                    f"metatile {key} of region {self.region!r} has not been rendered; call ensure_metatiles() first"
                )
            arr = np.load(self.file(key), mmap_mode="r")
            meta = self.entries[key]
            if arr.shape != (meta.height, meta.width, N_CHANNELS) or arr.dtype != np.uint8:
                raise RenderError(f"metatile {self.file(key)} is {arr.shape} {arr.dtype}, the index says otherwise")
            self._arrays[key] = arr
        return arr

    def __getstate__(self) -> dict:
        """Pickled (sent to a Dask worker) without its memory maps: the worker re-opens the files it reads."""
        return {**self.__dict__, "_arrays": {}}

    def to_json(self) -> dict:
        return {
            "version": INDEX_VERSION,
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
        "imported_at": record.imported_at.isoformat(),
    }


def _grid() -> MetatileGrid:
    params = load_params()
    max_shift_m = float(params.augment.max_shift_m)
    if not (0.0 <= max_shift_m <= 1000.0):
        raise ConfigError(f"augment.max_shift_m must be in [0, 1000] m, got {max_shift_m}")
    return MetatileGrid(
        radius_m=float(params.render.radius_m),
        size=int(params.render.size),
        core_px=int(tiles_config().metatile_core_px),
        max_shift_m=max_shift_m,
    )


_INDEXES: dict[Path, MetatileIndex] = {}


def load_index(region: str) -> MetatileIndex:
    """The region's index for the current params and import; stale metatiles are removed.

    The same object is returned while the signature holds, so its memory maps (and the pages a
    process has already mapped) and the cutter's caches live on across calls.
    """
    grid, record = _grid(), require_import(region)
    signature = _signature(record, grid)
    directory = metatile_dir(region)
    index = _INDEXES.get(directory)
    if index is None or index.signature != signature or (index.entries and not index.path.is_file()):
        index = _INDEXES[directory] = MetatileIndex(region, grid, signature, directory, record.bbox)
    index.rendered, index.render_seconds = (), 0.0
    if index.path.is_file():
        raw = json.loads(index.path.read_text())
        if raw.get("version") == INDEX_VERSION and raw.get("signature") == signature:
            for key, value in raw["metatiles"].items():  # other processes may have added some
                if key not in index.entries and index.file(key).is_file():
                    index.entries[key] = Metatile(**value)
        else:
            log.info("metatiles of %s were rendered with other params or another import: re-rendering", region)
            for old in directory.glob("*.npy"):
                old.unlink()
            index.path.unlink()
            index = _INDEXES[directory] = MetatileIndex(region, grid, signature, directory, record.bbox)
    return index


# ---------------------------------------------------------------- rendering


class MetatileRenderer:
    """The 12 channel maps at metatile size, parsed once and re-aimed per metatile."""

    def __init__(self, region: str, grid: MetatileGrid, info: ConnInfo | None = None):
        info = info or conninfo()
        px_per_m = 1.0 / grid.mpp
        # A line's round cap or a marker just outside the extent must still be drawn.
        buffer_px = load_params().render.buffer_px + int(math.ceil(MAX_FEATURE_M * px_per_m))
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


_RENDERERS: dict[tuple[str, MetatileGrid, ConnInfo, int], MetatileRenderer] = {}


def _render_one(task: tuple[str, MetatileGrid, str]) -> Metatile:
    """Render and store one metatile (in a pool worker or in-process); the maps are built once per process
    and thread (a renderer's maps and image are not shared between threads: Dask workers may run several)."""
    region, grid, key = task
    info = conninfo()
    slot = (region, grid, info, threading.get_ident())
    renderer = _RENDERERS.get(slot)
    if renderer is None:
        renderer = _RENDERERS[slot] = MetatileRenderer(region, grid, info)
    row, col = (int(v) for v in key[1:].split("_c"))
    meta = grid.metatile(row, col)
    save_npy(metatile_dir(region) / f"{key}.npy", renderer.render(meta))
    return meta


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[multiprocessing.pool.Pool | None]:
    """Mapnik does not scale with threads: one process per core (spawned: the caller may hold torch threads)."""
    if workers <= 1:
        yield None
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield pool


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One process renders a region's metatiles at a time (data-loader workers may race)."""
    directory.mkdir(parents=True, exist_ok=True)
    # The lock lives outside data/metatiles: that directory is a DVC output (and a dependency of
    # training), whose content must change only when metatiles do.
    with file_lock(load_params().root / "data" / ".locks" / f"metatiles-{directory.name}.lock"):
        yield


def check_locations(
    region: str,
    lats: Sequence[float] | np.ndarray,
    lons: Sequence[float] | np.ndarray,
    bbox: Sequence[float] | None = None,
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
    west, south, east, north = bbox if bbox is not None else require_import(region).bbox
    outside = (lats < south) | (lats > north) | (lons < west) | (lons > east)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise RenderError(
            f"{int(outside.sum())} location(s) outside region {region!r} (lat {south:.4f}..{north:.4f}, "
            f"lon {west:.4f}..{east:.4f}), e.g. #{i}: ({lats[i]}, {lons[i]})"
        )
    return lats, lons


def ensure_metatiles(
    region: str, lats: Sequence[float] | np.ndarray, lons: Sequence[float] | np.ndarray, *, progress: bool = True
) -> MetatileIndex:
    """Render the metatiles these locations need that are not on disk yet; return the index."""
    check_region_name(region)
    lats, lons = check_locations(region, lats, lons)
    directory = metatile_dir(region)
    with _locked(directory):
        index = load_index(region)
        needed = sorted(set(index.keys_for(lats, lons)))
        missing = [k for k in needed if k not in index.entries]
        if missing:
            from loc2vec.fanout import render_missing, runner_kind

            started = time.perf_counter()
            kind = runner_kind()
            bar = tqdm(total=len(missing), desc=f"metatiles {region} ({kind})", unit="mt", disable=not progress)

            def done(meta: Metatile) -> None:
                index.entries[meta.key] = meta
                index.save()  # after each one: an interrupted run keeps what it finished
                bar.update()

            with bar:
                if kind == "inline":
                    tasks = [(region, index.grid, key) for key in missing]
                    workers = min(tiles_config().render_processes or os.cpu_count() or 1, len(missing))
                    with _pool(workers) as pool:
                        for meta in pool.imap_unordered(_render_one, tasks) if pool else map(_render_one, tasks):
                            done(meta)
                else:  # one Prefect task per metatile, on the configured task runner
                    render_missing(index, missing, done, kind=kind)
            index.rendered = tuple(missing)
            index.render_seconds = time.perf_counter() - started
            log.info("rendered %d metatiles of %s in %.1f s", len(missing), region, index.render_seconds)
    return index


def clear_metatiles(region: str) -> None:
    """Delete a region's metatiles (they are a cache: everything is re-rendered on demand)."""
    directory = metatile_dir(region)
    _INDEXES.pop(directory, None)
    if directory.is_dir():
        shutil.rmtree(directory)
