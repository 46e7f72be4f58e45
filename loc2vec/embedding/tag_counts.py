"""Per-cell OSM category counts within the tile radius: the `tag_counts` baseline published beside the embedding.

Counts for points/polygons, true metres of line inside the circle for roads, paths and rail. Computed in
PostGIS in chunks of SQL_CHUNK cells (bounded arrays and temp tables for any region size), one database session
per core at once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from psycopg2 import sql

from loc2vec.core.geo import to_mercator
from loc2vec.core.pools import worker_count
from loc2vec.osm.db import ConnInfo, cursor
from loc2vec.raster.channels import NOT_POI_AMENITY

FOOD = "('restaurant','cafe','fast_food','bar','pub','biergarten','ice_cream','food_court')"
EDUCATION = "('school','kindergarten','university','college','library','music_school','language_school')"
HEALTH = "('hospital','clinic','doctors','dentist','pharmacy','veterinary','nursing_home')"
# (name, SQL condition, table kinds it applies to): counts for points/polygons, true metres for lines.
TAG_COUNTS: tuple[tuple[str, str, str], ...] = (
    ("buildings", "building IS NOT NULL AND building <> 'no'", "polygon"),
    ("poi_food_drink", f"amenity IN {FOOD}", "point,polygon"),
    ("poi_shop", "shop IS NOT NULL", "point,polygon"),
    ("poi_tourism", "tourism IS NOT NULL", "point,polygon"),
    ("poi_education", f"amenity IN {EDUCATION}", "point,polygon"),
    ("poi_health", f"amenity IN {HEALTH}", "point,polygon"),
    ("poi_other_amenity",
     f"amenity NOT IN {FOOD} AND amenity NOT IN {EDUCATION} AND amenity NOT IN {HEALTH}"
     f" AND amenity NOT IN {NOT_POI_AMENITY} AND amenity <> 'parking'", "point,polygon"),
    ("parking", "amenity = 'parking'", "point,polygon"),
    ("transit_stops", "highway = 'bus_stop' OR railway IN ('station','halt','tram_stop')", "point"),
    ("road_major_m", "highway IN ('motorway','motorway_link','trunk','trunk_link','primary','primary_link',"
     "'secondary','secondary_link','tertiary','tertiary_link')", "line"),
    ("road_minor_m", "highway IN ('residential','unclassified','living_street','service','road','busway')", "line"),
    ("path_m", "highway IN ('footway','path','cycleway','pedestrian','steps','track','bridleway')", "line"),
    ("rail_m", "railway IN ('rail','tram','light_rail','subway','narrow_gauge','funicular','monorail')", "line"),
)  # fmt: skip
TAG_COUNT_NAMES: tuple[str, ...] = tuple(name for name, _, _ in TAG_COUNTS)
SQL_CHUNK = 20_000  # cells per PostGIS session: bounded arrays and temp tables for any region size


def tag_counts(
    region: str, lats: np.ndarray, lons: np.ndarray, radius_m: float, info: ConnInfo, connections: int = 0
) -> np.ndarray:
    """(n, len(TAG_COUNT_NAMES)) float32: features per category within radius_m of each point
    (a count for points/polygons, true metres of line inside the circle for roads, paths, rail).

    Chunks of SQL_CHUNK points go over `connections` database sessions at once (0: one per core): a session runs
    its queries on one core. The chunks do not depend on the core count, so neither do the sums.
    """
    out = np.zeros((len(lats), len(TAG_COUNTS)), dtype=np.float64)
    starts = list(range(0, len(lats), SQL_CHUNK))
    with ThreadPoolExecutor(max_workers=worker_count(connections, len(starts))) as pool:
        parts = pool.map(lambda c0: _chunk(region, lats, lons, c0, radius_m, info), starts)
        for c0, part in zip(starts, parts, strict=True):
            out[c0 : c0 + len(part)] = part
    return out.astype(np.float32)


def _chunk(region: str, lats: np.ndarray, lons: np.ndarray, c0: int, radius_m: float, info: ConnInfo) -> np.ndarray:
    """tag_counts of the points c0 … c0 + SQL_CHUNK, in one database session (its own temporary table)."""
    la, lo = lats[c0 : c0 + SQL_CHUNK], lons[c0 : c0 + SQL_CHUNK]
    out = np.zeros((len(la), len(TAG_COUNTS)), dtype=np.float64)
    schema = sql.Identifier(region)
    x, y = to_mercator(lo, la)
    d = radius_m / np.cos(np.radians(la))
    with cursor(info) as cur:
        cur.execute("DROP TABLE IF EXISTS pg_temp.loc2vec_cells")
        cur.execute(
            "CREATE TEMP TABLE loc2vec_cells AS SELECT (p.i - 1)::int AS i, p.d, p.k,"
            " ST_SetSRID(ST_MakePoint(p.x, p.y), 3857) AS pt"
            " FROM unnest(%s::float8[], %s::float8[], %s::float8[], %s::float8[]) WITH ORDINALITY AS p(x, y, d, k, i)",
            (x.tolist(), y.tolist(), d.tolist(), np.cos(np.radians(la)).tolist()),
        )
        cur.execute("CREATE INDEX ON loc2vec_cells USING gist (pt); ANALYZE loc2vec_cells")
        for table in ("point", "polygon", "line"):
            cols = [(j, cond) for j, (_, cond, kinds) in enumerate(TAG_COUNTS) if table in kinds.split(",")]
            if table == "line":  # Mercator length × cos φ = true metres
                agg = "sum(ST_Length(ST_Intersection(g.way, ST_Buffer(c.pt, c.d, 8))) * c.k) FILTER (WHERE {})"
            else:
                agg = "count(*) FILTER (WHERE {})"
            select = sql.SQL(", ").join(sql.SQL(agg).format(sql.SQL(cond)) for _, cond in cols)
            where = sql.SQL(" OR ").join(sql.SQL(f"({cond})") for _, cond in cols)
            cur.execute(
                sql.SQL(
                    "SELECT c.i, {sel} FROM {s}.{t} g JOIN loc2vec_cells c ON ST_DWithin(g.way, c.pt, c.d)"
                    " WHERE {where} GROUP BY c.i"
                ).format(sel=select, s=schema, t=sql.Identifier(f"planet_osm_{table}"), where=where)
            )
            rows = cur.fetchall()
            if rows:
                idx = np.array([r[0] for r in rows])
                vals = np.array([[v or 0.0 for v in r[1:]] for r in rows], dtype=np.float64)
                out[np.ix_(idx, [j for j, _ in cols])] += vals
        cur.execute("DROP TABLE pg_temp.loc2vec_cells")
    return out
