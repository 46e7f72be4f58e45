"""Candidate locations of each kind, drawn from the region's PostGIS import inside the inner bbox.

* **visits** – POIs (amenity/shop/tourism points, ``ST_PointOnSurface`` of POI areas, same filter
  as the ``pois`` channel) and buildings (``ST_PointOnSurface``), drawn without replacement,
  uniformly over that union: where people live, work and go.
* **transport** – uniform along the road, rail and path network (the channels' road/path/rail
  classes): a point at a uniform arc length of the whole clipped network, so a line is picked
  with probability ∝ its true length (Mercator length × cos φ).
* **uniform** – uniform by area (uniform in lon and sin φ) over the land (the land side of the coastline)
  inside the inner bbox, kept where it is *mapped land* (sampling/land.py). Drawn per land piece: a piece
  is chosen with probability ∝ its bbox's area, a point uniformly in that bbox, kept if it lies in that
  piece (so overlapping bboxes count once) — the cost follows the land, not the bbox. Where the sea does
  not reach into the inner bbox, the bbox is the one piece, and the draws are those of the plain bbox.

All randomness is a numpy ``Generator`` seeded with ``(seed, kind)``; SQL only returns candidate
geometries in a fixed ``ORDER BY``, so the same params and import give the same candidates.
"""

from __future__ import annotations

import logging
import math
from functools import cached_property

import numpy as np
from psycopg2 import sql

from loc2vec.core.config import KINDS
from loc2vec.core.errors import ConfigError
from loc2vec.core.geo import from_mercator, to_mercator
from loc2vec.osm.db import ConnInfo, cursor
from loc2vec.sampling.land import (
    ENVELOPE,
    NETWORK_WHERE,
    POI_WHERE,
    LandPieces,
    land_pieces,
    mapped_land_query,
    sea_reaches,
)

log = logging.getLogger(__name__)


class Candidates:
    """Draws candidate points of each kind inside the inner bbox (Mercator geometry from PostGIS)."""

    def __init__(self, region: str, box: tuple[float, float, float, float], radius_m: float, seed: int, info: ConnInfo):
        self.region = region
        self.info = info
        self.schema = sql.Identifier(region)
        self.box = box
        x0, y0 = to_mercator(box[0], box[1])
        x1, y1 = to_mercator(box[2], box[3])
        self.env = (float(x0), float(y0), float(x1), float(y1))
        self.radius_m = radius_m
        self.rngs = {k: np.random.default_rng([seed, i]) for i, k in enumerate(KINDS)}
        self._visits: np.ndarray | None = None  # (n, 2) lon/lat in a seeded random order
        self._visits_next = 0
        self._network: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # seg starts, ends, cum length

    def _inside(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        w, s, e, n = self.box
        return (lon > w) & (lon < e) & (lat > s) & (lat < n)

    def draw(self, kind: str, n: int) -> np.ndarray:
        """Up to n (lon, lat) rows; fewer only when the visits pool is exhausted."""
        if n <= 0:
            return np.empty((0, 2))
        return {"visits": self._draw_visits, "transport": self._draw_transport, "uniform": self._draw_uniform}[kind](n)

    def _draw_visits(self, n: int) -> np.ndarray:
        if self._visits is None:
            query = sql.SQL(
                """SELECT ST_X(g), ST_Y(g) FROM (
                     SELECT 0 AS src, osm_id, way AS g FROM {s}.planet_osm_point WHERE {poi}
                     UNION ALL SELECT 1, osm_id, ST_PointOnSurface(way) FROM {s}.planet_osm_polygon WHERE {poi}
                     UNION ALL SELECT 2, osm_id, ST_PointOnSurface(way) FROM {s}.planet_osm_polygon
                               WHERE building IS NOT NULL AND building <> 'no'
                   ) c WHERE g && {env} ORDER BY src, osm_id, ST_X(g), ST_Y(g)"""
            ).format(s=self.schema, poi=sql.SQL(POI_WHERE), env=sql.SQL(ENVELOPE))
            with cursor(self.info) as cur:
                cur.execute(query, self.env)
                xy = np.asarray(cur.fetchall(), dtype=float).reshape(-1, 2)
            lon, lat = from_mercator(xy[:, 0], xy[:, 1])
            pts = np.column_stack([lon, lat])[self._inside(lon, lat)]
            self._visits = pts[self.rngs["visits"].permutation(len(pts))]
            log.info("visits pool: %d POIs and buildings", len(pts))
        out = self._visits[self._visits_next : self._visits_next + n]
        self._visits_next += len(out)
        return out

    def _load_network(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every straight segment of the network clipped to the inner bbox, with cumulative true length."""
        query = sql.SQL(
            """SELECT ST_AsBinary(ST_Force2D(d.geom), 'NDR') FROM {s}.planet_osm_line l,
                 LATERAL ST_Dump(ST_CollectionExtract(ST_Intersection(l.way, {env}), 2)) d
               WHERE {net} AND l.way && {env}
               ORDER BY l.osm_id, d.path, ST_AsBinary(d.geom)"""
        ).format(s=self.schema, net=sql.SQL(NETWORK_WHERE), env=sql.SQL(ENVELOPE))
        starts, ends = [], []
        with cursor(self.info) as cur:
            cur.execute(query, self.env + self.env)
            for (wkb,) in cur:
                buf = bytes(wkb)
                npts = int.from_bytes(buf[5:9], "little")
                xy = np.frombuffer(buf, dtype="<f8", offset=9, count=2 * npts).reshape(npts, 2)
                starts.append(xy[:-1])
                ends.append(xy[1:])
        if not starts:
            raise ConfigError("no roads, rails or paths inside the region: cannot draw transport locations")
        a, b = np.concatenate(starts), np.concatenate(ends)
        _, lat_mid = from_mercator(0.0, (a[:, 1] + b[:, 1]) / 2)
        length = np.hypot(*(b - a).T) * np.cos(np.radians(lat_mid))  # Mercator → true metres
        log.info("transport network: %d segments, %.0f km", len(a), length.sum() / 1000)
        return a, b, np.cumsum(length)

    def _draw_transport(self, n: int) -> np.ndarray:
        if self._network is None:
            self._network = self._load_network()
        a, b, cum = self._network
        s = self.rngs["transport"].uniform(0.0, cum[-1], n)
        i = np.minimum(np.searchsorted(cum, s, side="right"), len(cum) - 1)
        seg_start = np.where(i > 0, cum[i - 1], 0.0)
        t = np.clip((s - seg_start) / np.maximum(cum[i] - seg_start, 1e-12), 0.0, 1.0)
        xy = a[i] + (b[i] - a[i]) * t[:, None]
        lon, lat = from_mercator(xy[:, 0], xy[:, 1])
        keep = self._inside(lon, lat)  # guards float error at the clip edge
        return np.column_stack([lon, lat])[keep]

    @cached_property
    def _land(self) -> LandPieces | None:
        """The land pieces in the inner bbox; None when the sea does not reach into it (the bbox is all land)."""
        if not sea_reaches(self.region, self.box, self.info):
            return None
        pieces = land_pieces(self.region, self.box, self.info)
        log.info("uniform locations: drawn in %d land pieces", len(pieces))
        return pieces

    def _draw_uniform(self, n: int) -> np.ndarray:
        """Rejection sampling: uniform by area over the land, kept when on mapped land."""
        land = self._land
        if land is not None and len(land) == 0:
            return np.empty((0, 2))  # the inner bbox is all sea
        query = mapped_land_query(self.region, in_piece=land is not None)
        got: list[np.ndarray] = []
        have, rate = 0, 0.5
        with cursor(self.info) as cur:
            for _ in range(30):
                m = int(math.ceil((n - have) / rate * 1.1)) + 16
                lon, lat, piece = self._propose(m, land)
                x, y = to_mercator(lon, lat)
                d = 0.5 * self.radius_m / np.cos(np.radians(lat))  # radius/2 in Mercator units
                args = [x.tolist(), y.tolist(), d.tolist()]
                cur.execute(query, args if piece is None else [*args, piece.tolist()])
                idx = np.asarray([r[0] - 1 for r in cur.fetchall()], dtype=int)
                got.append(np.column_stack([lon[idx], lat[idx]]))
                have += len(idx)
                rate = max(len(idx) / m, 0.01)
                if have >= n:
                    break
        return np.concatenate(got)[:n]

    def _propose(self, m: int, land: LandPieces | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """m points (lon, lat, land piece id) uniform by area: in the inner bbox when it is all land (no piece
        ids), else in a piece's bbox, the piece chosen with probability ∝ the bbox's area."""
        rng = self.rngs["uniform"]
        if land is None:  # the plain bbox, drawn exactly as before coasts
            w, s, e, nth = self.box
            lon = rng.uniform(w, e, m)
            lat = np.degrees(np.arcsin(rng.uniform(math.sin(math.radians(s)), math.sin(math.radians(nth)), m)))
            return lon, lat, None
        k = rng.choice(len(land), size=m, p=land.areas / land.areas.sum())
        lon = rng.uniform(land.west[k], land.east[k])
        lat = np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(land.south[k])), np.sin(np.radians(land.north[k])))))
        return lon, lat, land.ids[k]
