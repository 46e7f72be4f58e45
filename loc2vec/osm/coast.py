"""Land and water polygons from the extract's coastline, built in PostGIS at ingest.

OpenStreetMap has no sea polygons: the sea is what lies on the water side of the ``natural=coastline``
ways (land is on the LEFT of a way's direction; a closed coastline way is an island). Map renderers build
land/water polygons from them; this module builds them for the region's extract, in the import's staging
schema, so they are swapped in with the rest of the import or not at all.

Why PostGIS and not Debian's osmcoastline: osmcoastline is made for the planet, where every coastline
closes into rings. In an extract the coastline is cut at the extract's edge, often at a node short of
it (the Monaco extract's coastline stops 6 m and 33 m inside its bbox); osmcoastline reports such open
ends as errors and cannot say on which side of the cut the sea lies. Here the cut is part of the method,
it needs no extra system package, and it runs in the import's own transaction:

1. The coastline ways (osm2pgsql ``--keep-coastlines``: open ways land in planet_osm_line; closed ones,
   islands, in planet_osm_polygon, forced counter-clockwise so that land is on their left too) are
   clipped to the extract's bbox.
2. An open end inside the bbox is joined to the nearest point of the bbox boundary.
3. Those lines and the bbox boundary are noded and polygonized: the faces partition the bbox.
4. A face is land or water by the side of the coastline it lies on: every coastline segment puts a seed
   point SEED_OFFSET just left (land) and just right (water) of the midpoint of its part inside the bbox;
   a face takes the majority of its seeds. Seeds of both sides in one face mean the coastline is broken
   inside the extract (a gap lets land and sea run together): logged as a warning. A face without seeds
   (or a tie) takes the side of its nearest coastline segment.
5. Land faces and water faces are dissolved and cut into pieces of at most MAX_VERTICES vertices
   (ST_Subdivide), so a tile's query reads a few small polygons through the GiST index, never the whole sea.

Without a coastline in the bbox there are no water polygons and the land is the whole bbox: an inland
region (Liechtenstein), or an extract of open sea without a coast, which cannot be told apart from it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import psycopg2.extensions
from psycopg2 import sql

from loc2vec.core.geo import to_mercator
from loc2vec.osm.db import ConnInfo, cursor

log = logging.getLogger(__name__)
LAND_TABLE = "land_polygons"
WATER_TABLE = "water_polygons"
MAX_VERTICES = 256  # per stored piece (ST_Subdivide)
SEED_OFFSET = 0.01  # Mercator units (~7 mm at 45°) beside a segment's midpoint: far below any mapped detail


@dataclass(frozen=True)
class CoastResult:
    """What the coastline step built: the coastline it found and the land/water it made of it."""

    coastline_ways: int
    faces: int
    land_faces: int
    water_faces: int
    broken_faces: int  # faces holding seeds of both sides: the coastline has a gap inside the extract
    land_pieces: int
    water_pieces: int
    land_km2: float
    water_km2: float
    seconds: float

    @property
    def has_coastline(self) -> bool:
        return self.coastline_ways > 0


def _create_tables(cur: psycopg2.extensions.cursor, schema: sql.Identifier) -> None:
    for table in (LAND_TABLE, WATER_TABLE):
        cur.execute(
            sql.SQL("CREATE TABLE {}.{} (id integer PRIMARY KEY, way geometry(Polygon, 3857) NOT NULL)").format(
                schema, sql.Identifier(table)
            )
        )


def _store(cur: psycopg2.extensions.cursor, schema: sql.Identifier, table: str, source: sql.Composable) -> None:
    """Dissolve `source` (a SELECT of polygons `g`), cut it into pieces and store them with stable ids."""
    cur.execute(
        sql.SQL(
            """INSERT INTO {s}.{t} (id, way)
               SELECT row_number() OVER (ORDER BY ST_XMin(g), ST_YMin(g), ST_AsBinary(g)), g FROM (
                 SELECT d.geom AS g
                 FROM (SELECT ST_Subdivide(ST_UnaryUnion(ST_Collect(g)), %s) AS g FROM ({src}) x) p,
                      ST_Dump(p.g) d
                 WHERE NOT ST_IsEmpty(d.geom) AND ST_Area(d.geom) > 0
               ) y"""
        ).format(s=schema, t=sql.Identifier(table), src=source),
        (MAX_VERTICES,),
    )
    cur.execute(sql.SQL("CREATE INDEX ON {}.{} USING gist (way)").format(schema, sql.Identifier(table)))


def build_land_water(schema: str, bbox: tuple[float, float, float, float], info: ConnInfo) -> CoastResult:
    """Build `schema`.land_polygons and `schema`.water_polygons from its coastline ways, within bbox.

    Args:
        schema: the import's (staging) schema, holding osm2pgsql's tables imported with --keep-coastlines.
        bbox: the extract's extent (west, south, east, north), WGS84.
        info: the database.

    Returns:
        Counts and areas of what was built (see the module docstring for how).
    """
    started = time.monotonic()
    s = sql.Identifier(schema)
    x0, y0 = to_mercator(bbox[0], bbox[1])
    x1, y1 = to_mercator(bbox[2], bbox[3])
    env = (float(x0), float(y0), float(x1), float(y1))
    with cursor(info) as cur:
        # The planner's estimates for set-returning PostGIS functions are wild; JIT then compiles for
        # seconds what runs in milliseconds.
        cur.execute("SET LOCAL jit = off")
        cur.execute(
            "CREATE TEMP TABLE coast_box ON COMMIT DROP AS SELECT ST_MakeEnvelope(%s, %s, %s, %s, 3857) AS g", env
        )
        cur.execute(
            sql.SQL(
                """CREATE TEMP TABLE coast ON COMMIT DROP AS
                   SELECT l.osm_id, l.way AS g, true AS open FROM {s}.planet_osm_line l, coast_box b
                   WHERE l."natural" = 'coastline' AND ST_Intersects(l.way, b.g)
                   UNION ALL
                   SELECT p.osm_id, ST_ForcePolygonCCW(p.way), false FROM {s}.planet_osm_polygon p, coast_box b
                   WHERE p."natural" = 'coastline' AND ST_Intersects(p.way, b.g)"""
            ).format(s=s)
        )
        cur.execute("SELECT count(*) FROM coast")
        ways = int(cur.fetchone()[0])
        _create_tables(cur, s)
        if ways == 0:
            _store(cur, s, LAND_TABLE, sql.SQL("SELECT g FROM coast_box"))
            cur.execute("SELECT ST_Area(geography(ST_Transform(g, 4326))) / 1e6 FROM coast_box")
            land_km2 = float(cur.fetchone()[0])
            result = CoastResult(0, 1, 1, 0, 0, 1, 0, land_km2, 0.0, time.monotonic() - started)
            log.warning(
                "%s: no coastline in the extract: no sea (no water polygons), the land is the extract's extent",
                schema,
            )
            return result

        # Segments, each with its start (ax, ay) and end (bx, by): land is on their left.
        cur.execute(
            """CREATE TEMP TABLE coast_segments ON COMMIT DROP AS
               SELECT ST_X(ST_StartPoint(d.geom)) AS ax, ST_Y(ST_StartPoint(d.geom)) AS ay,
                      ST_X(ST_EndPoint(d.geom)) AS bx, ST_Y(ST_EndPoint(d.geom)) AS by, d.geom AS g
               FROM coast c, ST_DumpSegments(c.g) d"""
        )
        cur.execute("DELETE FROM coast_segments WHERE ax = bx AND ay = by")
        cur.execute("CREATE INDEX ON coast_segments USING gist (g)")
        # Seeds beside the midpoint of each segment's part inside the box (a parametric clip to the box).
        cur.execute(
            """CREATE TEMP TABLE coast_seeds ON COMMIT DROP AS
               WITH b AS (SELECT ST_XMin(g) AS x0, ST_YMin(g) AS y0, ST_XMax(g) AS x1, ST_YMax(g) AS y1 FROM coast_box),
               t AS (
                 SELECT s.ax, s.ay, s.bx - s.ax AS dx, s.by - s.ay AS dy,
                   greatest(0,
                     CASE WHEN s.bx <> s.ax THEN least((b.x0 - s.ax) / (s.bx - s.ax), (b.x1 - s.ax) / (s.bx - s.ax))
                          WHEN s.ax BETWEEN b.x0 AND b.x1 THEN 0 ELSE 2 END,
                     CASE WHEN s.by <> s.ay THEN least((b.y0 - s.ay) / (s.by - s.ay), (b.y1 - s.ay) / (s.by - s.ay))
                          WHEN s.ay BETWEEN b.y0 AND b.y1 THEN 0 ELSE 2 END) AS t0,
                   least(1,
                     CASE WHEN s.bx <> s.ax THEN greatest((b.x0 - s.ax) / (s.bx - s.ax), (b.x1 - s.ax) / (s.bx - s.ax))
                          WHEN s.ax BETWEEN b.x0 AND b.x1 THEN 1 ELSE -1 END,
                     CASE WHEN s.by <> s.ay THEN greatest((b.y0 - s.ay) / (s.by - s.ay), (b.y1 - s.ay) / (s.by - s.ay))
                          WHEN s.ay BETWEEN b.y0 AND b.y1 THEN 1 ELSE -1 END) AS t1
                 FROM coast_segments s, b),
               m AS (
                 SELECT ax + dx * (t0 + t1) / 2 AS mx, ay + dy * (t0 + t1) / 2 AS my,
                        dx / sqrt(dx * dx + dy * dy) AS ux, dy / sqrt(dx * dx + dy * dy) AS uy
                 FROM t WHERE t0 < t1)
               SELECT true AS land, ST_SetSRID(ST_MakePoint(mx - %(o)s * uy, my + %(o)s * ux), 3857) AS p FROM m
               UNION ALL
               SELECT false, ST_SetSRID(ST_MakePoint(mx + %(o)s * uy, my - %(o)s * ux), 3857) FROM m""",
            {"o": SEED_OFFSET},
        )
        cur.execute("CREATE INDEX ON coast_seeds USING gist (p)")
        # Faces: the clipped coastline, open ends joined to the box boundary, and the boundary, polygonized.
        cur.execute(
            """CREATE TEMP TABLE coast_faces ON COMMIT DROP AS
               WITH ends AS (
                 SELECT ST_StartPoint(g) AS p FROM coast WHERE open
                 UNION ALL SELECT ST_EndPoint(g) FROM coast WHERE open),
               dangles AS (SELECT (array_agg(p))[1] AS p FROM ends GROUP BY ST_AsBinary(p) HAVING count(*) = 1),
               lines AS (
                 SELECT ST_Boundary(b.g) AS g FROM coast_box b
                 UNION ALL
                 SELECT ST_CollectionExtract(ST_Intersection(CASE WHEN c.open THEN c.g ELSE ST_Boundary(c.g) END, b.g), 2)
                 FROM coast c, coast_box b
                 UNION ALL
                 SELECT ST_ShortestLine(d.p, ST_Boundary(b.g)) FROM dangles d, coast_box b WHERE ST_Contains(b.g, d.p))
               SELECT row_number() OVER () AS id, d.geom AS g
               FROM (SELECT ST_Polygonize(g) AS g FROM (SELECT ST_UnaryUnion(ST_Collect(g)) AS g FROM lines) n) f,
                    ST_Dump(f.g) d"""
        )
        cur.execute(
            """CREATE TEMP TABLE coast_votes ON COMMIT DROP AS
               SELECT f.id, f.g, count(s.p) FILTER (WHERE s.land) AS land_votes,
                      count(s.p) FILTER (WHERE NOT s.land) AS water_votes
               FROM coast_faces f LEFT JOIN coast_seeds s ON ST_Intersects(f.g, s.p)
               GROUP BY f.id, f.g"""
        )
        # No seeds, or a tie: the side of the nearest coastline segment (cross product > 0: left, land).
        cur.execute(
            """ALTER TABLE coast_votes ADD COLUMN land boolean;
               UPDATE coast_votes SET land = land_votes > water_votes WHERE land_votes <> water_votes;
               UPDATE coast_votes v SET land = n.side > 0 FROM (
                 SELECT v2.id, (s.bx - s.ax) * (ST_Y(q.p) - s.ay) - (s.by - s.ay) * (ST_X(q.p) - s.ax) AS side
                 FROM coast_votes v2 CROSS JOIN LATERAL (SELECT ST_PointOnSurface(v2.g) AS p) q
                 CROSS JOIN LATERAL (SELECT * FROM coast_segments s ORDER BY s.g <-> q.p LIMIT 1) s
                 WHERE v2.land IS NULL) n
               WHERE v.id = n.id"""
        )
        cur.execute(
            """SELECT count(*), count(*) FILTER (WHERE land), count(*) FILTER (WHERE NOT land),
                      count(*) FILTER (WHERE least(land_votes, water_votes) > 0.01 * greatest(land_votes, water_votes)),
                      coalesce(sum(ST_Area(geography(ST_Transform(g, 4326)))) FILTER (WHERE land), 0) / 1e6,
                      coalesce(sum(ST_Area(geography(ST_Transform(g, 4326)))) FILTER (WHERE NOT land), 0) / 1e6
               FROM coast_votes"""
        )
        faces, land_faces, water_faces, broken, land_km2, water_km2 = cur.fetchone()
        _store(cur, s, LAND_TABLE, sql.SQL("SELECT g FROM coast_votes WHERE land"))
        _store(cur, s, WATER_TABLE, sql.SQL("SELECT g FROM coast_votes WHERE NOT land"))
        counts = []
        for table in (LAND_TABLE, WATER_TABLE):
            cur.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(s, sql.Identifier(table)))
            counts.append(int(cur.fetchone()[0]))
    result = CoastResult(
        coastline_ways=ways,
        faces=int(faces),
        land_faces=int(land_faces),
        water_faces=int(water_faces),
        broken_faces=int(broken),
        land_pieces=counts[0],
        water_pieces=counts[1],
        land_km2=float(land_km2),
        water_km2=float(water_km2),
        seconds=time.monotonic() - started,
    )
    if broken:
        log.warning(
            "%s: the coastline is broken inside the extract: %d of %d land/water faces hold seeds of both sides "
            "(a gap lets land and sea run together); each was classified by the majority",
            schema,
            broken,
            faces,
        )
    log.info(
        "%s: %d coastline ways → %d land and %d water faces (%.2f km² land, %.2f km² sea) in %.1fs",
        schema,
        ways,
        land_faces,
        water_faces,
        land_km2,
        water_km2,
        result.seconds,
    )
    return result
