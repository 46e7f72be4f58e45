"""Consumers' API: online embeddings of locations, and point-in-time joins of a feature service.

* ``get_location_embeddings(lats, lons, store, version=None)`` → one row per location: lat, lon, h3_cell,
  embedding (16 floats), model_name, model_version. ``version`` pins a model version (its own feature view,
  unchanged by later publishes); None reads the latest view (exploration). The H3 resolution is the one the
  view was published with (catalog: registry metadata). Invalid coordinates raise ``InvalidLocationError``;
  a location whose cell was never published raises ``LocationNotPublishedError``; a version not served
  raises ``VersionNotServedError``: never zeros or None. ``lookup_locations`` is the same lookup without
  pandas (what `loc2vec features` prints). The default store (file registry, SQLite online store) is read
  without importing Feast (serving/online_read.py: the same registry and rows Feast reads, ~0.3 s instead of
  ~2 s a call); every other store through Feast's `get_online_features`.
* ``historical_features(entity_df, service_name, store)`` → the entity rows (same order) with the
  service's features as they were at each row's ``event_timestamp`` (point-in-time correct).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from loc2vec.core.errors import Loc2VecError
from loc2vec.serving import dask_tokens
from loc2vec.serving.catalog import embedding_view, embedding_view_in
from loc2vec.serving.store import EMBEDDING_FEATURES, FeatureStoreError, StoreSettings, direct_store, feature_store

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)
LOOKUP_ENV = "LOC2VEC_LOOKUP"  # "feast": read the default store through Feast too (to compare, or to rule this out)


class InvalidLocationError(Loc2VecError, ValueError):
    """A latitude/longitude is missing, not finite or out of range."""


class LocationNotPublishedError(Loc2VecError, LookupError):
    """A location's H3 cell has no published embedding (outside every embedded region, or not published)."""


def check_locations(lats: Sequence[float] | np.ndarray, lons: Sequence[float] | np.ndarray) -> tuple[np.ndarray, ...]:
    """1-D float arrays of equal length, finite and within ±90°/±180° (else InvalidLocationError).

    Raises:
        InvalidLocationError: not numbers, shapes differ, or a value is NaN or out of range.
    """
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


def cells_for(lats: np.ndarray, lons: np.ndarray, resolution: int) -> list[str]:
    """The H3 cell of each location at `resolution`."""
    import h3

    return [h3.latlng_to_cell(float(a), float(b), resolution) for a, b in zip(lats, lons, strict=True)]


@dataclass(frozen=True)
class Lookup:
    """Online embeddings of locations, one entry per location in the order asked."""

    lat: list[float]
    lon: list[float]
    h3_cell: list[str]
    embedding: list[list[float]]  # 16 floats each (float32 values)
    model_name: list[str]
    model_version: list[str]

    COLUMNS = ("lat", "lon", "h3_cell", "embedding", "model_name", "model_version")

    def rows(self) -> list[dict[str, Any]]:
        """One dict per location, keyed by COLUMNS."""
        return [dict(zip(self.COLUMNS, values, strict=True)) for values in zip(*self.columns().values(), strict=True)]

    def columns(self) -> dict[str, list[Any]]:
        """Each column by name, in COLUMNS order."""
        return {name: getattr(self, name) for name in self.COLUMNS}

    def frame(self) -> pd.DataFrame:
        """As a DataFrame (get_location_embeddings' result)."""
        import pandas as pd

        return pd.DataFrame(self.columns())


Read = tuple[list[str], dict[str, list[Any]]]  # the cells asked for, and each feature's values (None: no row)


def _read_direct(settings: StoreSettings, lat: np.ndarray, lon: np.ndarray, version: str | None) -> Read | None:
    """(cells, {feature: values}) from the default store's files without Feast, or None: not the default store,
    nothing published yet, or a table this reader does not know (Feast's read then answers, or says why)."""
    import sqlite3

    from loc2vec.serving.online_read import read_rows, view_tags
    from loc2vec.serving.wire import WireFormatError

    store = direct_store(settings) if os.environ.get(LOOKUP_ENV, "direct") != "feast" else None
    views = view_tags(store) if store is not None else None
    if store is None or views is None:
        return None
    view = embedding_view_in(views, version)
    if view is None:
        return None
    cells = cells_for(lat, lon, view.h3_resolution if view.h3_resolution is not None else settings.h3_resolution)
    try:
        rows = read_rows(store, view.name, cells, EMBEDDING_FEATURES)
    except (sqlite3.Error, WireFormatError) as exc:
        log.debug("direct online read of %s failed (%s): reading through Feast", view.name, exc)
        return None
    return cells, {f: [None if r is None else r.get(f) for r in rows] for f in EMBEDDING_FEATURES}


def _read_feast(settings: StoreSettings, lat: np.ndarray, lon: np.ndarray, version: str | None) -> Read:
    """(cells, {feature: values}) through Feast's get_online_features."""
    store = feature_store(settings)
    try:
        view = embedding_view(store, version)
        cells = cells_for(lat, lon, view.h3_resolution if view.h3_resolution is not None else settings.h3_resolution)
        response = store.get_online_features(
            features=[f"{view.name}:{f}" for f in EMBEDDING_FEATURES],
            entity_rows={"h3_cell": cells},
        ).to_dict()
    except Exception as exc:  # an unapplied registry, a missing table, an unreachable server
        if isinstance(exc, Loc2VecError):
            raise
        raise FeatureStoreError(
            f"online lookup failed ({type(exc).__name__}: {exc}); has `loc2vec publish` run for this store?"
        ) from exc
    return cells, response


def lookup_locations(
    lats: Sequence[float] | np.ndarray,
    lons: Sequence[float] | np.ndarray,
    settings: StoreSettings,
    version: str | None = None,
) -> Lookup:
    """Online embeddings for locations: lat/lon → H3 cell → the online store (get_location_embeddings without
    pandas; same arguments, same errors)."""
    lat, lon = check_locations(lats, lons)
    cells, response = _read_direct(settings, lat, lon, version) or _read_feast(settings, lat, lon, version)
    emb = response["embedding"]
    missing = [i for i, e in enumerate(emb) if e is None or len(e) == 0]
    if missing:
        i = missing[0]
        raise LocationNotPublishedError(
            f"{len(missing)} of {len(cells)} location(s) have no published embedding, e.g. #{i} "
            f"({lat[i]}, {lon[i]}) → H3 cell {cells[i]}: outside every embedded region's mapped land, "
            "or not published yet (`loc2vec embed` + `loc2vec publish`)"
        )
    return Lookup(
        lat=lat.tolist(),
        lon=lon.tolist(),
        h3_cell=cells,
        embedding=[[float(v) for v in e] for e in emb],
        model_name=list(response["model_name"]),
        model_version=list(response["model_version"]),
    )


def get_location_embeddings(
    lats: Sequence[float] | np.ndarray,
    lons: Sequence[float] | np.ndarray,
    settings: StoreSettings,
    version: str | None = None,
) -> pd.DataFrame:
    """Online embeddings for locations: lat/lon → H3 cell → the online store.

    Args:
        lats: latitudes in degrees.
        lons: longitudes in degrees, as many.
        settings: the store (its h3_resolution is used only when the registry predates the resolution tag).
        version: the model version to read (pinned: `location_embedding_v<version>`); None: the latest view,
            whose vectors change when a new champion is published (fine for exploring, not for a model).

    Returns:
        One row per location, in order: lat, lon, h3_cell, embedding (list of 16 floats), model_name,
        model_version.

    Raises:
        InvalidLocationError: a coordinate is NaN or out of range.
        LocationNotPublishedError: a location's cell has no published embedding.
        VersionNotServedError: `version` was never published or has been retired.
        FeatureStoreError: the store cannot be read (not published yet, unreachable).
    """
    return lookup_locations(lats, lons, settings, version).frame()


def historical_features(entity_df: pd.DataFrame, service_name: str, settings: StoreSettings) -> pd.DataFrame:
    """Point-in-time join of a FeatureService's features onto entity rows (for training classifiers).

    Args:
        entity_df: columns ``h3_cell`` (str) and ``event_timestamp`` (timezone-aware), plus any others
            (labels), which are passed through.
        service_name: a published feature service (e.g. ``transport_mode_v1``).
        settings: the store.

    Returns:
        The same rows in the same order with the service's features (``embedding``, ``model_version``,
        ``histogram``, ``tag_counts``) as of each row's timestamp: the latest version with event_timestamp ≤
        the row's (within the 10-year ttl). A row timestamped before any version was published gets
        NaN/None features: drop those rows, never fill them.

    Raises:
        FeatureStoreError: a malformed entity_df, or an unknown service.
    """
    import pandas as pd

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
    store = feature_store(settings)
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
    dask_tokens.register()  # the file offline store's dask join: 68 s → 2.8 s for 1,000 rows (serving/dask_tokens.py)
    got = store.get_historical_features(entity_df=keys, features=service).to_df()
    # Feast may reorder rows (and the file store drops rows outside a ttl window): join on _key.
    feature_cols = [c for c in got.columns if c not in keys.columns]
    out = frame.merge(got[["_key", *feature_cols]], on="_key", how="left", validate="many_to_one")
    return out.sort_values("_row").drop(columns=["_row", "_key"]).reset_index(drop=True)
