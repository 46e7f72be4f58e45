"""The SQL rules every stage shares for what counts as a POI, the transport network and mapped land.

*Mapped land*: a point inside a land-use/natural/leisure/amenity/building polygon that is not water, or
within radius/2 of a road, rail or path. The extract's empty bbox corners (outside the country cut) never
qualify. Sampling's uniform locations and embedding's cells both use `mapped_land_query`.
"""

from __future__ import annotations

from psycopg2 import sql

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


def mapped_land_query(region: str) -> sql.Composed:
    """Indices (1-based, ascending) of the points on mapped land.

    Parameters: Mercator x, y and the network distance d (radius/2 in Mercator units), as float8 arrays.
    """
    return sql.SQL(
        """SELECT p.i FROM unnest(%s::float8[], %s::float8[], %s::float8[]) WITH ORDINALITY AS p(x, y, d, i)
           CROSS JOIN LATERAL (SELECT ST_SetSRID(ST_MakePoint(p.x, p.y), 3857) AS pt) q
           WHERE EXISTS (SELECT 1 FROM {s}.planet_osm_polygon g WHERE g.way && q.pt
                         AND ST_Intersects(g.way, q.pt) AND {land})
              OR EXISTS (SELECT 1 FROM {s}.planet_osm_line l WHERE ST_DWithin(l.way, q.pt, p.d) AND {net})
           ORDER BY p.i"""
    ).format(s=sql.Identifier(region), land=sql.SQL(LAND_WHERE), net=sql.SQL(NETWORK_WHERE))
