"""Downstream labels taken from OpenStreetMap itself, for evaluating location embeddings.

Two tasks, both built from the region's PostGIS import, so any ingested region has them:

* **transport** – "which way is this GPS fix on?". Points uniformly along the ways of each mode
  (a point at a uniform arc length of the mode's whole network, clipped to the inner bbox, so a
  way is picked with probability ∝ its true length), ``transport_per_class`` per mode (balanced):

  ===========  ==================================================================================
  ``car``      highway = motorway … tertiary (+ links), residential, unclassified, living_street,
               service, road (tracks and busways are not car roads)
  ``rail``     railway = rail, tram, light_rail, subway, narrow_gauge, funicular, monorail, preserved
  ``cycle``    highway = cycleway
  ``foot``     highway = footway, pedestrian, path, steps
  ``ferry``    route = ferry
  ===========  ==================================================================================

  A mode is kept only where its network is at least ``min_mode_length_m`` long (Liechtenstein has
  no ferry), otherwise its N points would be near-duplicates of a few metres of way.

* **venue** – "what kind of place is this POI?". Every POI (point, or ``ST_PointOnSurface`` of an
  area) whose tags fall in one of the groups of ``VENUE_GROUPS`` (first match wins), at most
  ``venue_per_class`` per group (a seeded random subset); groups with fewer than
  ``min_per_class`` POIs are dropped. Private garden pools (leisure=swimming_pool) and street
  furniture are not venues.

**GPS-like noise.** Every label point is moved by independent N(0, σ²) metres east and north
(σ = ``jitter_m``, 15 m by default, a phone's typical fix error); the un-jittered position is kept
as ``lat0``/``lon0``, with the OSM object (``osm_kind``, ``osm_id``) it came from. All randomness is a
numpy Generator seeded with (seed, task), and SQL returns candidates in a fixed ORDER BY, so the same
params and import give identical labels.

**Time.** Each label carries an ``event_timestamp`` (tz-aware UTC): when the observation happened.
Feast's point-in-time join gives a label the newest feature row *at or before* that time, so labels
must be later than the embeddings they are joined with. By default (``label_time: now``) they are
stamped with the moment they are made, which follows any embedding already written; an ISO-8601
time can be given instead to replay a historical evaluation.

Points lie inside the import bbox shrunk by the tile radius plus 5σ (and a 50 m margin for the H3
cell centre), so the tile of their cell is inside the rendered data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import h3
import numpy as np
import pandas as pd
from psycopg2 import sql

from loc2vec.core.config import LabelConfig
from loc2vec.core.errors import ConfigError
from loc2vec.core.geo import from_mercator, inner_bbox, offset_m, to_mercator
from loc2vec.core.names import validate_region_name
from loc2vec.osm.db import ConnInfo, cursor, require_import
from loc2vec.raster.channels import MAJOR_ROADS, RAIL
from loc2vec.sampling.land import ENVELOPE

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("transport", "venue")
LABEL_COLUMNS = [
    "label_id", "region", "task", "label", "lat", "lon", "lat0", "lon0", "h3_cell", "osm_kind", "osm_id",
    "event_timestamp",
]  # fmt: skip
CAR_ROADS = "(" + MAJOR_ROADS.strip("()") + ",'residential','unclassified','living_street','service','road')"

# mode → WHERE over planet_osm_line (constants of the code; ways only, not route relations)
TRANSPORT_MODES: dict[str, str] = {
    "car": f"highway IN {CAR_ROADS}",
    "rail": f"railway IN {RAIL}",
    "cycle": "highway = 'cycleway'",
    "foot": "highway IN ('footway','pedestrian','path','steps')",
    "ferry": "route = 'ferry'",
}

# group → WHERE over planet_osm_point / planet_osm_polygon (`tags` is the hstore of other keys)
VENUE_GROUPS: dict[str, str] = {
    "food_drink": "amenity IN ('restaurant','cafe','bar','pub','fast_food','biergarten','ice_cream',"
    "'food_court','nightclub')",
    "shop": "shop IS NOT NULL",
    "education": "amenity IN ('school','kindergarten','university','college','childcare','music_school',"
    "'language_school','driving_school','research_institute')",
    "health": "amenity IN ('pharmacy','doctors','hospital','dentist','clinic','veterinary','nursing_home')"
    " OR tags ? 'healthcare'",
    "lodging": "tourism IN ('hotel','guest_house','hostel','motel','apartment','chalet','alpine_hut',"
    "'camp_site','caravan_site','wilderness_hut')",
    "leisure_sport": "leisure IN ('sports_centre','pitch','fitness_centre','fitness_station','stadium','track',"
    "'sports_hall','golf_course','miniature_golf','ice_rink','playground','water_park','horse_riding',"
    "'swimming_area','bowling_alley')",
    "transport": "amenity IN ('bus_station','parking','fuel','charging_station','car_wash','car_rental',"
    "'car_sharing','ferry_terminal','taxi','bicycle_rental') OR railway IN ('station','halt')"
    " OR public_transport = 'station'",
    "culture_worship": "amenity IN ('place_of_worship','theatre','library','arts_centre','cinema',"
    "'community_centre','events_venue','events_centre') OR tourism IN ('museum','gallery')",
    "civic_finance": "amenity IN ('bank','atm','post_office','townhall','police','fire_station','courthouse',"
    "'public_building','embassy')",
}


@dataclass(frozen=True)
class LabelSource:
    """Where labels come from: the database, the tile radius (labels keep their tiles inside the data) and
    the H3 resolution of the published cells (each label names its cell)."""

    info: ConnInfo
    radius_m: float
    h3_resolution: int


# ---------------------------------------------------------------- shared helpers


def jitter(lat: np.ndarray, lon: np.ndarray, sigma_m: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Move each point by N(0, σ²) true metres east and north (a GPS fix's error)."""
    east, north = rng.normal(0.0, sigma_m, (2, len(lat)))
    return offset_m(lat, lon, north, east)


def margin_box(
    region: str, cfg: LabelConfig, source: LabelSource
) -> tuple[tuple[float, float, float, float], tuple[float, ...]]:
    """The inner bbox (degrees) and its Mercator envelope: tiles of jittered points stay inside the data."""
    box = inner_bbox(require_import(region, source.info).bbox, source.radius_m + 5.0 * cfg.jitter_m + 50.0)
    x0, y0 = to_mercator(box[0], box[1])
    x1, y1 = to_mercator(box[2], box[3])
    return box, (float(x0), float(y0), float(x1), float(y1))


def finish_labels(
    region: str, task: str, df: pd.DataFrame, cfg: LabelConfig, rng: np.random.Generator, res: int
) -> pd.DataFrame:
    """Jitter, H3 cells, ids and the observation time; one row per label in a stable order."""
    df = df.sort_values(["label", "osm_kind", "osm_id", "lat0", "lon0"], kind="stable").reset_index(drop=True)
    lat, lon = jitter(df["lat0"].to_numpy(), df["lon0"].to_numpy(), cfg.jitter_m, rng)
    df["lat"], df["lon"] = lat, lon
    df["h3_cell"] = [h3.latlng_to_cell(float(a), float(b), res) for a, b in zip(lat, lon, strict=True)]
    df["region"], df["task"] = region, task
    df["label_id"] = [f"{region}:{task}:{i}" for i in range(len(df))]
    df["event_timestamp"] = pd.Timestamp(cfg.event_time())
    return df[LABEL_COLUMNS]


# ---------------------------------------------------------------- transport


def _mode_segments(
    region: str, mode: str, env: tuple[float, ...], info: ConnInfo
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, osm_ids) of every straight segment of the mode's ways, clipped to env (Mercator)."""
    query = sql.SQL(
        """SELECT l.osm_id, ST_AsBinary(ST_Force2D(d.geom), 'NDR') FROM {s}.planet_osm_line l,
             LATERAL ST_Dump(ST_CollectionExtract(ST_Intersection(l.way, {env}), 2)) d
           WHERE l.osm_id > 0 AND ({mode}) AND l.way && {env}
           ORDER BY l.osm_id, d.path"""
    ).format(s=sql.Identifier(region), mode=sql.SQL(TRANSPORT_MODES[mode]), env=sql.SQL(ENVELOPE))
    starts, ends, ids = [], [], []
    with cursor(info) as cur:
        cur.execute(query, env + env)
        for osm_id, wkb in cur:
            buf = bytes(wkb)
            npts = int.from_bytes(buf[5:9], "little")
            xy = np.frombuffer(buf, dtype="<f8", offset=9, count=2 * npts).reshape(npts, 2)
            starts.append(xy[:-1])
            ends.append(xy[1:])
            ids.append(np.full(npts - 1, osm_id, dtype=np.int64))
    if not starts:
        return np.empty((0, 2)), np.empty((0, 2)), np.empty(0, dtype=np.int64)
    return np.concatenate(starts), np.concatenate(ends), np.concatenate(ids)


def transport_labels(region: str, cfg: LabelConfig, source: LabelSource) -> pd.DataFrame:
    """Balanced, jittered points on the ways of each transport mode (see the module docstring)."""
    validate_region_name(region)
    _, env = margin_box(region, cfg, source)
    rng = np.random.default_rng([cfg.seed, 0])
    parts = []
    for mode in TRANSPORT_MODES:
        a, b, ids = _mode_segments(region, mode, env, source.info)
        _, lat_mid = from_mercator(0.0, (a[:, 1] + b[:, 1]) / 2) if len(a) else (None, np.empty(0))
        cum = np.cumsum(np.hypot(*(b - a).T) * np.cos(np.radians(lat_mid))) if len(a) else np.zeros(1)
        if cum[-1] < cfg.min_mode_length_m:
            log.info(
                "%s: transport mode %s has %.0f m of ways (< %.0f): dropped",
                region,
                mode,
                cum[-1],
                cfg.min_mode_length_m,
            )
            continue
        s = rng.uniform(0.0, cum[-1], cfg.transport_per_class)
        i = np.minimum(np.searchsorted(cum, s, side="right"), len(cum) - 1)
        seg0 = np.where(i > 0, cum[i - 1], 0.0)
        t = np.clip((s - seg0) / np.maximum(cum[i] - seg0, 1e-12), 0.0, 1.0)
        xy = a[i] + (b[i] - a[i]) * t[:, None]
        lon, lat = from_mercator(xy[:, 0], xy[:, 1])
        parts.append(pd.DataFrame({"label": mode, "lat0": lat, "lon0": lon, "osm_kind": "way", "osm_id": ids[i]}))
        log.info("%s: %d %s points on %.1f km of ways", region, len(lat), mode, cum[-1] / 1000)
    if len(parts) < 2:
        raise ConfigError(f"region {region!r} has fewer than two transport modes with enough ways")
    rng = np.random.default_rng([cfg.seed, 1])
    return finish_labels(region, "transport", pd.concat(parts, ignore_index=True), cfg, rng, source.h3_resolution)


# ---------------------------------------------------------------- venue


def _venue_case() -> sql.Composable:
    whens = [sql.SQL("WHEN {} THEN {}").format(sql.SQL(f"({w})"), sql.Literal(g)) for g, w in VENUE_GROUPS.items()]
    return sql.SQL("CASE {} END").format(sql.SQL(" ").join(whens))


def venue_candidates(region: str, env: tuple[float, ...], info: ConnInfo) -> pd.DataFrame:
    """Every POI of a venue group inside env: group, position, source object."""
    query = sql.SQL(
        """SELECT label, ST_X(g), ST_Y(g), kind, osm_id FROM (
             SELECT {case} AS label, way AS g, 'node' AS kind, osm_id FROM {s}.planet_osm_point
             UNION ALL SELECT {case}, ST_PointOnSurface(way), 'area', osm_id FROM {s}.planet_osm_polygon
           ) c WHERE label IS NOT NULL AND g && {env} ORDER BY label, kind, osm_id, ST_X(g), ST_Y(g)"""
    ).format(case=_venue_case(), s=sql.Identifier(region), env=sql.SQL(ENVELOPE))
    with cursor(info) as cur:
        cur.execute(query, env)
        rows = cur.fetchall()
    df = pd.DataFrame(rows, columns=["label", "x", "y", "osm_kind", "osm_id"])
    df["lon0"], df["lat0"] = from_mercator(df["x"].to_numpy(float), df["y"].to_numpy(float))
    return df.drop(columns=["x", "y"])


def venue_labels(region: str, cfg: LabelConfig, source: LabelSource) -> pd.DataFrame:
    """At most venue_per_class jittered POIs per venue group with enough POIs (see the module docstring)."""
    validate_region_name(region)
    _, env = margin_box(region, cfg, source)
    cands = venue_candidates(region, env, source.info)
    rng = np.random.default_rng([cfg.seed, 2])
    parts = []
    for group in VENUE_GROUPS:
        pool = cands[cands["label"] == group]
        if len(pool) < cfg.min_per_class:
            log.info("%s: venue group %s has %d POIs (< %d): dropped", region, group, len(pool), cfg.min_per_class)
            continue
        take = np.sort(rng.permutation(len(pool))[: cfg.venue_per_class])
        parts.append(pool.iloc[take])
    if len(parts) < 2:
        raise ConfigError(f"region {region!r} has fewer than two venue groups with ≥ {cfg.min_per_class} POIs")
    rng = np.random.default_rng([cfg.seed, 3])
    return finish_labels(region, "venue", pd.concat(parts, ignore_index=True), cfg, rng, source.h3_resolution)


def make_labels(region: str, task: str, cfg: LabelConfig, source: LabelSource) -> pd.DataFrame:
    """The labels of one task of a region (transport or venue)."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
    return (transport_labels if task == "transport" else venue_labels)(region, cfg, source)


def class_counts(labels: pd.DataFrame) -> dict[str, int]:
    """Labels per class, in class order."""
    return {str(k): int(v) for k, v in labels["label"].value_counts().sort_index().items()}
