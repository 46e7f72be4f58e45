"""Downstream evaluation: do loc2vec embeddings help predict transport mode and venue type?

The labels come from OSM itself (loc2vec/labels.py). Each labelled point gets six featuresets:

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
* ``loc2vec+histogram`` – both concatenated (any ``a+b`` name concatenates featuresets).

Not in the default list: ``tag_counts_cell``, embed's per-cell counts from the Feast ``tag_counts`` view
(they include the labelled POI itself, so on the venue task they leak the label).

Classifiers: ``logreg`` (StandardScaler + multinomial LogisticRegression) and ``knn``
(StandardScaler + k nearest neighbours), each scored by accuracy and macro-F1 on held-out points.
A row missing any featureset (its cell was never embedded) is dropped for all of them, so every
featureset is scored on the same points.

**Split.** Within one region: blocked K-fold cross-validation. Labels fall in sampling's square
blocks (``sampling.assign_blocks``, ``split.block_m``), the blocks are shuffled (seeded) and dealt to
``split.folds`` folds; each fold is tested by a model trained on the other folds, minus every train
point within ``split.buffer_m`` of a test point (default 2·render.radius_m: train and test tiles
never overlap; ``sampling.buffer_violations``). Predictions are pooled over the folds, so every label
is tested exactly once (a single 70/30 split of Liechtenstein's ~570 POIs leaves ~120 test points and
noisy scores). Neighbouring points share most of their tile, so a random split would reward
memorising places rather than reading maps. With ``train_regions`` the classifiers train on all
labels of those regions and test on all labels of the evaluated one (transfer: no buffer needed);
classes never seen in training are not scored.

Uncertainty: ``meta.tasks.<task>.bootstrap`` holds 95% block-bootstrap intervals (whole spatial blocks
resampled, ``bootstrap`` times) of every macro-F1 and of loc2vec's lead over each other featureset.

Output: JSON ``{"tasks": {task: {featureset: {classifier: {"accuracy", "macro_f1"}}}}, "meta": …}``
written atomically, logged to MLflow (experiment ``evaluate.experiment``) with flattened metrics,
and ``eval_score`` = mean macro-F1 of loc2vec/logreg over the tasks, set as a tag of the evaluated
model version (the one that made the embeddings; the champion gate, loc2vec/promote.py, tags
``gate_score`` computed the same way before publishing). A transfer run tags
``eval_score_transfer`` instead, so champions are compared on in-region scores only.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import h3
import numpy as np
import pandas as pd
from psycopg2 import sql
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from loc2vec.atomic import write_text
from loc2vec.config import ConfigError, _build, load_params, section_config
from loc2vec.db import cursor, require_import
from loc2vec.errors import Loc2VecError
from loc2vec.labels import TASKS, TRANSPORT_MODES, VENUE_GROUPS, LabelConfig, class_counts, h3_resolution, make_labels
from loc2vec.osm import check_region_name
from loc2vec.sampling import SampleConfig, assign_blocks, buffer_violations, to_mercator

log = logging.getLogger(__name__)

Mode = Literal["historical", "online"]
FeatureFn = Callable[[pd.DataFrame, Mode, str], np.ndarray]  # (points, mode, Feast service) → (n, d), NaN rows
CLASSIFIERS: tuple[str, ...] = ("logreg", "knn")
DEFAULT_FEATURESETS: tuple[str, ...] = (
    "loc2vec", "latlon", "histogram", "random_encoder", "tag_counts", "loc2vec+histogram",
)  # fmt: skip
SERVICES: dict[str, str] = {"transport": "transport_mode_v1", "venue": "venue_v1"}


@dataclass(frozen=True)
class EvaluateConfig:
    """params.yaml `evaluate:` (labels: see labels.LabelConfig)."""

    labels: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    featuresets: tuple[str, ...] = DEFAULT_FEATURESETS
    knn_k: int = 10
    logreg_c: float = 1.0
    random_encoder_seed: int = 0
    batch_size: int = 64  # tiles per random-encoder forward pass
    bootstrap: int = 1000  # block-bootstrap resamples for the meta's intervals; 0 = none
    experiment: str = "loc2vec-evaluate"

    def __post_init__(self) -> None:
        object.__setattr__(self, "featuresets", tuple(self.featuresets))
        if self.knn_k < 1 or self.logreg_c <= 0 or self.batch_size < 1 or self.bootstrap < 0:
            raise ConfigError("evaluate: knn_k ≥ 1, logreg_c > 0, batch_size ≥ 1 and bootstrap ≥ 0 are required")

    @property
    def label_cfg(self) -> LabelConfig:
        return _build(LabelConfig, self.labels, "evaluate.labels")

    @property
    def split_cfg(self) -> SplitConfig:
        return _build(SplitConfig, self.split, "evaluate.split")


@dataclass(frozen=True)
class SplitConfig:
    """params.yaml `evaluate.split`."""

    block_m: float = 1000.0
    folds: int = 5  # blocked K-fold: every label is tested once, by a model that never saw its blocks
    buffer_m: float | None = None  # None: 2·render.radius_m (train and test tiles never overlap)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_m <= 0 or self.folds < 2 or (self.buffer_m is not None and self.buffer_m < 0):
            raise ConfigError("evaluate.split: block_m > 0, folds ≥ 2 and buffer_m ≥ 0 are required")

    def buffer(self) -> float:
        return 2.0 * load_params().render.radius_m if self.buffer_m is None else float(self.buffer_m)


def evaluate_config() -> EvaluateConfig:
    return section_config(EvaluateConfig, "evaluate")


# ---------------------------------------------------------------- featuresets


def points_frame(lats: Sequence[float], lons: Sequence[float], region: str | None = None) -> pd.DataFrame:
    """Query points as the featuresets take them (no source object to leave out)."""
    lats, lons = np.asarray(lats, dtype=float), np.asarray(lons, dtype=float)
    res = h3_resolution()
    return pd.DataFrame(
        {
            "region": region,
            "lat": lats,
            "lon": lons,
            "h3_cell": [h3.latlng_to_cell(float(a), float(b), res) for a, b in zip(lats, lons, strict=True)],
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


def _historical(points: pd.DataFrame, service: str) -> pd.DataFrame:
    """The service's features as of each point's event_timestamp (row-aligned; NaN/None before publication)."""
    from loc2vec import features

    entity = pd.DataFrame(
        {"h3_cell": points["h3_cell"].to_numpy(dtype=str), "event_timestamp": points["event_timestamp"]}
    )
    key = service + ":" + str(pd.util.hash_pandas_object(entity, index=False).sum())
    if key not in _HISTORICAL:
        _HISTORICAL.clear()
        _HISTORICAL[key] = features.historical_features(entity, service)  # row-aligned, duplicates included
    return _HISTORICAL[key]


def _online(points: pd.DataFrame, column: str) -> pd.DataFrame:
    """Online values of one feature per point: the consumer API for embeddings, the view for baselines."""
    from loc2vec import features

    lats, lons = points["lat"].to_numpy(float), points["lon"].to_numpy(float)
    if column == "embedding":  # raises LocationNotPublishedError for an unknown cell: never silent zeros
        return features.get_location_embeddings(lats, lons)
    rows = {"h3_cell": features.cells_for(lats, lons)}
    return pd.DataFrame(
        features.feature_store().get_online_features([f"{FEAST_VIEWS[column]}:{column}"], rows).to_dict()
    )


class FeastFeature:
    """A Feast feature of the point's H3 cell: point-in-time from the service (historical) or online.

    For the embedding it records which model versions served it, so an evaluation can refuse mixed
    embedding spaces and tag the version that was actually evaluated.
    """

    def __init__(self, column: str):
        if column not in FEAST_VIEWS:
            raise ConfigError(f"no Feast view serves {column!r}; known: {sorted(FEAST_VIEWS)}")
        self.column = column
        self.served: set[tuple[str | None, str]] = set()  # (model name, None on the historical path; version)

    def __call__(self, points: pd.DataFrame, mode: Mode, service: str) -> np.ndarray:
        frame = _historical(points, service) if mode == "historical" else _online(points, self.column)
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
    return points[["lat", "lon"]].to_numpy(dtype=float)


def _cell_centres(cells: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    ll = np.asarray([h3.cell_to_latlng(c) for c in cells], dtype=float).reshape(-1, 2)
    return ll[:, 0], ll[:, 1]


def random_encoder_features(points: pd.DataFrame, mode: Mode, seed: int = 0, batch_size: int = 64) -> np.ndarray:
    """The untrained, seeded Encoder on each point's cell tile (cut at the cell centre, no rotation/shift)."""
    import torch

    from loc2vec.model import Encoder, ModelConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = Encoder(ModelConfig.from_params()).eval()
    return encoder_features(points, encoder, batch_size)


def encoder_features(points: pd.DataFrame, encoder, batch_size: int = 64) -> np.ndarray:
    """`encoder` (eval mode) on each point's cell tile, cut at the cell centre from the region's metatiles.

    The tile embed.py encodes for the cell: a trained model scored this way scores as its published
    embeddings would (the champion gate, loc2vec/promote.py, compares models before publishing).
    """
    import torch

    from loc2vec.cutter import cut_tiles
    from loc2vec.metatiles import ensure_metatiles
    from loc2vec.model import to_input

    dim = encoder.cfg.embedding_dim
    out = np.full((len(points), dim), np.nan)
    for region, group in points.groupby("region", sort=True):
        cells, inverse = np.unique(group["h3_cell"].to_numpy(dtype=str), return_inverse=True)
        lats, lons = _cell_centres(cells)
        index = ensure_metatiles(str(region), lats, lons, progress=False)
        emb = np.empty((len(cells), dim))
        for i in range(0, len(cells), batch_size):
            sl = slice(i, i + batch_size)
            n = len(lats[sl])
            tiles = cut_tiles(index, lats[sl], lons[sl], np.zeros(n), np.zeros((n, 2)), device="cpu")
            with torch.no_grad():  # not inference_mode: the cutter's worker threads fill a normal tensor
                emb[sl] = encoder(to_input(tiles)).numpy()
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
_POI_COLS = "amenity, shop, tourism, leisure, railway, public_transport, tags"


def _counts(filters: Mapping[str, str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL("count(*) FILTER (WHERE {})").format(sql.SQL(f"({w})")) for w in filters.values())


def tag_count_features(points: pd.DataFrame, mode: Mode) -> np.ndarray:
    """log1p counts of tagged OSM objects intersecting the tile disc; a point's own POI is left out."""
    radius = load_params().render.radius_m
    out = np.full((len(points), len(TAG_COLUMNS)), np.nan)
    for region, group in points.groupby("region", sort=True):
        check_region_name(str(region))
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
            cols=sql.SQL(_POI_COLS),
        )
        ids = group["osm_id"].fillna(0).astype("int64").tolist()
        with cursor() as cur:
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
    def default(cls, cfg: EvaluateConfig | None = None) -> Featurizer:
        cfg = cfg or evaluate_config()
        return cls(
            {
                "loc2vec": FeastFeature("embedding"),
                "histogram": FeastFeature("histogram"),
                "tag_counts_cell": FeastFeature("tag_counts"),  # embed's per-cell counts (no leave-self-out)
                "latlon": lambda p, m, s: latlon_features(p, m),
                "random_encoder": lambda p, m, s: random_encoder_features(
                    p, m, cfg.random_encoder_seed, cfg.batch_size
                ),
                "tag_counts": lambda p, m, s: tag_count_features(p, m),
            }
        )

    def parts(self, name: str) -> list[str]:
        parts = name.split("+")
        unknown = [p for p in parts if p not in self.base]
        if unknown:
            raise ConfigError(f"unknown featureset(s) {unknown}; known: {sorted(self.base)} and their a+b")
        return parts

    def compute(self, points: pd.DataFrame, names: Sequence[str], mode: Mode, service: str) -> dict[str, np.ndarray]:
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


# ---------------------------------------------------------------- classifiers


def make_classifier(kind: str, cfg: EvaluateConfig, n_train: int) -> Pipeline:
    if kind == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(C=cfg.logreg_c, max_iter=5000))
    if kind == "knn":
        return make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=max(1, min(cfg.knn_k, n_train))))
    raise ConfigError(f"unknown classifier {kind!r}; classifiers are {', '.join(CLASSIFIERS)}")


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy, and F1 averaged over the classes the test points have (a class predicted but absent,
    e.g. `rail` in a region without railways, costs the true class's recall, not a 0 of its own)."""
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=sorted(set(y_true)), average="macro", zero_division=0)),
    }


class LocationClassifier:
    """A consumer model on Feast features: trains from historical retrieval, predicts from the online store.

    The feature vector is any featureset name (default `loc2vec`); non-Feast featuresets compute the
    same vectors on both paths. `predict_online` needs `region` only for featuresets read from the
    region's map data (tag_counts, random_encoder); Feast lookups need just the coordinates.
    """

    task: ClassVar[str] = ""

    def __init__(
        self,
        model: str = "logreg",
        featureset: str = "loc2vec",
        cfg: EvaluateConfig | None = None,
        featurizer: Featurizer | None = None,
    ):
        self.cfg = cfg or evaluate_config()
        self.model_kind = model
        self.featureset = featureset
        self.featurizer = featurizer or Featurizer.default(self.cfg)
        self.featurizer.parts(featureset)
        self.pipeline: Pipeline | None = None

    @property
    def service(self) -> str:
        return SERVICES[self.task]

    @property
    def classes_(self) -> np.ndarray:
        if self.pipeline is None:
            raise Loc2VecError("the classifier is not fitted")
        return self.pipeline.classes_

    def fit_features(self, x: np.ndarray, y: np.ndarray) -> LocationClassifier:
        self.pipeline = make_classifier(self.model_kind, self.cfg, len(y)).fit(x, y)
        return self

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        if self.pipeline is None:
            raise Loc2VecError("the classifier is not fitted: call fit_from_feast first")
        return self.pipeline.predict(x)

    def fit_from_feast(self, labels: pd.DataFrame) -> LocationClassifier:
        """Fit on labels (labels.make_labels frame) with point-in-time features; unknown cells are skipped."""
        x = self.featurizer.compute(labels, [self.featureset], "historical", self.service)[self.featureset]
        ok = np.isfinite(x).all(axis=1)
        if not ok.any():
            raise Loc2VecError(f"no {self.task} label has {self.featureset} features (were the regions published?)")
        if (~ok).any():
            log.warning("%d of %d labels have no %s features: skipped", int((~ok).sum()), len(ok), self.featureset)
        return self.fit_features(x[ok], labels["label"].to_numpy()[ok])

    def predict_online(self, lats: Sequence[float], lons: Sequence[float], region: str | None = None) -> np.ndarray:
        points = points_frame(lats, lons, region)
        x = self.featurizer.compute(points, [self.featureset], "online", self.service)[self.featureset]
        missing = ~np.isfinite(x).all(axis=1)
        if missing.any():
            raise Loc2VecError(
                f"{int(missing.sum())} of {len(x)} points have no {self.featureset} features "
                "(map-based featuresets need `region`, an ingested region containing the points)"
            )
        return self.predict_features(x)


class TransportModeClassifier(LocationClassifier):
    """car / rail / cycle / foot / ferry from where a GPS fix is."""

    task = "transport"


class VenueClassifier(LocationClassifier):
    """The venue group (food & drink, shop, education, …) of a visited place."""

    task = "venue"


# ---------------------------------------------------------------- split


@dataclass(frozen=True)
class Fold:
    """Row indices of one train/test split; `n_buffer` train-side rows were dropped near test rows."""

    train: np.ndarray
    test: np.ndarray
    n_buffer: int = 0


def block_folds(
    lat: np.ndarray, lon: np.ndarray, bbox: tuple[float, float, float, float], cfg: SplitConfig
) -> np.ndarray:
    """Fold id per point: sampling's square blocks, shuffled (seeded) and dealt round-robin to the folds."""
    blocks, _ = assign_blocks(lat, lon, bbox, SampleConfig(block_m=cfg.block_m, seed=cfg.seed))
    unique = np.unique(blocks)
    order = np.random.default_rng([cfg.seed, 7]).permutation(len(unique))
    fold_of = dict(zip(unique[order].tolist(), (np.arange(len(unique)) % cfg.folds).tolist(), strict=True))
    return np.asarray([fold_of[b] for b in blocks.tolist()], dtype=np.int64)


def spatial_folds(labels: pd.DataFrame, cfg: SplitConfig, bbox: tuple[float, float, float, float]) -> list[Fold]:
    """Blocked K-fold: each fold tests its blocks and trains on the others minus a buffer around its points."""
    lat, lon = labels["lat"].to_numpy(float), labels["lon"].to_numpy(float)
    fold = block_folds(lat, lon, bbox, cfg)
    out = []
    for k in range(cfg.folds):
        split = np.where(fold == k, "test", "train").astype(object)
        if not (split == "test").any():
            continue
        near = buffer_violations(lat, lon, split, cfg.buffer())
        out.append(Fold(np.flatnonzero((split == "train") & ~near), np.flatnonzero(split == "test"), int(near.sum())))
    if len(out) < 2:
        raise Loc2VecError(
            f"the labels fall in fewer than 2 folds of {cfg.block_m:g} m blocks; lower evaluate.split.block_m"
        )
    return out


# ---------------------------------------------------------------- evaluation


@dataclass
class TaskData:
    """One task's labels and folds, with each featureset on both paths (historical: train rows, online: test rows)."""

    labels: pd.DataFrame
    folds: list[Fold]
    historical: dict[str, np.ndarray]
    online: dict[str, np.ndarray]  # rows never tested stay NaN
    blocks: np.ndarray  # sampling block of each row (in the evaluated region's frame): the bootstrap's unit
    meta: dict[str, Any]


def prepare_task(
    task: str,
    region: str,
    train_regions: Sequence[str] | None,
    cfg: EvaluateConfig,
    featurizer: Featurizer,
) -> TaskData:
    """Labels → features (rows lacking any featureset are dropped) → folds → online features of test rows."""
    label_cfg = cfg.label_cfg
    labels = make_labels(region, task, label_cfg)
    if train_regions:
        labels = pd.concat([*(make_labels(r, task, label_cfg) for r in train_regions), labels], ignore_index=True)
    service = SERVICES[task]
    names = list(cfg.featuresets)
    n_labels = len(labels)

    # the historical path tells which rows have every featureset (cells never embedded have none)
    hist = featurizer.compute(labels, names, "historical", service)
    ok = np.logical_and.reduce([np.isfinite(v).all(axis=1) for v in hist.values()])
    is_eval = (labels["region"] == region).to_numpy()
    if train_regions:  # a class never seen in the training regions cannot be predicted: not scored
        ok &= labels["label"].isin(set(labels.loc[~is_eval & ok, "label"])).to_numpy()
    labels, hist, is_eval = labels[ok].reset_index(drop=True), {k: v[ok] for k, v in hist.items()}, is_eval[ok]
    bbox = require_import(region).bbox
    if train_regions:
        folds = [Fold(np.flatnonzero(~is_eval), np.flatnonzero(is_eval))]
    else:
        folds = spatial_folds(labels, cfg.split_cfg, bbox)
    split = cfg.split_cfg
    blocks, _ = assign_blocks(labels["lat"].to_numpy(float), labels["lon"].to_numpy(float), bbox,
                              SampleConfig(block_m=split.block_m, seed=split.seed))  # fmt: skip

    tested = np.unique(np.concatenate([f.test for f in folds]))
    online = {k: np.full_like(v, np.nan) for k, v in hist.items()}
    got = featurizer.compute(labels.iloc[tested], names, "online", service)
    for k in names:
        online[k][tested] = got[k]
    skew = {k: float(np.max(np.abs(got[k] - hist[k][tested]), initial=0.0)) for k in names}
    meta = {
        "n_labels": int(n_labels),
        "n_dropped_missing_features_or_class": int((~ok).sum()),
        "n_tested": int(len(tested)),
        "folds": len(folds),
        "mean_train_per_fold": float(np.mean([len(f.train) for f in folds])),
        "n_dropped_buffer_per_fold": [f.n_buffer for f in folds],
        "classes": sorted(set(labels["label"].iloc[tested])),
        "class_counts_tested": class_counts(labels.iloc[tested]),
        "class_counts_train_regions": class_counts(labels[~is_eval]) if train_regions else None,
        "online_vs_historical_max_abs_diff": skew,
        "feast_service": service,
    }
    return TaskData(labels, folds, hist, online, blocks, meta)


Predictions = dict[tuple[str, str], np.ndarray]  # (featureset, classifier) → labels of the tested rows


def score_task(data: TaskData, cfg: EvaluateConfig) -> tuple[dict[str, dict[str, dict[str, float]]], Predictions]:
    """{featureset: {classifier: {accuracy, macro_f1}}} pooled over the folds' test rows, and the predictions."""
    y = data.labels["label"].to_numpy()
    tested = np.concatenate([f.test for f in data.folds])
    out: dict[str, dict[str, dict[str, float]]] = {}
    preds: Predictions = {}
    for name in cfg.featuresets:
        out[name] = {}
        for kind in CLASSIFIERS:
            pred = np.empty(len(y), dtype=object)
            for fold in data.folds:
                if len(set(y[fold.train])) < 2:
                    raise Loc2VecError("a fold trains on fewer than two classes; change evaluate.split")
                model = make_classifier(kind, cfg, len(fold.train)).fit(
                    data.historical[name][fold.train], y[fold.train]
                )
                pred[fold.test] = model.predict(data.online[name][fold.test])
            out[name][kind] = scores(y[tested], pred[tested])
            preds[(name, kind)] = pred[tested]
    return out, preds


def _macro_f1_codes(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> float:
    """scores()'s macro-F1 on integer codes: F1 = 2·TP / (support + predicted), over classes with support."""
    cm = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    present = support > 0
    return float((2.0 * np.diag(cm)[present] / (support[present] + predicted[present])).mean())


def block_bootstrap(
    y: np.ndarray, preds: Predictions, blocks: np.ndarray, n: int, seed: int, reference: str = "loc2vec"
) -> dict[str, Any]:
    """95% intervals of macro-F1, and of `reference` minus each other featureset (same classifier, paired).

    Resamples whole spatial blocks, not points: neighbouring points share their tiles and errors, so a
    point bootstrap would claim more certainty than ~N/block-size independent places give.
    """
    classes = {c: i for i, c in enumerate(sorted({str(v) for v in (*y, *(x for p in preds.values() for x in p))}))}
    k = len(classes)
    y_codes = np.asarray([classes[str(v)] for v in y])
    p_codes = {key: np.asarray([classes[str(v)] for v in p]) for key, p in preds.items()}
    _, inverse = np.unique(blocks, return_inverse=True)
    members = [np.flatnonzero(inverse == b) for b in range(inverse.max() + 1)]
    rng = np.random.default_rng([seed, 11])
    samples = {key: np.empty(n) for key in preds}
    for b in range(n):
        rows = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        for key, p in p_codes.items():
            samples[key][b] = _macro_f1_codes(y_codes[rows], p[rows], k)

    def interval(values: np.ndarray) -> list[float]:
        return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]

    ci: dict[str, dict[str, list[float]]] = {}
    versus: dict[str, dict[str, dict[str, Any]]] = {}
    for name, kind in preds:
        ci.setdefault(name, {})[kind] = interval(samples[(name, kind)])
        if name != reference and (reference, kind) in samples:
            diff = samples[(reference, kind)] - samples[(name, kind)]
            point = _macro_f1_codes(y_codes, p_codes[(reference, kind)], k) - _macro_f1_codes(
                y_codes, p_codes[(name, kind)], k
            )
            versus.setdefault(name, {})[kind] = {
                "diff": point,
                "ci95": interval(diff),
                "p_better": float((diff > 0).mean()),
            }
    return {"n": n, "blocks": len(members), "macro_f1_ci95": ci, f"{reference}_minus": versus}


def eval_score(tasks: Mapping[str, Mapping[str, Any]]) -> float:
    """Mean macro-F1 of loc2vec with logistic regression over the tasks: the model-selection number."""
    return float(np.mean([t["loc2vec"]["logreg"]["macro_f1"] for t in tasks.values()]))


def evaluate(
    region: str,
    train_regions: Sequence[str] | None = None,
    out: Path | str | None = None,
    *,
    cfg: EvaluateConfig | None = None,
    featurizer: Featurizer | None = None,
    track: bool = True,
) -> dict[str, Any]:
    """Evaluate the published embeddings of `region` on both tasks; write JSON, log to MLflow, tag the model."""
    check_region_name(region)
    train_regions = [check_region_name(r) for r in (train_regions or []) if r]
    if region in train_regions:
        raise ConfigError(f"--train-regions must not include the evaluated region {region!r}")
    cfg = cfg or evaluate_config()
    featurizer = featurizer or Featurizer.default(cfg)
    tasks: dict[str, Any] = {}
    metas: dict[str, Any] = {}
    for task in TASKS:
        data = prepare_task(task, region, train_regions, cfg, featurizer)
        tasks[task], preds = score_task(data, cfg)
        metas[task] = data.meta
        if cfg.bootstrap:
            tested = np.concatenate([f.test for f in data.folds])
            y = data.labels["label"].to_numpy()[tested]
            metas[task]["bootstrap"] = block_bootstrap(y, preds, data.blocks[tested], cfg.bootstrap, cfg.split_cfg.seed)
        log.info("%s %s: %d points tested in %d folds", region, task, data.meta["n_tested"], data.meta["folds"])
    result: dict[str, Any] = {"tasks": tasks}
    model = embedding_model(region)
    if isinstance(featurizer.base.get("loc2vec"), FeastFeature):
        served = featurizer.base["loc2vec"].served_model()
        if served and model and served != model:
            log.warning("Feast serves %s but data/embeddings/%s.parquet is %s: publish again?", served, region, model)
        model = served or model
    result["meta"] = {
        "region": region,
        "train_regions": train_regions or None,
        "split": "regions" if train_regions else "spatial_blocks",
        "eval_score": eval_score(tasks) if all("loc2vec" in t for t in tasks.values()) else None,
        "model": model,
        "tasks": metas,
    }
    path = Path(out) if out else load_params().root / "data" / "evaluate" / f"{region}.json"
    write_text(path, json.dumps(result, indent=2, sort_keys=False) + "\n")
    if track:
        log_to_mlflow(result, path, cfg)
    return result


def embedding_model(region: str) -> dict[str, Any]:
    """Which registered model version made the region's embeddings (from its embeddings Parquet)."""
    path = load_params().root / "data" / "embeddings" / f"{region}.parquet"
    if not path.is_file():
        return {}
    df = pd.read_parquet(path, columns=["model_name", "model_version"])
    if df.empty:
        return {}
    return {"name": str(df["model_name"].iloc[0]), "version": str(df["model_version"].iloc[0])}


def _metric_name(key: str) -> str:
    return key.replace("+", "_plus_")  # MLflow metric names allow [A-Za-z0-9_./ -] only


def log_to_mlflow(result: dict[str, Any], path: Path, cfg: EvaluateConfig) -> str:
    """One run in the evaluation experiment: params, flattened metrics, the JSON; then tag the model version."""
    from loc2vec.tracking import _flatten, setup_mlflow

    mlflow = setup_mlflow(cfg.experiment)
    meta = result["meta"]
    metrics: dict[str, Any] = {}
    _flatten("", result["tasks"], metrics)
    with mlflow.start_run(run_name=f"evaluate-{meta['region']}") as run:
        params: dict[str, Any] = {}
        _flatten("evaluate", load_params().section("evaluate"), params)
        params.update({"region": meta["region"], "train_regions": ",".join(meta["train_regions"] or []) or "-",
                       "model_name": meta["model"].get("name", "-"), "model_version": meta["model"].get("version", "-")})  # fmt: skip
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics({_metric_name(k): float(v) for k, v in metrics.items()})
        if meta["eval_score"] is not None:
            mlflow.log_metric("eval_score", meta["eval_score"])
        mlflow.log_artifact(str(path))
        run_id = run.info.run_id
    if meta["eval_score"] is not None:
        tag_model_version(meta, run_id)
    return run_id


def tag_model_version(meta: dict[str, Any], run_id: str) -> str | None:
    """Set eval_score (eval_score_transfer for a cross-region run) on the evaluated model version."""
    from mlflow import MlflowClient

    from loc2vec.tracking import CHAMPION

    client = MlflowClient()
    name = meta["model"].get("name") or load_params().section("train").get("registered_model", "loc2vec-encoder")
    version = meta["model"].get("version")
    try:
        if not version or not str(version).isdigit():
            version = client.get_model_version_by_alias(name, CHAMPION).version
        client.get_model_version(name, str(version))
    except Exception as exc:  # no registry entry: nothing to tag (e.g. embeddings of an unregistered model)
        log.warning("cannot tag model %s version %s with the evaluation score: %s", name, version, exc)
        return None
    key = "eval_score_transfer" if meta["train_regions"] else "eval_score"
    client.set_model_version_tag(name, str(version), key, str(meta["eval_score"]))
    client.set_model_version_tag(name, str(version), f"{key}_run_id", run_id)
    client.set_model_version_tag(name, str(version), f"{key}_region", meta["region"])
    log.info("model %s version %s: %s = %.4f", name, version, key, meta["eval_score"])
    return str(version)
