"""A label's masked scene: everything a featureset may see of a point, with the label's own object hidden.

One scene per label point: the 12-channel tile rendered by Mapnik at the point with the object left out
of the channel queries (raster.render.HiddenObject), the channel histogram of that same tile, the tag
counts of the tile disc without the object, and the distances to the nearest way of each transport
mode without it. Every leak-free featureset (evaluation/suite.py) is computed from these, so no input
holds the label's object. Points without a hidden object (``hidden_id`` 0, the consumer tasks) get the
plain scene.

Tiles are rendered and consumed in batches (`scene_tiles`): 2,000 tiles of 12 × 128 × 128 bytes would
be 400 MB held at once for nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from psycopg2 import sql

from loc2vec.core.config import RenderConfig
from loc2vec.core.geo import to_mercator
from loc2vec.core.names import validate_region_name
from loc2vec.evaluation.featuresets import EXTRA_LINES, LAND_COVER, POI_COLUMNS, TAG_COLUMNS
from loc2vec.evaluation.labels import TRANSPORT_MODES, VENUE_GROUPS
from loc2vec.evaluation.leakfree import KEEP_TAG_COUNTS, hidden_object
from loc2vec.osm.db import ConnInfo, cursor
from loc2vec.raster.render import HiddenObject, get_renderer

TileFn = Callable[[np.ndarray], np.ndarray]  # (b, 12, size, size) uint8 tiles → (b, d) features
NEAREST_WAY_COLUMNS: tuple[str, ...] = tuple(f"nearest_{m}" for m in TRANSPORT_MODES)


def hidden_of(points: pd.DataFrame) -> list[HiddenObject | None]:
    """Each point's hidden object (None where `hidden_id` is 0 or absent)."""
    if "hidden_id" not in points:
        return [None] * len(points)
    return [
        hidden_object(str(task), str(table), int(i)) if int(i) != 0 else None
        for task, table, i in zip(points["task"], points["hidden_table"], points["hidden_id"], strict=True)
    ]


def _hidden_ids(points: pd.DataFrame) -> tuple[list[int], list[int], list[str]]:
    """Per point: the node id hidden from planet_osm_point, the id hidden from line/polygon (0 = none), and
    the tag-count columns that still count the hidden object (comma-joined)."""
    nodes, ways, keep = [], [], []
    for obj, task in zip(hidden_of(points), points.get("task", pd.Series([""] * len(points))), strict=True):
        nodes.append(obj.osm_id if obj is not None and obj.table == "point" else 0)
        ways.append(obj.osm_id if obj is not None and obj.table == "way" else 0)
        keep.append(",".join(KEEP_TAG_COUNTS.get(str(task), ())) if obj is not None else "")
    return nodes, ways, keep


def scene_tiles(
    region: str, points: pd.DataFrame, render: RenderConfig, info: ConnInfo, batch_size: int
) -> Iterator[np.ndarray]:
    """Batches of (b, 12, size, size) uint8 tiles at the region's points (angle 0), each without its hidden object."""
    renderer = get_renderer(validate_region_name(region), render, info, maskable=True)
    hidden = hidden_of(points)
    lats, lons = points["lat"].to_numpy(float), points["lon"].to_numpy(float)
    for b0 in range(0, len(points), batch_size):
        b1 = min(len(points), b0 + batch_size)
        yield np.stack([renderer.render(lats[i], lons[i], hidden=hidden[i]) for i in range(b0, b1)])


def tile_features(
    points: pd.DataFrame,
    fns: Mapping[str, TileFn],
    render: RenderConfig,
    info: ConnInfo,
    batch_size: int,
    seconds: dict[str, float] | None = None,
    sink: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> dict[str, np.ndarray]:
    """{name: (n, d)} of each tile function over the points' masked tiles (rendered once, in batches).

    Args:
        points: label points of one or more regions (lat, lon, region, task, hidden_table, hidden_id).
        fns: name → function of a batch of uint8 tiles.
        render: the tile geometry (params render: what the encoder was trained on).
        info: the database.
        batch_size: tiles per batch.
        seconds: if given, adds the seconds spent rendering (``render``) and in each function (by name).
        sink: if given, called with each batch's row indices and tiles (the suite's tile cache keeps them).

    Returns:
        Row-aligned feature arrays.
    """
    points = points.reset_index(drop=True)
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in fns}
    clock = seconds if seconds is not None else {}
    for region, group in points.groupby("region", sort=True):
        rows = group.index.to_numpy()
        start = 0
        batches = scene_tiles(str(region), group, render, info, batch_size)
        while True:
            t0 = time.perf_counter()
            tiles = next(batches, None)
            clock["render"] = clock.get("render", 0.0) + time.perf_counter() - t0
            if tiles is None:
                break
            sel = rows[start : start + len(tiles)]
            start += len(tiles)
            if sink is not None:
                sink(sel, tiles)
            for name, fn in fns.items():
                t0 = time.perf_counter()
                parts[name].append((sel, np.asarray(fn(tiles), dtype=float).reshape(len(tiles), -1)))
                clock[name] = clock.get(name, 0.0) + time.perf_counter() - t0
    out = {}
    for name, chunks in parts.items():
        dim = chunks[0][1].shape[1] if chunks else 1
        arr = np.full((len(points), dim), np.nan)
        for sel, values in chunks:
            arr[sel] = values
        out[name] = arr
    return out


def histogram(tiles: np.ndarray) -> np.ndarray:
    """(b, 12) fraction of non-zero pixels per channel: embed's `histogram`, of the masked tile."""
    return (np.asarray(tiles) != 0).mean(axis=(2, 3))


def _counts(filters: Mapping[str, str], extra: str = "") -> sql.Composable:
    return sql.SQL(", ").join(
        sql.SQL("count(*) FILTER (WHERE ({}){})").format(sql.SQL(w), sql.SQL(extra)) for w in filters.values()
    )


def _area_counts() -> sql.Composable:
    """Land-cover counts; the hidden polygon is left out except from the columns its task keeps."""
    return sql.SQL(", ").join(
        sql.SQL("count(*) FILTER (WHERE ({}) AND (osm_id <> p.wid OR {} = ANY(string_to_array(p.keep, ','))))").format(
            sql.SQL(w), sql.Literal(f"area_{name}")
        )
        for name, w in LAND_COVER.items()
    )


def _unnest(points: pd.DataFrame, radius_m: float) -> tuple[list, ...]:
    lat, lon = points["lat"].to_numpy(float), points["lon"].to_numpy(float)
    x, y = to_mercator(lon, lat)
    d = radius_m / np.cos(np.radians(lat))  # true metres → Mercator units
    nodes, ways, keep = _hidden_ids(points)
    return x.tolist(), y.tolist(), d.tolist(), nodes, ways, keep


_POINTS = """unnest(%s::float8[], %s::float8[], %s::float8[], %s::int8[], %s::int8[], %s::text[]) WITH ORDINALITY
               AS p(x, y, d, nid, wid, keep, i)
             CROSS JOIN LATERAL (SELECT ST_SetSRID(ST_MakePoint(p.x, p.y), 3857) AS pt) c"""


def scene_tag_counts(points: pd.DataFrame, info: ConnInfo, radius_m: float) -> np.ndarray:
    """(n, len(TAG_COLUMNS)) raw counts of tagged objects intersecting each point's tile disc, hidden object out.

    The columns are featuresets.TAG_COLUMNS (ways per transport mode, POIs per venue group, polygons
    per land cover); no column counts building types (`area_building` counts footprints).
    """
    out = np.full((len(points), len(TAG_COLUMNS)), np.nan)
    points = points.reset_index(drop=True)
    for region, group in points.groupby("region", sort=True):
        query = sql.SQL(
            """SELECT l.*, q.*, g.* FROM """
            + _POINTS
            + """
               CROSS JOIN LATERAL (SELECT {lines} FROM {s}.planet_osm_line
                                   WHERE osm_id > 0 AND osm_id <> p.wid AND ST_DWithin(way, c.pt, p.d)) l
               CROSS JOIN LATERAL (SELECT {pois} FROM (
                      SELECT {cols} FROM {s}.planet_osm_point WHERE osm_id <> p.nid AND ST_DWithin(way, c.pt, p.d)
                      UNION ALL
                      SELECT {cols} FROM {s}.planet_osm_polygon WHERE osm_id <> p.wid AND ST_DWithin(way, c.pt, p.d)
                   ) o) q
               CROSS JOIN LATERAL (SELECT {areas} FROM {s}.planet_osm_polygon WHERE ST_DWithin(way, c.pt, p.d)) g
               ORDER BY p.i"""
        ).format(
            s=sql.Identifier(validate_region_name(str(region))),
            lines=_counts({**TRANSPORT_MODES, **EXTRA_LINES}),
            pois=_counts(VENUE_GROUPS),
            areas=_area_counts(),
            cols=sql.SQL(POI_COLUMNS),
        )
        with cursor(info) as cur:
            cur.execute(query, _unnest(group, radius_m))
            counts = np.asarray(cur.fetchall(), dtype=float).reshape(len(group), len(TAG_COLUMNS))
        out[group.index.to_numpy()] = counts
    return out


def nearest_way(
    points: pd.DataFrame, info: ConnInfo, radius_m: float, modes: Sequence[str] = tuple(TRANSPORT_MODES)
) -> np.ndarray:
    """(n, len(modes)) true distance from each point to the nearest way of each mode, hidden way out,
    capped at the tile radius and divided by it (1 = none within the tile): an engineer's first
    feature for matching a GPS fix to a transport mode."""
    out = np.full((len(points), len(modes)), np.nan)
    points = points.reset_index(drop=True)
    dists = sql.SQL(", ").join(
        sql.SQL("min(ST_Distance(way, c.pt)) FILTER (WHERE {})").format(sql.SQL(TRANSPORT_MODES[m])) for m in modes
    )
    for region, group in points.groupby("region", sort=True):
        query = sql.SQL(
            "SELECT n.* FROM "
            + _POINTS
            + """
               CROSS JOIN LATERAL (SELECT {dists} FROM {s}.planet_osm_line
                                   WHERE osm_id > 0 AND osm_id <> p.wid AND ST_DWithin(way, c.pt, p.d)) n
               ORDER BY p.i"""
        ).format(s=sql.Identifier(validate_region_name(str(region))), dists=dists)
        with cursor(info) as cur:
            cur.execute(query, _unnest(group, radius_m))
            rows = cur.fetchall()
        merc = np.asarray([[np.nan if v is None else float(v) for v in r] for r in rows], dtype=float)
        true_m = merc * np.cos(np.radians(group["lat"].to_numpy(float)))[:, None]  # Mercator → true metres
        out[group.index.to_numpy()] = np.minimum(np.nan_to_num(true_m, nan=radius_m), radius_m) / radius_m
    return out
