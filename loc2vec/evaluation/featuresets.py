"""Featuresets: what a classifier sees of a labelled point, loc2vec and the baselines it is compared with.

* ``loc2vec`` – the embedding of the point's H3 cell, from Feast: *historical* (point-in-time)
  retrieval for training rows, the *online* store for test rows, exactly as a consumer model
  trains and serves (``TransportModeClassifier.fit_from_feast`` / ``predict_online``).
* ``latlon`` – the point's latitude and longitude (standardised by the classifier): pure position.
* ``histogram`` – the cell's 12 channel fractions (non-zero pixels per channel of its tile), from
  Feast with the embedding: what the tile holds, without the encoder's spatial reasoning.
* ``random_encoder`` – the same Encoder architecture, untrained (seeded init, eval mode), applied to
  the cell's tile (cut at the H3 cell centre from the region's metatiles): separates what training
  taught from what a random convolutional projection of the tile already carries.
* ``tag_counts`` – hand-made OSM features: log(1 + count) of ways per transport mode, POIs per
  venue group and polygons per land-cover class intersecting the tile disc (render.radius_m) around
  the point, counted in PostGIS. For the venue task the labelled POI itself is left out of its own
  counts (else its category would be read off its own tag: label leakage).
* ``a+b`` – any featuresets concatenated (e.g. ``loc2vec+histogram``).

Not in the default list: ``tag_counts_cell``, embed's per-cell counts from the Feast ``tag_counts`` view
(they include the labelled POI itself, so on the venue task they leak the label).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import h3
import numpy as np
import pandas as pd
from psycopg2 import sql

from loc2vec.core.config import EvaluateConfig
from loc2vec.core.errors import ConfigError, Loc2VecError
from loc2vec.core.geo import to_mercator
from loc2vec.core.names import validate_region_name
from loc2vec.evaluation.context import EvaluationContext
from loc2vec.evaluation.labels import TRANSPORT_MODES, VENUE_GROUPS
from loc2vec.osm.db import cursor
from loc2vec.serving import lookup
from loc2vec.serving.store import feature_store

Mode = Literal["historical", "online"]
FeatureFn = Callable[[pd.DataFrame, Mode, str], np.ndarray]  # (points, mode, Feast service) → (n, d), NaN rows


def points_frame(
    lats: Sequence[float], lons: Sequence[float], resolution: int, region: str | None = None
) -> pd.DataFrame:
    """Query points as the featuresets take them (no source object to leave out)."""
    lat, lon = np.asarray(lats, dtype=float), np.asarray(lons, dtype=float)
    return pd.DataFrame(
        {
            "region": region,
            "lat": lat,
            "lon": lon,
            "h3_cell": [h3.latlng_to_cell(float(a), float(b), resolution) for a, b in zip(lat, lon, strict=True)],
            "osm_kind": None,
            "osm_id": 0,
        }
    )


def _vectors(values: pd.Series) -> np.ndarray:
    """A column of lists/arrays (None/NaN where missing) → (n, d) float array with NaN rows."""
    rows = [None if _missing(v) else np.asarray(v, dtype=float) for v in values]
    d = next((len(v) for v in rows if v is not None), 1)  # all missing: one NaN column, never zero columns
    out = np.full((len(rows), d), np.nan)
    for i, v in enumerate(rows):
        if v is not None:
            out[i] = v
    return out


def _missing(v: Any) -> bool:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return True
    return hasattr(v, "__len__") and len(v) == 0


FEAST_VIEWS: dict[str, str] = {
    "embedding": "location_embedding",
    "histogram": "tile_histogram",
    "tag_counts": "tag_counts",
}
_HISTORICAL: dict[str, pd.DataFrame] = {}  # the last point-in-time join per service: one join serves every column


def _historical(points: pd.DataFrame, service: str, ctx: EvaluationContext) -> pd.DataFrame:
    """The service's features as of each point's event_timestamp (row-aligned; NaN/None before publication)."""
    entity = pd.DataFrame(
        {"h3_cell": points["h3_cell"].to_numpy(dtype=str), "event_timestamp": points["event_timestamp"]}
    )
    key = f"{ctx.store}:{service}:{pd.util.hash_pandas_object(entity, index=False).sum()}"
    if key not in _HISTORICAL:
        _HISTORICAL.clear()
        _HISTORICAL[key] = lookup.historical_features(entity, service, ctx.store)  # row-aligned, duplicates included
    return _HISTORICAL[key]


def _online(points: pd.DataFrame, column: str, ctx: EvaluationContext) -> pd.DataFrame:
    """Online values of one feature per point: the consumer API for embeddings, the view for baselines."""
    lats, lons = points["lat"].to_numpy(float), points["lon"].to_numpy(float)
    if column == "embedding":  # raises LocationNotPublishedError for an unknown cell: never silent zeros
        return lookup.get_location_embeddings(lats, lons, ctx.store)
    rows = {"h3_cell": lookup.cells_for(lats, lons, ctx.store.h3_resolution)}
    online = feature_store(ctx.store).get_online_features([f"{FEAST_VIEWS[column]}:{column}"], rows)
    return pd.DataFrame(online.to_dict())


class FeastFeature:
    """A Feast feature of the point's H3 cell: point-in-time from the service (historical) or online.

    For the embedding it records which model versions served it, so an evaluation can refuse mixed
    embedding spaces and tag the version that was actually evaluated.
    """

    def __init__(self, column: str, ctx: EvaluationContext):
        if column not in FEAST_VIEWS:
            raise ConfigError(f"no Feast view serves {column!r}; known: {sorted(FEAST_VIEWS)}")
        self.column = column
        self.ctx = ctx
        self.served: set[tuple[str | None, str]] = set()  # (model name, None on the historical path; version)

    def __call__(self, points: pd.DataFrame, mode: Mode, service: str) -> np.ndarray:
        """(n, d) values of the points' cells: historical as of each point's time, or online; NaN rows unknown."""
        frame = (
            _historical(points, service, self.ctx) if mode == "historical" else _online(points, self.column, self.ctx)
        )
        if self.column == "embedding":
            names = frame["model_name"] if "model_name" in frame else pd.Series([None] * len(frame))
            for name, version in zip(names, frame["model_version"], strict=True):
                if isinstance(version, str):
                    self.served.add((name, version))
        return _vectors(frame[self.column].reset_index(drop=True))

    def served_model(self) -> dict[str, str]:
        """{name, version} of the one model version that served; an error if several did."""
        versions = {v for _, v in self.served}
        if len(versions) > 1:
            raise Loc2VecError(
                f"the evaluated embeddings come from several model versions {sorted(versions)}: embed every "
                "region involved with the same champion and publish again"
            )
        names = {n for n, _ in self.served if n}
        return {"name": names.pop(), "version": versions.pop()} if names and versions else {}


def latlon_features(points: pd.DataFrame, mode: Mode) -> np.ndarray:
    """(n, 2): latitude and longitude (pure position, the weakest baseline)."""
    return points[["lat", "lon"]].to_numpy(dtype=float)


def cell_centres(cells: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(latitudes, longitudes) of H3 cells' centres."""
    ll = np.asarray([h3.cell_to_latlng(c) for c in cells], dtype=float).reshape(-1, 2)
    return ll[:, 0], ll[:, 1]


def random_encoder_features(
    points: pd.DataFrame, mode: Mode, ctx: EvaluationContext, seed: int = 0, batch_size: int = 64
) -> np.ndarray:
    """The untrained, seeded Encoder on each point's cell tile (cut at the cell centre, no rotation/shift)."""
    import torch

    from loc2vec.training.model import Encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = Encoder(ctx.model).eval()
    return encoder_features(points, encoder, ctx, batch_size)


def encoder_features(points: pd.DataFrame, encoder, ctx: EvaluationContext, batch_size: int = 64) -> np.ndarray:
    """`encoder` (eval mode) on each point's cell tile, cut at the cell centre from the region's metatiles.

    The tile embedding/ encodes for the cell: a trained model scored this way scores as its published
    embeddings would (the champion gate, evaluation/gate.py, compares models before publishing).
    """
    import torch

    from loc2vec.training.model import to_input

    def run(tiles: torch.Tensor) -> np.ndarray:
        with torch.no_grad():  # not inference_mode: the cutter's worker threads fill a normal tensor
            return encoder(to_input(tiles)).numpy()

    return cell_tile_features(points, run, encoder.cfg.embedding_dim, ctx, batch_size)


def cell_tile_features(
    points: pd.DataFrame, fn: Callable[[Any], np.ndarray], dim: int, ctx: EvaluationContext, batch_size: int = 64
) -> np.ndarray:
    """(n, dim): `fn` of batches of each point's cell tile (uint8 torch tensors cut from the region's metatiles).

    Args:
        points: points with region and h3_cell.
        fn: (b, 12, s, s) uint8 tensor → (b, dim) array.
        dim: the width of fn's output.
        ctx: metatile geometry, paths, database and runner.
        batch_size: tiles per call.

    Returns:
        Row-aligned features (each distinct cell computed once).
    """
    from loc2vec.raster.cutter import cut_tiles
    from loc2vec.raster.metatiles import ensure_metatiles

    out = np.full((len(points), dim), np.nan)
    for region, group in points.groupby("region", sort=True):
        cells, inverse = np.unique(group["h3_cell"].to_numpy(dtype=str), return_inverse=True)
        lats, lons = cell_centres(cells)
        name = str(region)
        index = ensure_metatiles(
            name,
            lats,
            lons,
            spec=ctx.spec,
            paths=ctx.paths,
            info=ctx.info,
            orchestrate=ctx.orchestrate,
            progress=False,
        )
        emb = np.empty((len(cells), dim))
        for i in range(0, len(cells), batch_size):
            sl = slice(i, i + batch_size)
            n = len(lats[sl])
            tiles = cut_tiles(index, lats[sl], lons[sl], np.zeros(n), np.zeros((n, 2)), device="cpu")
            emb[sl] = fn(tiles)
        out[np.flatnonzero(points["region"].to_numpy() == region)] = emb[inverse]
    return out


# tag categories: ways per transport mode, POIs per venue group, polygons per land cover
LAND_COVER: dict[str, str] = {
    "building": "building IS NOT NULL AND building <> 'no'",
    "residential": "landuse = 'residential'",
    "commercial_industrial": "landuse IN ('industrial','commercial','retail','railway','construction')",
    "farmland": "landuse IN ('farmland','farmyard','orchard','vineyard','meadow','allotments')",
    "green": "landuse IN ('forest','grass','recreation_ground','village_green') OR leisure IN ('park','garden')"
    " OR \"natural\" IN ('wood','scrub','grassland','heath')",
    "water": "\"natural\" = 'water' OR water IS NOT NULL OR waterway IN ('riverbank','dock')",
}
EXTRA_LINES: dict[str, str] = {"track": "highway = 'track'", "waterway": "waterway IS NOT NULL"}
TAG_COLUMNS: tuple[str, ...] = (
    *(f"way_{m}" for m in (*TRANSPORT_MODES, *EXTRA_LINES)),
    *(f"poi_{g}" for g in VENUE_GROUPS),
    *(f"area_{c}" for c in LAND_COVER),
)
POI_COLUMNS = "amenity, shop, tourism, leisure, railway, public_transport, tags"


def _counts(filters: Mapping[str, str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL("count(*) FILTER (WHERE {})").format(sql.SQL(f"({w})")) for w in filters.values())


def tag_count_features(points: pd.DataFrame, mode: Mode, ctx: EvaluationContext) -> np.ndarray:
    """log1p counts of tagged OSM objects intersecting the tile disc; a point's own POI is left out."""
    radius = ctx.radius_m
    out = np.full((len(points), len(TAG_COLUMNS)), np.nan)
    for region, group in points.groupby("region", sort=True):
        validate_region_name(str(region))
        lat, lon = group["lat"].to_numpy(float), group["lon"].to_numpy(float)
        x, y = to_mercator(lon, lat)
        d = radius / np.cos(np.radians(lat))  # true metres → Mercator units
        kind = [k if k in ("node", "area") else "" for k in group["osm_kind"].fillna("")]
        query = sql.SQL(
            """SELECT l.*, q.*, g.*
               FROM unnest(%s::float8[], %s::float8[], %s::float8[], %s::text[], %s::int8[]) WITH ORDINALITY
                    AS p(x, y, d, kind, ex, i)
               CROSS JOIN LATERAL (SELECT ST_SetSRID(ST_MakePoint(p.x, p.y), 3857) AS pt) c
               CROSS JOIN LATERAL (SELECT {lines} FROM {s}.planet_osm_line
                                   WHERE osm_id > 0 AND ST_DWithin(way, c.pt, p.d)) l
               CROSS JOIN LATERAL (SELECT {pois} FROM (
                      SELECT 'node' AS kind, osm_id, {cols} FROM {s}.planet_osm_point WHERE ST_DWithin(way, c.pt, p.d)
                      UNION ALL
                      SELECT 'area', osm_id, {cols} FROM {s}.planet_osm_polygon WHERE ST_DWithin(way, c.pt, p.d)
                   ) o WHERE NOT (o.kind = p.kind AND o.osm_id = p.ex)) q
               CROSS JOIN LATERAL (SELECT {areas} FROM {s}.planet_osm_polygon WHERE ST_DWithin(way, c.pt, p.d)) g
               ORDER BY p.i"""
        ).format(
            s=sql.Identifier(str(region)),
            lines=_counts({**TRANSPORT_MODES, **EXTRA_LINES}),
            pois=_counts(VENUE_GROUPS),
            areas=_counts(LAND_COVER),
            cols=sql.SQL(POI_COLUMNS),
        )
        ids = group["osm_id"].fillna(0).astype("int64").tolist()
        with cursor(ctx.info) as cur:
            cur.execute(query, (x.tolist(), y.tolist(), d.tolist(), kind, ids))
            counts = np.asarray(cur.fetchall(), dtype=float).reshape(len(group), len(TAG_COLUMNS))
        out[np.flatnonzero(points["region"].to_numpy() == region)] = np.log1p(counts)
    return out


@dataclass
class Featurizer:
    """Computes named featuresets for points; `a+b` concatenates, and each part is computed once per call.

    `base` maps a name to fn(points, mode, service) → (n, d) float array (NaN rows = unavailable).
    Tests inject their own; the default set is the module docstring's.
    """

    base: dict[str, FeatureFn]

    @classmethod
    def default(cls, cfg: EvaluateConfig, ctx: EvaluationContext) -> Featurizer:
        """The featuresets of the module docstring, reading from `ctx`."""
        return cls(
            {
                "loc2vec": FeastFeature("embedding", ctx),
                "histogram": FeastFeature("histogram", ctx),
                "tag_counts_cell": FeastFeature("tag_counts", ctx),  # embed's per-cell counts (no leave-self-out)
                "latlon": lambda p, m, s: latlon_features(p, m),
                "random_encoder": lambda p, m, s: random_encoder_features(
                    p, m, ctx, cfg.random_encoder_seed, cfg.batch_size
                ),
                "tag_counts": lambda p, m, s: tag_count_features(p, m, ctx),
            }
        )

    def parts(self, name: str) -> list[str]:
        """The base featuresets of a name ("loc2vec+histogram" → both); unknown ones are a ConfigError."""
        parts = name.split("+")
        unknown = [p for p in parts if p not in self.base]
        if unknown:
            raise ConfigError(f"unknown featureset(s) {unknown}; known: {sorted(self.base)} and their a+b")
        return parts

    def compute(self, points: pd.DataFrame, names: Sequence[str], mode: Mode, service: str) -> dict[str, np.ndarray]:
        """Each named featureset for the points.

        Args:
            points: label or query points (lat, lon, h3_cell, region, event_timestamp, osm_kind, osm_id).
            names: featureset names (`a+b` concatenates).
            mode: "historical" (point-in-time, for training) or "online" (for predicting).
            service: the Feast feature service of the task.

        Returns:
            {name: (n, d) float array}, NaN rows where a point has no value.
        """
        points = points.reset_index(drop=True)
        cache: dict[str, np.ndarray] = {}
        out = {}
        for name in names:
            for part in self.parts(name):
                if part not in cache:
                    cache[part] = np.asarray(self.base[part](points, mode, service), dtype=float).reshape(
                        len(points), -1
                    )
            out[name] = np.hstack([cache[p] for p in self.parts(name)])
        return out
