"""The embeddings Parquet of a region: one row per H3 cell, the schema every reader checks.

Columns: the cell and its centre, the embedding, the tile's channel histogram and tag counts (the
baselines), the H3 resolution, the model name and version, and the timestamps (embedding/run.py says why
they are what they are). Written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loc2vec.core.atomic import atomic_path
from loc2vec.core.errors import Loc2VecError


class EmbeddingsError(Loc2VecError, RuntimeError):
    """An embeddings file is missing or does not have the expected columns."""


def list_array(values: np.ndarray) -> pa.Array:
    """(n, k) float32 → list<float32> (variable-size lists: Feast maps them to Array(Float32))."""
    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=pa.float32()))


SCHEMA = pa.schema(
    [
        ("h3_cell", pa.string()),
        ("lat", pa.float64()),
        ("lon", pa.float64()),
        ("embedding", pa.list_(pa.float32())),
        ("histogram", pa.list_(pa.float32())),
        ("tag_counts", pa.list_(pa.float32())),
        ("h3_resolution", pa.int8()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("osm_timestamp", pa.timestamp("us", tz="UTC")),
        ("event_timestamp", pa.timestamp("us", tz="UTC")),
        ("created", pa.timestamp("us", tz="UTC")),
        ("region", pa.string()),
    ]
)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Readers see the old file or the new one, never half of one (loc2vec.atomic)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_embeddings(path: Path) -> pa.Table:
    """An embeddings Parquet, checked against the schema this module writes."""
    if not path.is_file():
        raise EmbeddingsError(f"no embeddings at {path}: run `loc2vec embed --region {path.stem}`")
    table = pq.read_table(path)
    missing = [f.name for f in SCHEMA if f.name not in table.column_names]
    if missing:
        raise EmbeddingsError(f"{path} lacks columns {missing}: re-run `loc2vec embed --region {path.stem}`")
    return table.select(SCHEMA.names).cast(SCHEMA)


def embedding_model(path: Path) -> dict[str, str]:
    """Which registered model version made an embeddings file ({} when there is none)."""
    if not path.is_file():
        return {}
    table = pq.read_table(path, columns=["model_name", "model_version"])
    if table.num_rows == 0:
        return {}
    return {"name": str(table.column("model_name")[0]), "version": str(table.column("model_version")[0])}
