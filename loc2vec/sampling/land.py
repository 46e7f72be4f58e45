"""The SQL rules every stage shares for what counts as a POI, the transport network, land and mapped land.

*Land* is the import's ``land_polygons`` (osm/coast.py): the land side of the extract's coastline, or the whole
extract when it has no coastline. Stored in pieces of a few hundred vertices, so every query here reads only
the pieces near its points, and costs follow the land, not the bounding box.

*Mapped land*: a point whose tile reaches the land (within the tile radius of it: the open sea beyond never
counts, whatever OSM draws there) and that lies inside a land-use/natural/leisure/amenity/building polygon
that is not water, or within radius/2 of a road, rail or path. So harbour basins (leisure=marina), piers and
quays, on the water side of the coastline, stay mapped land; the extract's empty bbox corners (outside the
country cut) never qualify. Sampling's uniform locations and embedding's cells both use `mapped_land_query`,
and both draw their candidates from the land (`land_pieces`, `land_shapes`) instead of the bounding box.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from psycopg2 import sql

from loc2vec.core.geo import from_mercator, to_mercator
from loc2vec.osm.coast import LAND_TABLE, WATER_TABLE
from loc2vec.osm.db import ConnInfo, cursor
from loc2vec.raster.channels import MAJOR_ROADS, MINOR_ROADS, NOT_POI_AMENITY, PATHS, RAIL

POI_WHERE = f"((amenity IS NOT NULL AND amenity NOT IN {NOT_POI_AMENITY}) OR shop IS NOT NULL OR tourism IS NOT NULL)"
NETWORK_WHERE = f"(highway IN {MAJOR_ROADS} OR highway IN {MINOR_ROADS} OR highway IN {PATHS} OR railway IN {RAIL})"
LAND_WHERE = (
    "((landuse IS NOT NULL AND landuse NOT IN ('reservoir','basin')) OR leisure IS NOT NULL OR amenity IS NOT NULL"
    " OR (building IS NOT NULL AND building <> 'no')"
    " OR (\"natural\" IS NOT NULL AND \"natural\" NOT IN ('water','bay','strait')))"
    " AND water IS NULL AND waterway IS NULL"
)
ENVELOPE = "ST_MakeEnvelope(%s, %s, %s, %s, 3857)"
Box = tuple[float, float, float, float]  # west, south, east, north (WGS84)


def mapped_land_query(region: str, *, in_piece: bool = False) -> sql.Composed:
    """Indices (1-based, ascending) of the points on mapped land.

    Parameters: Mercator x, y and the distance d (radius/2 in Mercator units, so 2d is the tile radius), as
    float8 arrays; with `in_piece`, a fourth array of land piece ids (`LandPieces.ids`): a point must also lie
    in its piece.
    """
    s, land = sql.Identifier(region), sql.Identifier(LAND_TABLE)
    piece = (
        sql.SQL("AND EXISTS (SELECT 1 FROM {s}.{land} a WHERE a.id = p.k AND ST_Intersects(a.way, q.pt))").format(
            s=s, land=land
        )
        if in_piece
        else sql.SQL("")
    )
    return sql.SQL(
        """SELECT p.i FROM unnest(%s::float8[], %s::float8[], %s::float8[], {k}) WITH ORDINALITY AS p(x, y, d, k, i)
           CROSS JOIN LATERAL (SELECT ST_SetSRID(ST_MakePoint(p.x, p.y), 3857) AS pt) q
           WHERE EXISTS (SELECT 1 FROM {s}.{land} a WHERE ST_DWithin(a.way, q.pt, 2 * p.d)) {piece}
             AND (EXISTS (SELECT 1 FROM {s}.planet_osm_polygon g WHERE g.way && q.pt
                          AND ST_Intersects(g.way, q.pt) AND {where})
                  OR EXISTS (SELECT 1 FROM {s}.planet_osm_line l WHERE ST_DWithin(l.way, q.pt, p.d) AND {net}))
           ORDER BY p.i"""
    ).format(
        s=s,
        land=land,
        k=sql.SQL("%s::int[]" if in_piece else "NULL::int[]"),
        piece=piece,
        where=sql.SQL(LAND_WHERE),
        net=sql.SQL(NETWORK_WHERE),
    )


def envelope(box: Box) -> tuple[float, float, float, float]:
    """The box in Mercator (xmin, ymin, xmax, ymax): the parameters of ENVELOPE."""
    x0, y0 = to_mercator(box[0], box[1])
    x1, y1 = to_mercator(box[2], box[3])
    return float(x0), float(y0), float(x1), float(y1)


def sea_reaches(region: str, box: Box, info: ConnInfo) -> bool:
    """Whether the sea (a water polygon built from the coastline) reaches into the box.

    When it does not, the box is all land, and callers keep the plain box rule (exactly as before coasts).
    """
    query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {}.{} w WHERE ST_Intersects(w.way, {env}))").format(
        sql.Identifier(region), sql.Identifier(WATER_TABLE), env=sql.SQL(ENVELOPE)
    )
    with cursor(info) as cur:
        cur.execute(query, envelope(box))
        return bool(cur.fetchone()[0])


@dataclass(frozen=True)
class LandPieces:
    """The stored land pieces that reach into a box: ids and the lon/lat bbox of each piece's part in the box."""

    ids: np.ndarray  # int
    west: np.ndarray
    south: np.ndarray
    east: np.ndarray
    north: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def areas(self) -> np.ndarray:
        """The bboxes' areas on the sphere, up to a constant (Δlon · Δsin φ): weights for uniform draws."""
        return (self.east - self.west) * (np.sin(np.radians(self.north)) - np.sin(np.radians(self.south)))


def land_pieces(region: str, box: Box, info: ConnInfo) -> LandPieces:
    """The land pieces inside the box (ordered by id), with their bboxes clipped to the box."""
    query = sql.SQL(
        """SELECT id, ST_XMin(way), ST_YMin(way), ST_XMax(way), ST_YMax(way) FROM {}.{}
           WHERE ST_Intersects(way, {env}) ORDER BY id"""
    ).format(sql.Identifier(region), sql.Identifier(LAND_TABLE), env=sql.SQL(ENVELOPE))
    with cursor(info) as cur:
        cur.execute(query, envelope(box))
        rows = np.asarray(cur.fetchall(), dtype=float).reshape(-1, 5)
    west, south = from_mercator(rows[:, 1], rows[:, 2])
    east, north = from_mercator(rows[:, 3], rows[:, 4])
    w, s, e, n = box
    west, south, east, north = np.maximum(west, w), np.maximum(south, s), np.minimum(east, e), np.minimum(north, n)
    keep = (east > west) & (north > south)  # a piece that only touches the box has nothing to draw in it
    return LandPieces(rows[keep, 0].astype(int), west[keep], south[keep], east[keep], north[keep])


def land_shapes(region: str, box: Box, margin_m: float, info: ConnInfo) -> tuple[list[dict], float]:
    """GeoJSON polygons (WGS84) of the land and the water within margin_m of it, clipped to the box, one
    or more per stored piece (buffered pieces overlap by the margin), and their total area in km²."""
    query = sql.SQL(
        """SELECT ST_AsGeoJSON(ST_Transform(d.geom, 4326), 9), ST_Area(geography(ST_Transform(d.geom, 4326)))
           FROM {}.{} a,
                LATERAL ST_Dump(ST_CollectionExtract(ST_Intersection(
                  ST_Buffer(a.way, %s / cos(radians(ST_Y(ST_Transform(ST_Centroid(a.way), 4326))))), {env}), 3)) d
           WHERE ST_DWithin(a.way, {env}, %s) AND NOT ST_IsEmpty(d.geom)
           ORDER BY a.id, d.path"""
    ).format(sql.Identifier(region), sql.Identifier(LAND_TABLE), env=sql.SQL(ENVELOPE))
    env = envelope(box)
    # margin in Mercator units at the box's highest latitude: enough to reach every piece's buffer
    reach = margin_m / np.cos(np.radians(max(abs(box[1]), abs(box[3]))))
    with cursor(info) as cur:
        cur.execute(query, (margin_m, *env, *env, float(reach)))
        rows = cur.fetchall()
    return [json.loads(text) for text, _ in rows], sum(float(area) for _, area in rows) / 1e6
