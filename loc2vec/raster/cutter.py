"""Cut rotated and shifted tiles out of metatiles: batched nearest-neighbour gathers in torch.

The semantics are those of `render.render_tile` exactly: the tile centre is the location
moved shift_m = (east, north) true metres (×1/cos φ in Mercator), the window is
2·radius_m true metres wide at the location's own 1/cos φ, the content is rotated CCW by
angle_deg about that centre, and pixel (i, j) samples the point under its centre
(j + ½, i + ½), as Mapnik's anti-aliased coverage does. For output pixel offsets
(du, dv) = (j + ½ − S/2, i + ½ − S/2) (screen axes, y down) the source point is the
inverse rotation (du·cos a − dv·sin a, du·sin a + dv·cos a), scaled by
k(location)/k(metatile row) metatile px per tile px (see raster/metatiles.py).

Why a gather, not grid_sample: the metatile is channels-last uint8, so one int64 index
per output pixel copies 12 contiguous bytes; no float conversion of the metatile, no
per-channel passes (shared/STACK-NOTES.md: ~8× faster than grid_sample on CPU, ~3× faster
than per-channel gathers). Nearest neighbour keeps a cut equal to a direct render up to
anti-aliasing at edges (mean IoU 0.94 of 1-px-dilated masks in tests/test_fastpath.py).
The index arithmetic is one float32 add per axis, so CPU and CUDA pick the same pixels.

The result is (B, 12, S, S) uint8 in torch.channels_last memory format: that *is* the
gathered (B, S, S, 12) memory, so no transposing copy (which would cost as much as the
gather). Conv layers take channels_last natively; call `.contiguous()` if you need NCHW.
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from loc2vec.core.geo import EARTH_RADIUS_M
from loc2vec.raster.channels import N_CHANNELS
from loc2vec.raster.metatiles import MetatileIndex, check_locations
from loc2vec.raster.render import RenderError

ArrayLike = Sequence[float] | np.ndarray | torch.Tensor


def default_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present (and not overridden), else CPU."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class _SourceCache:
    """Metatiles as flat (H·W, 12) uint8 tensors: on CPU zero-copy views of the index's decompressed arrays
    (its own LRU, raster/metatiles.py) or, when that is full, of a full-size array holding only the batch's
    window (the same pixels where tiles sample: the same tiles); an LRU on accelerators."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._lock = threading.Lock()  # prefetch threads may cut concurrently
        self._dev: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    def get(self, index: MetatileIndex, key: str, device: torch.device, windows: list[Window]) -> torch.Tensor:
        with self._lock:
            return self._get(index, key, device, windows)

    def _get(self, index: MetatileIndex, key: str, device: torch.device, windows: list[Window]) -> torch.Tensor:
        if device.type != "cpu":
            slot = (key, str(device))
            dev = self._dev.get(slot)
            if dev is not None:
                self._dev.move_to_end(slot)
                return dev
            array = index.array(key)  # whole: it is kept on the device
        else:
            array = index.cached(key)
            if array is None:  # decompress it whole while it fits in memory, else only the batch's window
                array = index.array(key) if index.has_room() else index.windows(key, windows)
        with warnings.catch_warnings():  # read-only: we never write through it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            cpu = torch.from_numpy(array).view(-1, N_CHANNELS)
        if device.type == "cpu":
            return cpu
        dev = cpu.to(device)
        self._dev[slot] = dev
        while len(self._dev) > 1 and sum(t.numel() for t in self._dev.values()) > self.budget:
            self._dev.popitem(last=False)
        return dev


_CACHES: weakref.WeakKeyDictionary[MetatileIndex, _SourceCache] = weakref.WeakKeyDictionary()


def _cache(index: MetatileIndex) -> _SourceCache:
    cache = _CACHES.get(index)
    if cache is None:
        cache = _CACHES[index] = _SourceCache(index.spec.device_cache_mb << 20)
    return cache


def _as_f64(name: str, values: ArrayLike, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    out = np.asarray(values, dtype=np.float64)
    if shape is None and out.ndim == 0:
        out = out.reshape(1)
    if (shape is None and out.ndim != 1) or (shape is not None and out.shape != shape):
        raise RenderError(f"{name} must have shape {shape or '(B,)'}, got {out.shape}")
    if not np.isfinite(out).all():
        raise RenderError(f"{name} must be finite")
    return out


def tile_affines(
    lats: np.ndarray,
    lons: np.ndarray,
    angles_deg: np.ndarray,
    shifts_m: np.ndarray,
    size: int,
    minx: np.ndarray,
    maxy: np.ndarray,
    units_per_px: np.ndarray,
    mpp: float,
) -> np.ndarray:
    """(n, 6) float64 [c0, cj, ci, r0, rj, ri]: metatile px col = c0 + cj·j + ci·i, row = r0 + rj·j + ri·i
    (continuous coordinates, pixel p spans [p, p+1)) of tile pixel (i, j)'s centre, for each tile's
    metatile (minx, maxy: its top-left corner in EPSG:3857; units_per_px: Mercator units per px)."""
    phi = np.radians(lats)
    k = 1.0 / np.cos(phi)  # Mercator units per true metre at the location, as render_tile uses
    mx = EARTH_RADIUS_M * np.radians(lons) + shifts_m[:, 0] * k
    my = EARTH_RADIUS_M * np.log(np.tan(np.pi / 4 + phi / 2)) + shifts_m[:, 1] * k
    u0, v0 = (mx - minx) / units_per_px, (maxy - my) / units_per_px
    q = k * mpp / units_per_px  # metatile px per tile px: k(location) / k(metatile row)
    a = np.radians(angles_deg)
    ca, sa = q * np.cos(a), q * np.sin(a)
    off = 0.5 - size / 2.0  # pixel 0's centre relative to the tile centre
    return np.stack([u0 + (ca - sa) * off, ca, -sa, v0 + (sa + ca) * off, sa, ca], axis=1)


def _check_inside(aff: np.ndarray, size: int, width: int, height: int) -> None:
    """Every sample must lie in its metatile. The margin guarantees it for shifts ≤ max_shift_m; this also
    makes truncation toward zero a floor (coordinates ≥ 0). The extremes of an affine grid are its corners."""
    corners = np.array([0.0, size - 1.0])
    jj, ii = (g.ravel() for g in np.meshgrid(corners, corners))
    col = aff[:, :1] + aff[:, 1:2] * jj + aff[:, 2:3] * ii
    row = aff[:, 3:4] + aff[:, 4:5] * jj + aff[:, 5:6] * ii
    bad = (col.min(1) < 0) | (row.min(1) < 0) | (col.max(1) >= width - 1e-3) | (row.max(1) >= height - 1e-3)
    if bad.any():
        raise RenderError(f"tiles {np.flatnonzero(bad)[:5].tolist()} fall outside their metatile: is the index stale?")


Window = tuple[tuple[int, int], tuple[int, int]]  # rows [lo, hi), cols [lo, hi)


def _windows(aff: np.ndarray, size: int, which: np.ndarray, n: int) -> list[list[Window]]:
    """Per metatile, the pixel windows its tiles sample (from the corners of their affine grids, one pixel of
    slack each way): each tile's own, or their union when that is smaller than their sum. All a batch needs
    of a metatile not held whole."""
    corners = np.array([0.0, size - 1.0])
    jj, ii = (g.ravel() for g in np.meshgrid(corners, corners))
    col = aff[:, :1] + aff[:, 1:2] * jj + aff[:, 2:3] * ii
    row = aff[:, 3:4] + aff[:, 4:5] * jj + aff[:, 5:6] * ii
    r0, r1 = np.floor(row.min(1)).astype(int) - 1, np.floor(row.max(1)).astype(int) + 2
    c0, c1 = np.floor(col.min(1)).astype(int) - 1, np.floor(col.max(1)).astype(int) + 2
    out: list[list[Window]] = []
    for k in range(n):
        t = np.flatnonzero(which == k)
        union = ((int(r0[t].min()), int(r1[t].max())), (int(c0[t].min()), int(c1[t].max())))
        own = [((int(r0[i]), int(r1[i])), (int(c0[i]), int(c1[i]))) for i in t]
        area = sum((r[1] - r[0]) * (c[1] - c[0]) for r, c in own)
        out.append(own if area < (union[0][1] - union[0][0]) * (union[1][1] - union[1][0]) else [union])
    return out


class _Workspace:
    """Reused index buffers for `chunk` tiles: no page faults from fresh allocations per call (on a VM
    they cost as much as the gather itself), and small enough to stay in cache."""

    def __init__(self, chunk: int, size: int, device: torch.device):
        self.chunk = chunk
        self.col = torch.empty((chunk, size, size), dtype=torch.float32, device=device)
        self.row = torch.empty((chunk, size, size), dtype=torch.float32, device=device)
        self.col_i = torch.empty((chunk, size, size), dtype=torch.int64, device=device)
        self.idx = torch.empty((chunk, size, size), dtype=torch.int64, device=device)

    def flat_indices(self, terms: tuple[torch.Tensor, ...], t0: int, t1: int, width: int) -> torch.Tensor:
        """((t1−t0)·S·S,) int64 row-major metatile pixel indices of tiles t0..t1−1 (at most `chunk`)."""
        col_j, col_i, row_j, row_i = (t[t0:t1] for t in terms)
        n, size = t1 - t0, col_j.shape[1]
        col, row, col_int, idx = self.col[:n], self.row[:n], self.col_i[:n], self.idx[:n]
        torch.add(col_j.view(n, 1, size), col_i.view(n, size, 1), out=col)
        torch.add(row_j.view(n, 1, size), row_i.view(n, size, 1), out=row)
        col_int.copy_(col)  # float → int truncates toward zero = floor, as every coordinate is ≥ 0
        idx.copy_(row)
        return idx.mul_(width).add_(col_int).view(-1)


def _axis_terms(aff: np.ndarray, size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(B, S) float32 each: col = c0 + cj·j (along a row) + ci·i (along a column), same for row. In numpy
    float64 (exact sums, and no OpenMP team for a (B, S) op; see GATHER_ROWS)."""
    s = np.arange(size, dtype=np.float64)
    terms = (aff[:, 0:1] + aff[:, 1:2] * s, aff[:, 2:3] * s, aff[:, 3:4] + aff[:, 4:5] * s, aff[:, 5:6] * s)
    return tuple(torch.from_numpy(t.astype(np.float32)).to(device) for t in terms)


_LOCAL = threading.local()
CUDA_CHUNK = 512  # tiles per batched index computation on an accelerator
# ATen runs an op in the calling thread below its grain (32768 elements; index_select: 32768 / 12 rows).
# One tile's index ops (S² = 16384) and gathers of GATHER_ROWS rows stay below it, so no OpenMP team is
# formed: OpenMP barriers spin, and with a model training on the same cores they wasted >90% of the time
# (measured: 90 tiles/s with 2 OpenMP threads vs 3,400 tiles/s with serial ops while a training ran).
GATHER_ROWS = 2048  # < 32768 / 12


def _workspace(chunk: int, size: int, device: torch.device) -> _Workspace:
    spaces = _LOCAL.__dict__.setdefault("spaces", {})
    slot = (chunk, size, str(device))
    if slot not in spaces:
        spaces[slot] = _Workspace(chunk, size, device)
    return spaces[slot]


_EXECUTORS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _executor(threads: int) -> ThreadPoolExecutor:
    """One pool per process (a forked data-loader worker must not reuse its parent's dead threads)."""
    slot = (os.getpid(), threads)
    if slot not in _EXECUTORS:
        _EXECUTORS[slot] = ThreadPoolExecutor(threads, thread_name_prefix="loc2vec-cut")
    return _EXECUTORS[slot]


def _gather_cpu(
    sources: list[torch.Tensor], which: np.ndarray, terms: tuple, flat_out: torch.Tensor, width: int
) -> None:
    """Tile by tile with serial ATen ops; the parallelism is ours: contiguous shares of the batch per thread."""
    b, pixels = flat_out.shape[:2]

    def work(t0: int, t1: int) -> None:
        ws = _workspace(1, terms[0].shape[1], torch.device("cpu"))
        for t in range(t0, t1):
            idx, src, dst = ws.flat_indices(terms, t, t + 1, width), sources[which[t]], flat_out[t]
            for p in range(0, pixels, GATHER_ROWS):
                torch.index_select(src, 0, idx[p : p + GATHER_ROWS], out=dst[p : p + GATHER_ROWS])

    threads = max(1, min(torch.get_num_threads(), b // 4))
    if threads == 1:
        work(0, b)
        return
    edges = np.linspace(0, b, threads + 1).astype(int)
    for future in [
        _executor(threads).submit(work, int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)
    ]:
        future.result()


def _gather_batched(
    sources: list[torch.Tensor], which: np.ndarray, terms: tuple, flat_out: torch.Tensor, width: int
) -> None:
    """On an accelerator: indices for CUDA_CHUNK tiles per kernel, one gather per run of a metatile."""
    b, chunk = flat_out.shape[0], CUDA_CHUNK if flat_out.is_cuda else 16
    ws = _workspace(chunk, terms[0].shape[1], flat_out.device)
    for c0 in range(0, b, chunk):
        c1 = min(b, c0 + chunk)
        idx = ws.flat_indices(terms, c0, c1, width).view(c1 - c0, -1)
        for r0, r1 in _runs(which[c0:c1]):
            dst = flat_out[c0 + r0 : c0 + r1].view(-1, N_CHANNELS)
            torch.index_select(sources[which[c0 + r0]], 0, idx[r0:r1].view(-1), out=dst)


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of the maximal runs of equal consecutive values."""
    cuts = np.flatnonzero(values[1:] != values[:-1]) + 1
    edges = [0, *cuts.tolist(), len(values)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def cut_tiles(
    index: MetatileIndex,
    lats: ArrayLike,
    lons: ArrayLike,
    angles_deg: ArrayLike,
    shifts_m: ArrayLike,
    device: str | torch.device | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, 12, S, S) uint8 tiles (channels_last memory) cut from the index's metatiles.

    angles_deg: (B,) CCW rotation; shifts_m: (B, 2) (east, north) metres, each |·| ≤ augment.max_shift_m.
    device: CUDA when available unless given. out: optionally a previous result (same B and device) to
    fill again: a fresh 25–80 MB batch costs page faults on first touch, about as much as the gather on
    a VM, so a training loop can keep a few buffers.

    Every metatile has the same size, so one affine per tile (to its own metatile) is all the index
    computation needs. On CPU, tiles are shared over torch.get_num_threads() threads, each tile gathered
    straight into the output; on an accelerator, indices are computed for many tiles per kernel and
    each run of consecutive tiles from one metatile is one gather.
    """
    device = default_device(device)
    lats_np, lons_np = check_locations(index.region, _as_f64("lats", lats), _as_f64("lons", lons), index.bbox)
    b = lats_np.shape[0]
    angles = _as_f64("angles_deg", angles_deg, (b,))
    shifts = _as_f64("shifts_m", shifts_m, (b, 2))
    limit = index.grid.max_shift_m
    if (np.abs(shifts) > limit + 1e-9).any():
        raise RenderError(
            f"shifts must be within ±{limit:g} m per axis (augment.max_shift_m), got {np.abs(shifts).max():g}"
        )

    size, side = index.grid.size, index.grid.side_px
    if out is None:
        out = torch.empty((b, size, size, N_CHANNELS), dtype=torch.uint8, device=device)
    else:
        if out.shape != (b, N_CHANNELS, size, size) or out.dtype != torch.uint8 or out.device != device:
            raise RenderError(f"out must be a ({b}, {N_CHANNELS}, {size}, {size}) uint8 tensor on {device}")
        out = out.permute(0, 2, 3, 1)
        if not out.is_contiguous():
            raise RenderError("out must be in channels_last memory format (as cut_tiles returns it)")
    if b == 0:
        return out.permute(0, 3, 1, 2)
    keys, inverse = np.unique(np.asarray(index.keys_for(lats_np, lons_np)), return_inverse=True)
    metas = []
    for i, key in enumerate(keys.tolist()):
        meta = index.entries.get(key)
        if meta is None:
            j = int(np.flatnonzero(inverse == i)[0])
            raise RenderError(
                f"location ({lats_np[j]}, {lons_np[j]}) needs metatile {key} of region {index.region!r}, "
                "which is not rendered: call ensure_metatiles() with these locations first"
            )
        metas.append(meta)
    minx, maxy, upx = (np.array([getattr(m, f) for m in metas])[inverse] for f in ("minx", "maxy", "units_per_px"))
    aff = tile_affines(lats_np, lons_np, angles, shifts, size, minx, maxy, upx, index.grid.mpp)
    _check_inside(aff, size, side, side)

    cache = _cache(index)
    windows = _windows(aff, size, inverse, len(keys))
    sources = [cache.get(index, key, device, windows[i]) for i, key in enumerate(keys.tolist())]
    terms = _axis_terms(aff, size, device)
    gather = _gather_cpu if device.type == "cpu" else _gather_batched
    gather(sources, inverse, terms, out.view(b, size * size, N_CHANNELS), side)
    return out.permute(0, 3, 1, 2)


def cut_one(index: MetatileIndex, lat: float, lon: float, angle_deg: float = 0.0, shift_m=(0.0, 0.0)) -> np.ndarray:
    """One (12, S, S) uint8 tile as numpy, like render_tile (for comparisons and previews)."""
    tile = cut_tiles(index, [lat], [lon], [angle_deg], [shift_m], device="cpu")[0]
    return np.ascontiguousarray(tile.numpy())
