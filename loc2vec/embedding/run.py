"""Embed a region: every H3 cell on mapped land → a 16-D embedding with the `champion` model (the `embed` stage).

Which cells (embedding/cells.py): the H3 cells (``embed.h3_resolution``, default 11: ~29 m edge, so a cell is far smaller
than a 200 m tile) whose centres lie inside the import bbox shrunk by ``render.radius_m`` (so every
tile lies inside the data) and on *mapped land* — sampling's rule (sampling/land.py): a tile that
reaches the land, centred inside a land-use/natural/leisure/amenity/building polygon that is not water,
or within radius/2 of a road, rail or path. Candidates come from the land polygons built from the
coastline, not from the bbox. Liechtenstein at resolution 11: 145,625 candidates, 89,492 on mapped land;
Monaco: 20,310 candidates (33,668 in its bbox), 16,049 on mapped land.

How (``embed.method``): ``dense`` (embedding/dense.py, the default) runs the encoder's convolutional trunk once
over each metatile, in windows, and its dense head at each cell's tile corner on the trunk's output grid
(sampled every ``embed.dense_stride`` px, the corner bilinearly interpolated between grid positions);
``per_tile`` (embedding/encode.py, the reference and the path for arbitrary points) cuts each cell's tile
from the fast path (``ensure_metatiles`` + ``cut_tiles``, angle 0, no shift) and encodes it in fixed
batches. Both run under ``torch.no_grad`` with the model in eval mode, and give each cell's ``histogram``
(fraction of non-zero pixels per channel of its tile: the evaluation's naive baseline); PostGIS gives
``tag_counts`` (OSM features by category within the tile radius: the second baseline, see TAG_COUNT_NAMES).
`loc2vec bench embed` measures both side by side (speed, and cosine agreement of dense with per-tile).

Why these timestamps: ``event_timestamp`` is when the embeddings became valid: the later of the model
version's registration time and the region's import time (an embedding cannot exist before both
its model and its data). ``created`` equals it. Both are pure functions of (model version, import), so
embedding again with the same model and data gives byte-identical Parquet, and publishing it again
changes nothing. A new model version, or a new import, is a new event: the feature store keeps
both and serves the latest (loc2vec/publish.py).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from loc2vec.core.atomic import write_text
from loc2vec.core.config import EmbedConfig, OrchestrateConfig
from loc2vec.core.names import validate_region_name
from loc2vec.core.numerics import cpu_bf16_enabled
from loc2vec.core.paths import ProjectPaths
from loc2vec.embedding.cells import EmbedError, select_cells
from loc2vec.embedding.dense import DenseSettings, encode_dense
from loc2vec.embedding.encode import encode_cells
from loc2vec.embedding.store import SCHEMA, list_array, write_parquet_atomic
from loc2vec.embedding.tag_counts import TAG_COUNTS, tag_counts
from loc2vec.orchestration.runners import runner_kind
from loc2vec.osm.db import ConnInfo, ImportRecord, require_import
from loc2vec.raster.metatiles import MetatileSpec, ensure_metatiles
from loc2vec.training.registry import ModelRef, load_model

log = logging.getLogger(__name__)


def _utc(ts: datetime) -> datetime:
    """UTC, truncated to microseconds (Parquet/Arrow timestamp[us]): the same value round-trips exactly."""
    if ts.tzinfo is None:
        raise EmbedError(f"naive timestamp {ts!r}: every timestamp must be timezone-aware")
    return ts.astimezone(UTC)


def event_time(model: ModelRef, record: ImportRecord) -> datetime:
    """When these embeddings became valid: both the model version and the import existed."""
    return max(_utc(model.created), _utc(record.imported_at))


class EmbedResult(type(Path())):  # type: ignore[misc]
    """The Parquet path, carrying the run's `stats` (cells, cells/s, model, timings)."""

    stats: dict[str, Any]


def embed_region(
    region: str,
    model: ModelRef,
    out: Path,
    *,
    cfg: EmbedConfig,
    spec: MetatileSpec,
    paths: ProjectPaths,
    info: ConnInfo,
    orchestrate: OrchestrateConfig,
    progress: bool = True,
) -> EmbedResult:
    """Embed every mapped-land H3 cell of a region with a registered model version; see the module doc.

    Args:
        region: an ingested region.
        model: the version to embed with (the pipeline passes the `champion`).
        out: the Parquet to write, atomically (its .json sibling gets the run's stats).
        cfg: params `embed:`.
        spec: the metatiles' geometry (params render, augment, tiles).
        paths: the project's paths (metatile directory and locks; the MLflow store).
        info: the database.
        orchestrate: the task runner that fans the encoding out.
        progress: show progress bars.

    Returns:
        The Parquet path, whose `.stats` holds cells and cells/s.
    """
    validate_region_name(region)
    radius = float(spec.grid.radius_m)
    record = require_import(region, info)
    ref = model
    timings: dict[str, float] = {}
    started = t0 = time.perf_counter()

    encoder = load_model(paths, ref)
    timings["load_model_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cells, lats, lons = select_cells(region, cfg, radius, info)
    timings["select_cells_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tags = (
        tag_counts(region, lats, lons, radius, info)
        if cfg.tag_counts
        else np.zeros((len(cells), len(TAG_COUNTS)), "f4")
    )
    timings["tag_counts_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    index = ensure_metatiles(
        region,
        lats,
        lons,
        spec=spec,
        paths=paths,
        info=info,
        orchestrate=orchestrate,
        progress=progress,
    )
    timings["metatiles_s"] = time.perf_counter() - t0

    # Encode in metatile order (memory-mapped pages are read once), output in cell order.
    order = np.lexsort((np.arange(len(cells)), np.asarray(index.keys_for(lats, lons))))
    t0 = time.perf_counter()
    runner = runner_kind(orchestrate)  # chunks (whole batches, or metatiles) on the configured task runner
    bf16 = cpu_bf16_enabled(cfg.cpu_bf16)  # resolved by `loc2vec embed`; DenseSettings reads it the same way
    if cfg.method == "dense":
        emb_o, hist_o = encode_dense(
            encoder,
            index,
            lats[order],
            lons[order],
            DenseSettings.from_config(cfg),
            progress,
            cfg=orchestrate,
            kind=runner,
        )
    else:
        emb_o, hist_o = encode_cells(
            encoder,
            index,
            lats[order],
            lons[order],
            cfg.batch_size,
            progress,
            cfg=orchestrate,
            kind=runner,
            bf16=bf16,
        )
    encode_s = timings["encode_s"] = time.perf_counter() - t0
    emb, hist = np.empty_like(emb_o), np.empty_like(hist_o)
    emb[order], hist[order] = emb_o, hist_o

    event = event_time(ref, record)
    n = len(cells)

    def const(value: Any, typ: pa.DataType) -> pa.Array:
        return pa.array([value] * n, type=typ)

    ts = pa.timestamp("us", tz="UTC")
    table = pa.Table.from_arrays(
        [
            pa.array(cells, type=pa.string()),
            pa.array(lats),
            pa.array(lons),
            list_array(emb),
            list_array(hist),
            list_array(tags),
            const(cfg.h3_resolution, pa.int8()),
            const(ref.name, pa.string()),
            const(ref.version, pa.string()),
            const(_utc(record.osm_timestamp) if record.osm_timestamp else None, ts),
            const(event, ts),
            const(event, ts),
            const(region, pa.string()),
        ],
        schema=SCHEMA,
    )
    path = out
    write_parquet_atomic(table, path)
    total = time.perf_counter() - started
    # The .json beside the Parquet is a DVC output: only what the data, model and params determine. How
    # long it took (and on how many threads) describes this run, not its result: the log and `stats` only.
    record = {
        "region": region,
        "cells": n,
        "h3_resolution": cfg.h3_resolution,
        "model_name": ref.name,
        "model_version": ref.version,
        "event_timestamp": event.isoformat(),
        "config": cfg.model_dump(mode="json"),
    }
    stats = {
        **record,
        "path": str(path),
        "method": cfg.method,
        "cpu_bf16": bf16,
        "cells_per_s": round(n / encode_s, 1),  # cells encoded per second (per_tile: tiles cut + encoded)
        "cells_per_s_end_to_end": round(n / total, 1),
        "seconds": round(total, 1),
        "torch_threads": torch.get_num_threads(),
        "task_runner": runner,
        **{k: round(v, 2) for k, v in timings.items()},
    }
    write_text(path.with_suffix(".json"), json.dumps(record, indent=1, default=str))
    log.debug("%s: embedding run stats %s", region, json.dumps(stats, default=str))
    log.info(
        "%s: embedded %d cells with %s v%s in %.1f s (%.0f cells/s encoding, %.0f cells/s end to end) → %s",
        region,
        n,
        ref.name,
        ref.version,
        total,
        stats["cells_per_s"],
        stats["cells_per_s_end_to_end"],
        path,
    )
    result = EmbedResult(path)
    result.stats = stats
    return result
