"""The 12 semantic channels, declared once as data.

Each channel is an SQL filter over osm2pgsql's tables (default style, with hstore)
and how Mapnik draws it: lines with a width in *metres* (so a road keeps its real
width at any tile scale), filled polygons, or point markers with a radius in metres.
Every value here is a constant of the code, never user input; the schema (region)
is a validated identifier.

Why these 12 (the issue's suggested set): roads are split by class because a motorway
and a residential street mean different surroundings; water is split into areas and
lines because a lake and a stream are different places; land use is split into
residential / commercial-industrial-retail / farmland, and green covers parks and
forests; POIs mark where people go (amenity, shop, tourism). Street furniture
(benches, waste baskets, …) is not a POI.

The sea is water too: OSM has no sea polygons, so ingest builds them from the extract's
coastline (osm/coast.py, table ``water_polygons``) and ``water_areas`` draws them with the
lakes. A separate ``sea`` channel would change the channel count everywhere (params, model,
metatiles) and was not measured to help; the sea and a lake both mean "nobody lives here".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["line", "polygon", "point"]


@dataclass(frozen=True)
class Channel:
    name: str
    kind: Kind
    sql: str  # SELECT returning `way` (3857) and, for lines/points, `w` = width or diameter in metres (Mapnik's !bbox!)
    colour: tuple[int, int, int]  # RGB for the human preview
    description: str


def _line(table: str, where: str, width_sql: str) -> str:
    return f"SELECT way, ({width_sql})::float AS w FROM {{schema}}.{table} WHERE {where}"


MAJOR_ROADS = "('motorway','motorway_link','trunk','trunk_link','primary','primary_link','secondary','secondary_link','tertiary','tertiary_link')"  # noqa: E501
MINOR_ROADS = "('residential','unclassified','living_street','service','road','busway')"
PATHS = "('footway','path','cycleway','pedestrian','steps','track','bridleway')"
RAIL = "('rail','tram','light_rail','subway','narrow_gauge','funicular','monorail','preserved')"
NOT_POI_AMENITY = (
    "('bench','waste_basket','waste_disposal','parking_space','vending_machine','bicycle_parking',"
    "'grit_bin','hunting_stand','clock','letter_box','drinking_water','recycling')"
)

CHANNELS: tuple[Channel, ...] = (
    Channel(
        "roads_major", "line",
        _line("planet_osm_line", f"highway IN {MAJOR_ROADS}",
              "CASE WHEN highway LIKE 'motorway%' OR highway LIKE 'trunk%' THEN 16"
              " WHEN highway LIKE 'primary%' THEN 12 WHEN highway LIKE 'secondary%' THEN 10 ELSE 8 END"),
        (230, 60, 60), "motorway, trunk, primary, secondary, tertiary (+ links)",
    ),
    Channel(
        "roads_minor", "line",
        _line("planet_osm_line", f"highway IN {MINOR_ROADS}",
              "CASE WHEN highway = 'service' THEN 4 ELSE 6 END"),
        (250, 170, 80), "residential, unclassified, living street, service",
    ),
    Channel(
        "paths", "line",
        _line("planet_osm_line", f"highway IN {PATHS}", "CASE WHEN highway = 'track' THEN 3 ELSE 2 END"),
        (160, 90, 40), "footway, path, cycleway, pedestrian, steps, track, bridleway",
    ),
    Channel(
        "rail", "line",
        _line("planet_osm_line", f"railway IN {RAIL}", "CASE WHEN railway = 'tram' THEN 3 ELSE 4 END"),
        (70, 70, 70), "railway: rail, tram, light rail, subway, narrow gauge, funicular",
    ),
    Channel(
        "water_areas", "polygon",
        "SELECT way FROM {schema}.planet_osm_polygon WHERE (\"natural\" = 'water'"
        " OR waterway IN ('riverbank','dock') OR landuse IN ('reservoir','basin') OR water IS NOT NULL)"
        " AND way && !bbox!"
        # The sea is stored in pieces (osm/coast.py), dissolved within the query's extent (Mapnik's !bbox!) so
        # that anti-aliasing leaves no seam where two pieces meet. (PostgreSQL cannot push Mapnik's extent
        # filter into a UNION with an aggregate: each branch filters itself.)
        " UNION ALL SELECT ST_Union(way) AS way FROM {schema}.water_polygons WHERE way && !bbox! HAVING count(*) > 0",
        (60, 120, 230), "the sea, lakes, rivers as areas, reservoirs, basins",
    ),
    Channel(
        "waterways", "line",
        _line("planet_osm_line", "waterway IN ('river','stream','canal','drain','ditch')",
              "CASE waterway WHEN 'river' THEN 12 WHEN 'canal' THEN 8 WHEN 'stream' THEN 3 ELSE 2 END"),
        (120, 180, 250), "river, canal, stream, drain, ditch (as lines)",
    ),
    Channel(
        "buildings", "polygon",
        "SELECT way FROM {schema}.planet_osm_polygon WHERE building IS NOT NULL AND building <> 'no'",
        (150, 110, 130), "every building footprint",
    ),
    Channel(
        "green", "polygon",
        "SELECT way FROM {schema}.planet_osm_polygon WHERE"
        " landuse IN ('forest','grass','recreation_ground','village_green')"
        " OR leisure IN ('park','garden','pitch','golf_course','playground','nature_reserve')"
        " OR \"natural\" IN ('wood','scrub','grassland','heath')",
        (60, 170, 70), "parks, gardens, pitches, forest, wood, grass, scrub",
    ),
    Channel(
        "residential", "polygon",
        "SELECT way FROM {schema}.planet_osm_polygon WHERE landuse = 'residential'",
        (215, 215, 215), "residential land use",
    ),
    Channel(
        "commercial_industrial", "polygon",
        "SELECT way FROM {schema}.planet_osm_polygon"
        " WHERE landuse IN ('industrial','commercial','retail','railway','construction')",
        (200, 150, 210), "industrial, commercial, retail, railway yards, construction",
    ),
    Channel(
        "farmland", "polygon",
        "SELECT way FROM {schema}.planet_osm_polygon WHERE landuse IN"
        " ('farmland','farmyard','orchard','vineyard','meadow','allotments','greenhouse_horticulture','plant_nursery')",
        (235, 225, 160), "farmland, farmyard, orchard, vineyard, meadow, allotments",
    ),
    Channel(
        "pois", "point",
        "SELECT way, 6.0::float AS w FROM {schema}.planet_osm_point"
        f" WHERE (amenity IS NOT NULL AND amenity NOT IN {NOT_POI_AMENITY}) OR shop IS NOT NULL"
        " OR tourism IS NOT NULL"
        " UNION ALL SELECT ST_PointOnSurface(way) AS way, 6.0::float AS w FROM {schema}.planet_osm_polygon"
        f" WHERE (amenity IS NOT NULL AND amenity NOT IN {NOT_POI_AMENITY}) OR shop IS NOT NULL"
        " OR tourism IS NOT NULL",
        (240, 40, 200), "amenities, shops, tourism (points and area centres)",
    ),
)  # fmt: skip

CHANNEL_NAMES: tuple[str, ...] = tuple(c.name for c in CHANNELS)
N_CHANNELS = len(CHANNELS)
assert N_CHANNELS == 12, "the encoder expects 12 channels"


# Masking (evaluation/: a label's own object hidden from its scene). osm2pgsql keeps nodes in planet_osm_point and
# ways (id) and relations (-id) in planet_osm_line/planet_osm_polygon: each table reads the id to hide from a
# Mapnik render variable (`!@name!`, substituted per render), 0 hiding nothing.
HIDE_VARIABLES: dict[str, str] = {
    "planet_osm_point": "hide_node",
    "planet_osm_line": "hide_way",
    "planet_osm_polygon": "hide_way",
}


def maskable_sql(channel: Channel) -> str:
    """The channel's SQL with each OSM table filtered by its hide variable (see HIDE_VARIABLES).

    Used only by maskable renderers: the plain SQL (and with it the metatiles' channel digest) is unchanged.
    """
    out = channel.sql
    for table, var in HIDE_VARIABLES.items():
        out = out.replace(
            f"{{schema}}.{table} ",
            f"(SELECT * FROM {{schema}}.{table} WHERE osm_id <> !@{var}!) AS {table} ",
        )
    return out


def channel_index(name: str) -> int:
    try:
        return CHANNEL_NAMES.index(name)
    except ValueError:
        raise KeyError(f"unknown channel {name!r}; channels are {', '.join(CHANNEL_NAMES)}") from None
