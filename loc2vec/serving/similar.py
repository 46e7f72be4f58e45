"""`loc2vec similar`: the k published cells whose embeddings are nearest to a location's, across regions.

The query vector is the location's cell as served online (serving.lookup.get_location_embeddings), so
`similar` answers with what consumers see; the search runs on the FAISS index of the published data
(serving/similar_index.py), only among cells of the query's model version.

Why exclude nearby cells: a tile spans 200 m and H3 res-11 cells are ~50 m apart, so the nearest
embeddings of any cell are its own overlapping neighbours. Cells within ``exclude_radius_m`` (default
2·radius: no overlap) of the query are skipped, so the answer lists *other* places (0 keeps them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from loc2vec.core.geo import haversine_m
from loc2vec.serving.lookup import get_location_embeddings
from loc2vec.serving.similar_index import SimilarError, SimilarIndex
from loc2vec.serving.store import StoreSettings

RESULT_COLUMNS = ["rank", "h3_cell", "region", "lat", "lon", "distance", "geo_km", "model_version"]


def nearby_cells(cell: str, radius_m: float) -> frozenset[str]:
    """The cell and every cell of its resolution whose centre lies within radius_m of its centre."""
    import h3

    if radius_m <= 0:
        return frozenset({cell})
    res = h3.get_resolution(cell)
    ring = int(math.ceil(radius_m / (1.5 * h3.average_hexagon_edge_length(res, "m")))) + 2
    disk = list(h3.grid_disk(cell, ring))
    lat0, lon0 = h3.cell_to_latlng(cell)
    latlng = np.array([h3.cell_to_latlng(c) for c in disk])
    near = haversine_m(lat0, lon0, latlng[:, 0], latlng[:, 1]) <= radius_m
    return frozenset(c for c, n in zip(disk, near, strict=True) if n) | {cell}


def similar(
    lat: float,
    lon: float,
    index: SimilarIndex,
    store: StoreSettings,
    k: int | None = None,
    *,
    regions: Sequence[str] | None = None,
    exclude_radius_m: float | None = None,
) -> pd.DataFrame:
    """The k published cells most similar to the location's, ranked by embedding distance.

    Args:
        lat: the query's latitude.
        lon: the query's longitude.
        index: the index of the current publication (similar_index.ensure_index).
        store: the feature store serving the query's own embedding.
        k: how many cells (default: params explore.similar.k).
        regions: search only these published regions (default: all).
        exclude_radius_m: leave out cells this close to the query (default: params, 200 m).

    Returns:
        Columns rank, h3_cell, region, lat, lon, distance (L2 in embedding space), geo_km (from the query
        cell), model_version; ``.attrs["query"]`` describes the query cell and the index.
    """
    cfg = index.cfg
    k = cfg.k if k is None else int(k)
    if k < 1:
        raise SimilarError(f"k must be ≥ 1, got {k}")
    radius = cfg.exclude_radius_m if exclude_radius_m is None else float(exclude_radius_m)
    if not math.isfinite(radius) or radius < 0:
        raise SimilarError(f"exclude radius must be a finite number ≥ 0, got {radius}")
    index.check_regions(regions)
    row = get_location_embeddings([lat], [lon], store).iloc[0]
    groups = index.select(row["model_name"], str(row["model_version"]), regions)
    exclude = nearby_cells(row["h3_cell"], radius)
    found = index.search(np.asarray(row["embedding"], dtype=np.float32), groups, k, exclude)
    import h3

    qlat, qlon = h3.cell_to_latlng(row["h3_cell"])
    found["geo_km"] = haversine_m(qlat, qlon, found["lat"].to_numpy(float), found["lon"].to_numpy(float)) / 1000
    found.insert(0, "rank", np.arange(1, len(found) + 1))
    out = found[RESULT_COLUMNS].reset_index(drop=True)
    out.attrs["query"] = {
        "lat": float(lat),
        "lon": float(lon),
        "h3_cell": row["h3_cell"],
        "model_name": row["model_name"],
        "model_version": str(row["model_version"]),
        "regions": [g.region for g in groups],
        "excluded_cells": len(exclude),
        "exclude_radius_m": radius,
        "index": {"key": index.manifest["key"], "kind": cfg.index, "cells": index.n_cells},
    }
    return out
