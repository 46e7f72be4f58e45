"""The metatile grid: which metatile holds a location, and its bounds — pure arithmetic, no I/O.

Rows are bands of constant *true* height: row = ⌊R·φ / (C·mpp)⌋, φ in radians, C the core side in px,
mpp = 2·radius_m/size the tiles' metres per pixel. Each row has one Mercator scale k = 1/cos(φ_mid) of
its mid latitude, so a core is C×C px at the tiles' mpp wherever on Earth. Columns split the row's
Mercator x in cells of C·mpp·k units. A metatile is its core plus a margin of M px on every side, M
covering the farthest pixel of any tile whose location lies in the core (see raster/metatiles.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from loc2vec.core.config import AugmentConfig, RenderConfig, TilesConfig
from loc2vec.core.geo import EARTH_RADIUS_M

SLACK_PX = 2  # nearest-neighbour rounding (1 px) + Mercator-scale drift (< 0.1 px), with room to spare


@dataclass(frozen=True)
class MetatileGrid:
    radius_m: float
    size: int
    core_px: int
    max_shift_m: float

    @classmethod
    def from_config(cls, render: RenderConfig, augment: AugmentConfig, tiles: TilesConfig) -> MetatileGrid:
        """The grid for params' tile geometry, largest shift (the margin) and core size."""
        return cls(
            radius_m=float(render.radius_m),
            size=int(render.size),
            core_px=int(tiles.metatile_core_px),
            max_shift_m=float(augment.max_shift_m),
        )

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
