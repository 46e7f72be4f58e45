"""Serving: the Feast store of this project, online embedding lookups and point-in-time joins.

Stable API for consumers (loc2vec/evaluate.py, the CLI):

* ``get_location_embeddings(lats, lons)`` → one row per location: lat, lon, h3_cell, embedding (16
  floats), model_name, model_version. Invalid coordinates raise ``InvalidLocationError``; a location
  whose cell was never published raises ``LocationNotPublishedError``: never zeros or None.
* ``historical_features(entity_df, service_name)`` → the entity rows (same order) with the service's
  features as they were at each row's ``event_timestamp`` (point-in-time correct).

Which store: ``feature_repo/feature_store.yaml`` (SQLite online store) or, when LOC2VEC_ONLINE_STORE=postgres
(or params ``publish.online_store: postgres``), ``feature_repo/feature_store.postgres.yaml`` filled in from
``loc2vec.db.conninfo()``. Relative paths resolve against ``<project root>/feature_repo``, so the data is
in ``load_params().root / "data" / "feast"`` for a checkout and a test project alike.

Feast is imported lazily (``import feast`` takes 7–8 s).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from loc2vec.config import ConfigError, load_params
from loc2vec.errors import Loc2VecError

if TYPE_CHECKING:
    from feast import FeatureStore

SOURCE_REPO = Path(__file__).resolve().parents[1] / "feature_repo"  # the definitions (code)
ONLINE_STORE_ENV = "LOC2VEC_ONLINE_STORE"
STORE_FILES = {"sqlite": "feature_store.yaml", "postgres": "feature_store.postgres.yaml"}
DEFINITION_MODULES = ("entities", "sources", "features", "services")
EMBEDDING_FEATURES = ("embedding", "model_name", "model_version")
_VAR = re.compile(r"\$\{(\w+)\}")


class FeatureStoreError(Loc2VecError, RuntimeError):
    """The feature store is not configured or not published yet."""


class InvalidLocationError(Loc2VecError, ValueError):
    """A latitude/longitude is missing, not finite or out of range."""


class LocationNotPublishedError(Loc2VecError, LookupError):
    """A location's H3 cell has no published embedding (outside every embedded region, or not published)."""


@dataclass(frozen=True)
class PublishConfig:
    """params.yaml `publish:`."""

    online_store: str = "sqlite"  # sqlite | postgres; LOC2VEC_ONLINE_STORE overrides
    postgres_schema: str = "feast"  # the schema holding Feast's online tables in the project database

    def __post_init__(self) -> None:
        if self.online_store not in STORE_FILES:
            raise ConfigError(f"publish.online_store must be one of {sorted(STORE_FILES)}, got {self.online_store!r}")


def publish_config() -> PublishConfig:
    from loc2vec.config import section_config

    return section_config(PublishConfig, "publish")


def online_store_kind(kind: str | None = None) -> str:
    """sqlite or postgres: the argument, else $LOC2VEC_ONLINE_STORE, else params publish.online_store."""
    kind = kind or os.environ.get(ONLINE_STORE_ENV) or publish_config().online_store
    if kind not in STORE_FILES:
        raise ConfigError(f"online store must be one of {sorted(STORE_FILES)} (${ONLINE_STORE_ENV}), got {kind!r}")
    return kind


def feast_dir() -> Path:
    """Where the registry, SQLite online store and offline Parquet live: <project root>/data/feast."""
    return load_params().root / "data" / "feast"


def _template_vars() -> dict[str, str]:
    from loc2vec.db import conninfo

    info = conninfo()
    return {
        "LOC2VEC_PG_HOST": info.host,
        "LOC2VEC_PG_PORT": str(info.port),
        "LOC2VEC_PG_DATABASE": info.dbname,
        "LOC2VEC_PG_USER": info.user,
        "LOC2VEC_PG_PASSWORD": info.password or "",
        "LOC2VEC_FEAST_SCHEMA": publish_config().postgres_schema,
    }


def store_yaml(kind: str | None = None) -> str:
    """The effective feature_store.yaml text for an online store kind (variables filled in)."""
    kind = online_store_kind(kind)
    text = (SOURCE_REPO / STORE_FILES[kind]).read_text()
    values = _template_vars() if "${" in text else {}

    def fill(m: re.Match[str]) -> str:
        if m.group(1) not in values:
            raise ConfigError(f"{STORE_FILES[kind]}: unknown variable ${{{m.group(1)}}}")
        return values[m.group(1)]

    return _VAR.sub(fill, text)


_STORES: dict[tuple[str, str], FeatureStore] = {}
_LOCK = threading.Lock()


def feature_store(kind: str | None = None) -> FeatureStore:
    """The project's FeatureStore for an online store kind (cached per project root and config)."""
    import yaml
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    text = store_yaml(kind)
    root = load_params().root
    key = (str(root), hashlib.sha256(text.encode()).hexdigest())
    with _LOCK:
        store = _STORES.get(key)
        if store is None:
            repo = root / "feature_repo"  # relative paths in the yaml resolve against it
            repo.mkdir(exist_ok=True)
            feast_dir().mkdir(parents=True, exist_ok=True)
            config = RepoConfig(**yaml.safe_load(text))
            config.repo_path = repo
            store = _STORES[key] = FeatureStore(repo_path=str(repo), config=config)
    return store


def forget_stores() -> None:
    """Drop cached stores (their connections go with them): after switching projects in one process."""
    with _LOCK:
        _STORES.clear()


def h3_resolution() -> int:
    from loc2vec.embed import embed_config

    return embed_config().h3_resolution


def check_locations(lats: Sequence[float] | np.ndarray, lons: Sequence[float] | np.ndarray) -> tuple[np.ndarray, ...]:
    """1-D float arrays of equal length, finite and within ±90°/±180° (else InvalidLocationError)."""
    try:
        lat = np.atleast_1d(np.asarray(lats, dtype=np.float64))
        lon = np.atleast_1d(np.asarray(lons, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise InvalidLocationError(f"latitudes and longitudes must be numbers: {exc}") from None
    if lat.ndim != 1 or lat.shape != lon.shape:
        raise InvalidLocationError(f"lats and lons must be 1-D of equal length, got {lat.shape} and {lon.shape}")
    bad = ~(np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidLocationError(
            f"{int(bad.sum())} invalid location(s), e.g. #{i}: ({lat[i]}, {lon[i]}); "
            "latitude must be finite in [-90, 90], longitude finite in [-180, 180]"
        )
    return lat, lon


def cells_for(lats: np.ndarray, lons: np.ndarray, resolution: int | None = None) -> list[str]:
    import h3

    res = h3_resolution() if resolution is None else resolution
    return [h3.latlng_to_cell(float(a), float(b), res) for a, b in zip(lats, lons, strict=True)]


def get_location_embeddings(
    lats: Sequence[float] | np.ndarray, lons: Sequence[float] | np.ndarray, *, online_store: str | None = None
) -> pd.DataFrame:
    """Online embeddings for locations: lat/lon → H3 cell (params embed.h3_resolution) → Feast online store.

    Returns one row per location, in order: lat, lon, h3_cell, embedding (list of 16 floats), model_name,
    model_version. Raises InvalidLocationError for NaN/out-of-range coordinates and
    LocationNotPublishedError when any location's cell has no published embedding.
    """
    lat, lon = check_locations(lats, lons)
    cells = cells_for(lat, lon)
    store = feature_store(online_store)
    try:
        response = store.get_online_features(
            features=[f"location_embedding:{f}" for f in EMBEDDING_FEATURES],
            entity_rows={"h3_cell": cells},
        ).to_dict()
    except Exception as exc:  # an unapplied registry, a missing table, an unreachable server
        if isinstance(exc, Loc2VecError):
            raise
        raise FeatureStoreError(
            f"online lookup failed ({type(exc).__name__}: {exc}); has `loc2vec publish` run for this store?"
        ) from exc
    emb = response["embedding"]
    missing = [i for i, e in enumerate(emb) if e is None or len(e) == 0]
    if missing:
        i = missing[0]
        raise LocationNotPublishedError(
            f"{len(missing)} of {len(cells)} location(s) have no published embedding, e.g. #{i} "
            f"({lat[i]}, {lon[i]}) → H3 cell {cells[i]}: outside every embedded region's mapped land, "
            "or not published yet (`loc2vec embed` + `loc2vec publish`)"
        )
    return pd.DataFrame(
        {
            "lat": lat,
            "lon": lon,
            "h3_cell": cells,
            "embedding": [list(map(float, e)) for e in emb],
            "model_name": response["model_name"],
            "model_version": response["model_version"],
        }
    )


def historical_features(entity_df: pd.DataFrame, service_name: str, *, online_store: str | None = None) -> pd.DataFrame:
    """Point-in-time join of a FeatureService's features onto entity rows (for training classifiers).

    entity_df: columns ``h3_cell`` (str) and ``event_timestamp`` (timezone-aware), plus any others (labels),
    which are passed through. Returns the same rows in the same order with the service's features
    (``embedding``, ``model_version``, ``histogram``, ``tag_counts``) as of each row's timestamp: the latest
    version with event_timestamp ≤ the row's (within the 10-year ttl). A row timestamped before any
    version was published gets NaN/None features: drop those rows, never fill them.
    """
    if not isinstance(entity_df, pd.DataFrame):
        raise FeatureStoreError("entity_df must be a pandas DataFrame with columns h3_cell and event_timestamp")
    missing = {"h3_cell", "event_timestamp"} - set(entity_df.columns)
    if missing:
        raise FeatureStoreError(f"entity_df lacks columns {sorted(missing)}")
    ts = entity_df["event_timestamp"]
    if not isinstance(ts.dtype, pd.DatetimeTZDtype):
        raise FeatureStoreError(
            f"entity_df.event_timestamp must be timezone-aware (e.g. pd.to_datetime(..., utc=True)), got {ts.dtype}"
        )
    if {"_row", "_key"} & set(entity_df.columns):
        raise FeatureStoreError("entity_df must not have columns named _row or _key (used to keep the row order)")
    store = feature_store(online_store)
    try:
        service = store.get_feature_service(service_name)
    except Exception as exc:
        names = sorted(s.name for s in store.list_feature_services())
        raise FeatureStoreError(f"unknown feature service {service_name!r}; published: {names}") from exc
    frame = entity_df.assign(_row=np.arange(len(entity_df)), event_timestamp=ts.dt.tz_convert("UTC"))
    # Ask Feast once per distinct (cell, time): its file offline store fills only one of several
    # identical entity rows and leaves the others NaN. Map the answers back to every row.
    keys = frame[["h3_cell", "event_timestamp"]].drop_duplicates().reset_index(drop=True)
    keys["_key"] = np.arange(len(keys))
    frame = frame.merge(keys, on=["h3_cell", "event_timestamp"], how="left", validate="many_to_one")
    got = store.get_historical_features(entity_df=keys, features=service).to_df()
    # Feast may reorder rows (and the file store drops rows outside a ttl window): join on _key.
    feature_cols = [c for c in got.columns if c not in keys.columns]
    out = frame.merge(got[["_key", *feature_cols]], on="_key", how="left", validate="many_to_one")
    return out.sort_values("_row").drop(columns=["_row", "_key"]).reset_index(drop=True)


def describe(kind: str | None = None) -> dict[str, Any]:
    """Where the store is (for logs and the CLI), without the password."""
    kind = online_store_kind(kind)
    info: dict[str, Any] = {"online_store": kind, "feast_dir": str(feast_dir())}
    if kind == "postgres":
        from loc2vec.db import conninfo

        info["postgres"] = conninfo().redacted() + f" schema {publish_config().postgres_schema}"
    return info
