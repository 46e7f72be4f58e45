"""Which H3 cells a region's embedding covers: cells on mapped land, drawn from the land, tile inside the data.

The H3 cells (``embed.h3_resolution``, default 11: ~29 m edge, so a cell is far smaller than a 200 m tile)
whose centres lie inside the import bbox shrunk by ``render.radius_m`` (so every tile lies inside the data)
and on *mapped land* (sampling/land.py). Candidates come from the land (the land side of the extract's
coastline, osm/coast.py) and the water within the tile radius of it (harbours, piers: mapped land may reach
that far), so the cost follows the land, not the bounding box, and ``embed.max_cells`` is checked on them;
a cell whose tile would not reach the land is never a candidate. Where the sea does not reach into the box
(an inland region) the candidates are the box's cells, exactly as before coasts: Liechtenstein at
resolution 11 has 145,625 candidates, 89,492 on mapped land.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import h3
import numpy as np

from loc2vec.core.config import EmbedConfig
from loc2vec.core.errors import Loc2VecError
from loc2vec.core.geo import inner_bbox, to_mercator
from loc2vec.core.pools import worker_count
from loc2vec.osm.db import ConnInfo, cursor, require_import
from loc2vec.sampling.land import land_shapes, mapped_land_query, sea_reaches

log = logging.getLogger(__name__)
SQL_CHUNK = 50_000  # points per PostGIS query


class EmbedError(Loc2VecError, RuntimeError):
    """Embedding cannot run: no champion model, no cells, or a model that does not match its weights."""


def candidate_cells(bbox: tuple[float, float, float, float], resolution: int) -> list[str]:
    """H3 cells whose centres lie inside the bbox (west, south, east, north), sorted."""
    west, south, east, north = bbox
    poly = h3.LatLngPoly([(south, west), (south, east), (north, east), (north, west)])
    return sorted(h3.polygon_to_cells(poly, resolution))


def land_cells(
    region: str,
    bbox: tuple[float, float, float, float],
    resolution: int,
    margin_m: float,
    max_cells: int,
    info: ConnInfo,
) -> list[str]:
    """H3 cells whose centres lie on the land or within margin_m of it, inside the bbox, sorted.

    Raises EmbedError, before enumerating them, when the land holds clearly more than max_cells.
    """
    if not sea_reaches(region, bbox, info):
        cells = candidate_cells(bbox, resolution)
    else:
        shapes, km2 = land_shapes(region, bbox, margin_m, info)
        estimate = km2 / h3.average_hexagon_area(resolution, "km^2")
        if estimate > 1.2 * max_cells:
            raise EmbedError(_too_many(region, f"about {estimate:,.0f}", resolution, max_cells))
        found: set[str] = set()
        for shape in shapes:
            found.update(h3.geo_to_cells(shape, resolution))
        cells = sorted(found)
    if len(cells) > max_cells:
        raise EmbedError(_too_many(region, f"{len(cells):,}", resolution, max_cells))
    return cells


def _too_many(region: str, count: str, resolution: int, max_cells: int) -> str:
    return (
        f"{region}: {count} H3 cells at resolution {resolution} exceed embed.max_cells={max_cells:,}; "
        "use a coarser embed.h3_resolution (each step down is 7× fewer cells)"
    )


def cell_centres(cells: list[str]) -> tuple[np.ndarray, np.ndarray]:
    latlng = np.array([h3.cell_to_latlng(c) for c in cells], dtype=np.float64).reshape(-1, 2)
    return latlng[:, 0], latlng[:, 1]


def on_mapped_land(
    region: str, lats: np.ndarray, lons: np.ndarray, radius_m: float, info: ConnInfo, connections: int = 0
) -> np.ndarray:
    """Mask: the point's tile reaches the land, and it lies in a land polygon or within radius/2 of the network.

    The points go in chunks over `connections` database sessions at once (0: one per core): one session runs
    one query on one core, and Liechtenstein's 145,625 candidates kept one core busy for ~20 s.
    """
    query = mapped_land_query(region)
    mask = np.zeros(len(lats), dtype=bool)
    n = len(lats)
    sessions = worker_count(connections)
    chunk = max(1, min(SQL_CHUNK, -(-n // sessions)))
    starts = list(range(0, n, chunk))

    def found(c0: int) -> list[int]:
        la, lo = lats[c0 : c0 + chunk], lons[c0 : c0 + chunk]
        x, y = to_mercator(lo, la)
        d = 0.5 * radius_m / np.cos(np.radians(la))  # radius/2 in Mercator units
        with cursor(info) as cur:
            cur.execute(query, (x.tolist(), y.tolist(), d.tolist()))
            return [c0 + r[0] - 1 for r in cur.fetchall()]

    with ThreadPoolExecutor(max_workers=worker_count(connections, len(starts))) as pool:
        for rows in pool.map(found, starts):
            mask[rows] = True
    return mask


def select_cells(
    region: str, cfg: EmbedConfig, radius_m: float, info: ConnInfo
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The H3 cells to embed (on mapped land, tile inside the data) and their centres.

    The metatiles stage renders for these too, so embedding never writes into its output.
    """
    radius = float(radius_m)
    record = require_import(region, info)
    cells = land_cells(region, inner_bbox(record.bbox, radius), cfg.h3_resolution, radius, cfg.max_cells, info)
    if not cells:
        raise EmbedError(f"{region}: no H3 cell centre at resolution {cfg.h3_resolution} lies on the land")
    lats, lons = cell_centres(cells)
    keep = on_mapped_land(region, lats, lons, radius, info)
    cells = [c for c, k in zip(cells, keep, strict=True) if k]
    if not cells:
        raise EmbedError(f"{region}: no H3 cell centre at resolution {cfg.h3_resolution} lies on mapped land")
    log.info("%s: %d of %d H3 cells (res %d) on mapped land", region, len(cells), len(keep), cfg.h3_resolution)
    return cells, lats[keep], lons[keep]


def embedded_mask(region: str, cells: list[str], resolution: int, radius_m: float, info: ConnInfo) -> np.ndarray:
    """Which of `cells` `select_cells` embeds at this resolution (the same rule, asked of these cells only): what the
    feature store serves for a region embedded with these settings, known without reading the store."""
    radius = float(radius_m)
    record = require_import(region, info)
    candidates = set(land_cells(region, inner_bbox(record.bbox, radius), resolution, radius, 2**62, info))
    mask = np.asarray([c in candidates for c in cells], dtype=bool)
    if mask.any():
        lats, lons = cell_centres([c for c, m in zip(cells, mask, strict=True) if m])
        mask[mask] = on_mapped_land(region, lats, lons, radius, info)
    return mask
