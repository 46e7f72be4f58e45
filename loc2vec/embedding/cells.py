"""Which H3 cells a region's embedding covers: cells whose centre is on mapped land, tile inside the data.

The H3 cells (``embed.h3_resolution``, default 11: ~29 m edge, so a cell is far smaller than a 200 m
tile) whose centres lie inside the import bbox shrunk by ``render.radius_m`` (so every tile lies inside
the data) and on *mapped land* (sampling/land.py). Liechtenstein at resolution 11: 145,625 candidates,
89,492 on mapped land.
"""

from __future__ import annotations

import logging

import h3
import numpy as np

from loc2vec.core.config import EmbedConfig
from loc2vec.core.errors import Loc2VecError
from loc2vec.core.geo import inner_bbox, to_mercator
from loc2vec.osm.db import ConnInfo, cursor, require_import
from loc2vec.sampling.land import mapped_land_query

log = logging.getLogger(__name__)
SQL_CHUNK = 50_000  # points per PostGIS query


class EmbedError(Loc2VecError, RuntimeError):
    """Embedding cannot run: no champion model, no cells, or a model that does not match its weights."""


def candidate_cells(bbox: tuple[float, float, float, float], resolution: int) -> list[str]:
    """H3 cells whose centres lie inside the bbox (west, south, east, north), sorted."""
    west, south, east, north = bbox
    poly = h3.LatLngPoly([(south, west), (south, east), (north, east), (north, west)])
    return sorted(h3.polygon_to_cells(poly, resolution))


def cell_centres(cells: list[str]) -> tuple[np.ndarray, np.ndarray]:
    latlng = np.array([h3.cell_to_latlng(c) for c in cells], dtype=np.float64).reshape(-1, 2)
    return latlng[:, 0], latlng[:, 1]


def on_mapped_land(region: str, lats: np.ndarray, lons: np.ndarray, radius_m: float, info: ConnInfo) -> np.ndarray:
    """Mask: the point lies in a land polygon or within radius/2 of the network (sampling's rule)."""
    query = mapped_land_query(region)
    mask = np.zeros(len(lats), dtype=bool)
    with cursor(info) as cur:
        for c0 in range(0, len(lats), SQL_CHUNK):
            la, lo = lats[c0 : c0 + SQL_CHUNK], lons[c0 : c0 + SQL_CHUNK]
            x, y = to_mercator(lo, la)
            d = 0.5 * radius_m / np.cos(np.radians(la))  # radius/2 in Mercator units
            cur.execute(query, (x.tolist(), y.tolist(), d.tolist()))
            mask[[c0 + r[0] - 1 for r in cur.fetchall()]] = True
    return mask


def select_cells(
    region: str, cfg: EmbedConfig, radius_m: float, info: ConnInfo
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The H3 cells to embed (on mapped land, tile inside the data) and their centres.

    The metatiles stage renders for these too, so embedding never writes into its output.
    """
    radius = float(radius_m)
    record = require_import(region, info)
    cells = candidate_cells(inner_bbox(record.bbox, radius), cfg.h3_resolution)
    if len(cells) > cfg.max_cells:
        raise EmbedError(
            f"{region}: {len(cells):,} H3 cells at resolution {cfg.h3_resolution} exceed embed.max_cells="
            f"{cfg.max_cells:,}; use a coarser embed.h3_resolution (each step down is 7× fewer cells)"
        )
    lats, lons = cell_centres(cells)
    keep = on_mapped_land(region, lats, lons, radius, info)
    cells = [c for c, k in zip(cells, keep, strict=True) if k]
    if not cells:
        raise EmbedError(f"{region}: no H3 cell centre at resolution {cfg.h3_resolution} lies on mapped land")
    log.info("%s: %d of %d H3 cells (res %d) on mapped land", region, len(cells), len(keep), cfg.h3_resolution)
    return cells, lats[keep], lons[keep]
