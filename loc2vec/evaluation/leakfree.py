"""Leak-free tasks: the labelled object is removed from every input of every featureset.

The consumer tasks (evaluation/labels.py) leak: a venue's own category is one of the tag counts, and
the way under a transport point is the channel histogram's pixels. Here each label carries the OSM
object it came from, and its scene (tile, histogram, tag counts, nearest ways; evaluation/scene.py)
is built with that object hidden, by its osm2pgsql id:

* ``venue_context`` – a POI's category group (labels.VENUE_GROUPS) with the POI itself removed
  (its marker, and for an area POI its polygon in every channel): Space2Vec's setup.
* ``transport_context`` – the mode of the way under a GPS-like point (labels.TRANSPORT_MODES) with
  that whole way removed (every table osm2pgsql put it in).
* ``building_type`` – the ``building=*`` group (BUILDING_GROUPS) of a building, at a point on its
  surface (no jitter: the building is the place). The footprint stays drawn (channel ``buildings``,
  tag count ``area_building``); everything else the polygon carries (a POI marker from its
  ``amenity``/``shop`` tags, land use, …) is hidden, and no featureset counts building types.
  ``building=yes`` (most buildings) says nothing and is not a label.

One attribute task (``ATTRIBUTE_TASKS``, beside the three ``MASKED_TASKS``, which alone the champion gate
scores): the label is a tag that no channel draws and no featureset counts, so nothing needs hiding, and the
object stays in every input:

* ``road_surface`` – is the road under a GPS-like point paved or unpaved (``surface=*``, grouped as
  SURFACE_GROUPS, after the OSM wiki's "data users may treat this as" column; ambiguous values such as
  ``wood`` or ``grass_paver`` are no label)? One point per road, at the middle of its way, jittered as the
  transport points; roads are the highways the three road channels draw. The road's class is drawn (a
  track looks like a track): the question is whether the scene says more about the surface than that,
  which is what ``nearest_way`` (the distance to the nearest road of each mode) gives an engineer.

Each frame has the consumer labels' columns plus ``hidden_table`` ("point" or "way") and ``hidden_id``
(the id in that table: a node's, a way's, or minus a relation's).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from psycopg2 import sql

from loc2vec.core.config import LabelConfig
from loc2vec.core.errors import ConfigError
from loc2vec.core.geo import from_mercator
from loc2vec.core.names import validate_region_name
from loc2vec.evaluation.labels import LabelSource, finish_labels, margin_box, transport_labels, venue_labels
from loc2vec.osm.db import cursor
from loc2vec.raster.channels import MAJOR_ROADS, MINOR_ROADS, PATHS
from loc2vec.raster.render import HiddenObject
from loc2vec.sampling.land import ENVELOPE

log = logging.getLogger(__name__)

MASKED_TASKS: tuple[str, ...] = ("venue_context", "transport_context", "building_type")  # the champion gate's three
ATTRIBUTE_TASKS: tuple[str, ...] = ("road_surface",)  # a tag no input renders or counts: nothing to hide
LEAKFREE_TASKS: tuple[str, ...] = (*MASKED_TASKS, *ATTRIBUTE_TASKS)  # every featureset from each label's scene
NEAREST_WAY_TASKS: tuple[str, ...] = ("transport", "transport_context", "road_surface")  # the tasks nearest_way is for

# surface=* value → group (OSM wiki Key:surface, "data users may treat this as"; ambiguous values are no label)
SURFACE_GROUPS: dict[str, tuple[str, ...]] = {
    "paved": (
        "paved", "asphalt", "chipseal", "concrete", "concrete:lanes", "concrete:plates", "paving_stones", "sett",
        "unhewn_cobblestone", "cobblestone", "bricks", "metal",
    ),
    "unpaved": (
        "unpaved", "compacted", "fine_gravel", "gravel", "shells", "rock", "pebblestone", "ground", "dirt", "earth",
        "grass", "mud", "sand", "woodchips",
    ),
}  # fmt: skip
DRAWN_ROADS = f"(highway IN {MAJOR_ROADS} OR highway IN {MINOR_ROADS} OR highway IN {PATHS})"  # the road channels

# building=* value → group (values seen in Liechtenstein and Andorra and their near synonyms; `yes` is no type)
BUILDING_GROUPS: dict[str, tuple[str, ...]] = {
    "residential": (
        "house", "detached", "residential", "apartments", "semidetached_house", "terrace", "bungalow",
        "dormitory", "farm", "cabin",
    ),
    "commercial_retail": ("commercial", "office", "retail", "hotel", "supermarket", "kiosk"),
    "industrial_agricultural": (
        "industrial", "warehouse", "stable", "barn", "farm_auxiliary", "greenhouse", "cowshed", "sty", "silo",
        "greenhouse_horticulture", "transportation", "hangar", "service", "train_station",
    ),
    "civic_education_religious": (
        "school", "kindergarten", "university", "college", "church", "chapel", "cathedral", "religious",
        "civic", "government", "public", "hospital", "fire_station", "stadium", "sports_centre", "sports_hall",
    ),
    "outbuilding": ("shed", "garage", "garages", "carport", "roof", "hut", "allotment_house"),
}  # fmt: skip
KEEP_CHANNELS: dict[str, tuple[str, ...]] = {"building_type": ("buildings",)}  # drawn although hidden
KEEP_TAG_COUNTS: dict[str, tuple[str, ...]] = {"building_type": ("area_building",)}  # counted although hidden


def hidden_object(task: str, table: str, osm_id: int) -> HiddenObject:
    """The object a task's label hides from its scene (building_type keeps the footprint)."""
    return HiddenObject(table, int(osm_id), KEEP_CHANNELS.get(task, ()))  # type: ignore[arg-type]


def _with_hidden(labels: pd.DataFrame, task: str) -> pd.DataFrame:
    """Rename the consumer task and name each label's hidden object (nodes: point table; else line/polygon;
    id 0: nothing hidden, the attribute tasks)."""
    out = labels.copy()
    out["task"] = task
    out["label_id"] = [f"{r}:{task}:{i}" for i, r in enumerate(out["region"])]
    out["hidden_table"] = np.where(out["osm_kind"] == "node", "point", "way")
    out["hidden_id"] = np.zeros(len(out), dtype="int64") if task in ATTRIBUTE_TASKS else out["osm_id"].astype("int64")
    return out


def _grouped_case(column: str, groups: dict[str, tuple[str, ...]]) -> sql.Composable:
    """CASE mapping a tag column's values to their group (NULL: in no group)."""
    whens = [
        sql.SQL("WHEN {} IN ({}) THEN {}").format(
            sql.Identifier(column), sql.SQL(", ").join(map(sql.Literal, values)), sql.Literal(g)
        )
        for g, values in groups.items()
    ]
    return sql.SQL("CASE {} END").format(sql.SQL(" ").join(whens))


def _candidate_frame(query: sql.Composable, env: tuple[float, ...], source: LabelSource, kind: str) -> pd.DataFrame:
    """A candidates query's rows (label, Mercator x, y, osm_id) as label, osm_id, lon0, lat0 and osm_kind."""
    with cursor(source.info) as cur:
        cur.execute(query, env + env)
        rows = cur.fetchall()
    df = pd.DataFrame(rows, columns=["label", "x", "y", "osm_id"])
    df["lon0"], df["lat0"] = from_mercator(df["x"].to_numpy(float), df["y"].to_numpy(float))
    df["osm_kind"] = kind
    return df.drop(columns=["x", "y"])


def _group_counts(query: sql.Composable, source: LabelSource) -> dict[str, int]:
    """A coverage query's (group, count) rows as a dict."""
    with cursor(source.info) as cur:
        cur.execute(query)
        return {str(k): int(v) for k, v in cur.fetchall()}


def _per_group(
    region: str,
    cands: pd.DataFrame,
    groups: dict[str, tuple[str, ...]],
    per_class: int,
    cfg: LabelConfig,
    seed: int,
    what: str,
) -> pd.DataFrame:
    """At most per_class seeded candidates of each group that has at least min_per_class of them."""
    rng = np.random.default_rng([cfg.seed, seed])
    parts = []
    for group in groups:
        pool = cands[cands["label"] == group]
        if len(pool) < cfg.min_per_class:
            log.info("%s: %s group %s has %d (< %d): dropped", region, what, group, len(pool), cfg.min_per_class)
            continue
        parts.append(pool.iloc[np.sort(rng.permutation(len(pool))[:per_class])])
    if len(parts) < 2:
        raise ConfigError(f"region {region!r} has fewer than two {what} groups with ≥ {cfg.min_per_class} labels")
    return pd.concat(parts, ignore_index=True)


def building_candidates(region: str, env: tuple[float, ...], source: LabelSource) -> pd.DataFrame:
    """Every building polygon inside env with a grouped type: group, a point on its surface, its id."""
    query = sql.SQL(
        """SELECT label, ST_X(g), ST_Y(g), osm_id FROM (
             SELECT {case} AS label, ST_PointOnSurface(way) AS g, osm_id FROM {s}.planet_osm_polygon
             WHERE building IS NOT NULL AND way && {env}
           ) c WHERE label IS NOT NULL AND g && {env} ORDER BY label, osm_id"""
    ).format(case=_grouped_case("building", BUILDING_GROUPS), s=sql.Identifier(region), env=sql.SQL(ENVELOPE))
    return _candidate_frame(query, env, source, "area")


def building_coverage(region: str, source: LabelSource) -> dict[str, int]:
    """Buildings of the region by group, plus `untyped` (building=yes) and `other` (a type in no group)."""
    validate_region_name(region)
    query = sql.SQL(
        "SELECT COALESCE({case}, CASE WHEN building = 'yes' THEN 'untyped' ELSE 'other' END), count(*)"
        " FROM {s}.planet_osm_polygon WHERE building IS NOT NULL AND building <> 'no' GROUP BY 1 ORDER BY 1"
    ).format(case=_grouped_case("building", BUILDING_GROUPS), s=sql.Identifier(region))
    return _group_counts(query, source)


def building_labels(region: str, cfg: LabelConfig, source: LabelSource) -> pd.DataFrame:
    """At most building_per_class typed buildings per group with at least min_per_class of them."""
    validate_region_name(region)
    _, env = margin_box(region, cfg, source)
    cands = building_candidates(region, env, source)
    picked = _per_group(region, cands, BUILDING_GROUPS, cfg.building_per_class, cfg, 4, "building")
    still = cfg.model_copy(update={"jitter_m": 0.0})  # the building is the place: no GPS noise
    rng = np.random.default_rng([cfg.seed, 5])
    return finish_labels(region, "building_type", picked, still, rng, source.h3_resolution)


def surface_candidates(region: str, env: tuple[float, ...], source: LabelSource) -> pd.DataFrame:
    """Every drawn road inside env with a grouped surface: group, the middle of its way, its id (one row per way:
    osm2pgsql may split a long way, the longest piece is taken)."""
    query = sql.SQL(
        """SELECT label, ST_X(g), ST_Y(g), osm_id FROM (
             SELECT DISTINCT ON (osm_id) {case} AS label, ST_LineInterpolatePoint(way, 0.5) AS g, osm_id
             FROM {s}.planet_osm_line
             WHERE osm_id > 0 AND surface IS NOT NULL AND ({roads}) AND way && {env}
             ORDER BY osm_id, ST_Length(way) DESC
           ) c WHERE label IS NOT NULL AND g && {env} ORDER BY label, osm_id"""
    ).format(
        case=_grouped_case("surface", SURFACE_GROUPS),
        s=sql.Identifier(region),
        roads=sql.SQL(DRAWN_ROADS),
        env=sql.SQL(ENVELOPE),
    )
    return _candidate_frame(query, env, source, "way")


def surface_coverage(region: str, source: LabelSource) -> dict[str, int]:
    """Drawn roads (ways) of the region by surface group, plus `untagged` (no surface) and `other` (no group)."""
    validate_region_name(region)
    query = sql.SQL(
        "SELECT COALESCE({case}, CASE WHEN surface IS NULL THEN 'untagged' ELSE 'other' END), count(DISTINCT osm_id)"
        " FROM {s}.planet_osm_line WHERE osm_id > 0 AND ({roads}) GROUP BY 1 ORDER BY 1"
    ).format(case=_grouped_case("surface", SURFACE_GROUPS), s=sql.Identifier(region), roads=sql.SQL(DRAWN_ROADS))
    return _group_counts(query, source)


def surface_labels(region: str, cfg: LabelConfig, source: LabelSource) -> pd.DataFrame:
    """At most surface_per_class roads per surface group with at least min_per_class of them, jittered."""
    validate_region_name(region)
    _, env = margin_box(region, cfg, source)
    cands = surface_candidates(region, env, source)
    picked = _per_group(region, cands, SURFACE_GROUPS, cfg.surface_per_class, cfg, 6, "surface")
    rng = np.random.default_rng([cfg.seed, 7])
    return finish_labels(region, "road_surface", picked, cfg, rng, source.h3_resolution)


def make_leakfree_labels(region: str, task: str, cfg: LabelConfig, source: LabelSource) -> pd.DataFrame:
    """The labels of one leak-free task, each naming the object its scene hides.

    Args:
        region: an ingested region.
        task: one of LEAKFREE_TASKS.
        cfg: params `evaluate.labels`.
        source: the database, tile radius and H3 resolution.

    Returns:
        The labels frame (labels.LABEL_COLUMNS + hidden_table, hidden_id).
    """
    if task == "venue_context":
        labels = venue_labels(region, cfg, source)
    elif task == "transport_context":
        labels = transport_labels(region, cfg, source)
    elif task == "building_type":
        labels = building_labels(region, cfg, source)
    elif task == "road_surface":
        labels = surface_labels(region, cfg, source)
    else:
        raise ConfigError(f"unknown leak-free task {task!r}; tasks are {', '.join(LEAKFREE_TASKS)}")
    return _with_hidden(labels, task)
