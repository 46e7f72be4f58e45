"""Aligned retrains (params ``publish.align_to: previous``): a new model version N is also published rotated
into the space of the version before it, as a version of its own named ``NaM`` (M: the space it lives in).

Why a version of its own, not a replacement: consumers pinned to N must get N's vectors as trained (a pinned
version never changes), and those pinned to M keep M's until they choose to move. ``NaM`` has its own view
(``location_embedding_vNaM``) and services (``transport_mode_vNaM``) like any version, so a consumer
trained on M switches its service name from ``_vM`` to ``_vNaM``: new model, old space, no retraining.
Aligning is chained: with ``NaM`` published, the next version K is fitted against ``NaM``'s vectors
(already in M's space) and is published as ``KaM``: every aligned version stays in the first one's space.

How: per region, N's rows (the region file being published) and the previous version's rows (the newest
version older than N in the published offline store, plain or aligned) are matched by cell; the isometry is
fitted on the shared cells (serving/procrustes.py: orthogonal Procrustes after centring) and applied to all
of N's cells. Its rows carry N's event timestamp minus 1 µs: ordered after M, just before N, so the
``latest`` view keeps serving N's own vectors. The rows are a deterministic function of the two versions'
rows, written to data/feast/aligned/ only when they change (so a re-publish is idempotent), and each time
they are written the rotation, the means, the residual and the cells it was fitted on are logged to MLflow
(experiment ``loc2vec-align``). That happens before the rest of the publish: a publish that fails later
leaves the rows and the run, and the next one serves the rows without logging them again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from loc2vec.core.atomic import write_text
from loc2vec.embedding.store import SCHEMA, read_embeddings, write_parquet_atomic
from loc2vec.serving.procrustes import Alignment, fit_alignment
from loc2vec.serving.store import StoreSettings
from loc2vec.serving.view_names import version_key

log = logging.getLogger(__name__)
EXPERIMENT = "loc2vec-align"


def base_version(version: str) -> int:
    """The trained model version behind a version name: 3 for "3" and for "3a1"."""
    return int(version.split("a")[0])


def space_of(version: str) -> str:
    """The version whose space a version's vectors live in: "1" for "3a1", "3" for "3"."""
    return version.split("a")[1] if "a" in version else version


def _previous(offline: pa.Table | None, region: str, model: str, version: str) -> str | None:
    """The newest published version of `model` for `region` older than `version` (plain or aligned)."""
    if offline is None:
        return None
    mine = offline.filter(
        pc.and_(pc.equal(offline.column("region"), region), pc.equal(offline.column("model_name"), model))
    )
    older = {
        str(v)
        for v in mine.column("model_version").unique().to_pylist()
        if base_version(str(v)) < base_version(version)
    }
    return max(older, key=version_key) if older else None


def _rows_of(table: pa.Table, region: str, model: str, version: str) -> pa.Array:
    """The mask of one (region, model, version)'s rows."""
    same = pc.and_(pc.equal(table.column("region"), region), pc.equal(table.column("model_name"), model))
    return pc.and_(same, pc.equal(table.column("model_version"), version))


def _vectors(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    cells = np.asarray(table.column("h3_cell").to_pylist(), dtype=object)
    return cells, np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)


def aligned_rows(new: pa.Table, old: pa.Table, name: str) -> tuple[pa.Table, Alignment]:
    """N's rows rotated into the space of `old`'s (same region; one version each), named `name`."""
    new_cells, x_new = _vectors(new)
    old_cells, x_old = _vectors(old)
    _, i_new, i_old = np.intersect1d(new_cells.astype(str), old_cells.astype(str), return_indices=True)
    alignment = fit_alignment(x_new[i_new], x_old[i_old])
    vectors = alignment.apply(x_new)
    ts = new.column("event_timestamp")
    earlier = pc.subtract(ts, pa.scalar(timedelta(microseconds=1), type=pa.duration(ts.type.unit)))
    table = new.set_column(
        new.schema.get_field_index("embedding"),
        "embedding",
        pa.array(list(vectors), new.schema.field("embedding").type),
    )
    table = table.set_column(
        table.schema.get_field_index("model_version"), "model_version", pa.array([name] * new.num_rows, pa.string())
    )
    table = table.set_column(table.schema.get_field_index("event_timestamp"), "event_timestamp", earlier.cast(ts.type))
    created = table.column("created")
    table = table.set_column(table.schema.get_field_index("created"), "created", earlier.cast(created.type))
    return table.cast(SCHEMA), alignment


def _log(
    settings: StoreSettings, region: str, new: str, previous: str, name: str, alignment: Alignment, path: Path
) -> None:
    from loc2vec.core.tracking import setup_mlflow

    mlflow = setup_mlflow(EXPERIMENT, settings.paths)
    with mlflow.start_run(run_name=f"align {region} v{new} → v{previous} ({name})"):
        mlflow.log_params(
            {"region": region, "new_version": new, "previous_version": previous, "aligned_version": name,
             "space_of": space_of(name), "centred": True, "method": "scipy.linalg.orthogonal_procrustes"}
        )  # fmt: skip
        mlflow.log_metrics(
            {"residual": alignment.residual, "residual_unaligned": alignment.residual_unaligned,
             "shared_cells": alignment.n_cells}
        )  # fmt: skip
        record = path.with_suffix(".json")
        write_text(record, json.dumps(alignment.record(), indent=1))
        mlflow.log_artifact(str(record))


def aligned_files(settings: StoreSettings, files: Iterable[Path] | None) -> list[Path] | None:
    """The files to publish: `files` (None: every data/embeddings/*.parquet) plus, with align_to previous,
    each one's aligned rows (written to data/feast/aligned/ when they change). Unchanged when align_to is none.
    """
    if settings.align_to != "previous":
        return None if files is None else list(files)
    regions = sorted(settings.paths.embeddings_dir.glob("*.parquet")) if files is None else [Path(f) for f in files]
    offline_path = settings.paths.offline_store
    offline = pq.read_table(offline_path).cast(SCHEMA) if offline_path.exists() else None  # a file or a partition dir
    out = list(regions)
    for path in regions:
        table = read_embeddings(path)
        for key in (
            table.select(["region", "model_name", "model_version"])
            .group_by(["region", "model_name", "model_version"])
            .aggregate([])
            .to_pylist()
        ):
            region, model, version = key["region"], key["model_name"], str(key["model_version"])
            if "a" in version:
                continue
            previous = _previous(offline, region, model, version)
            if previous is None:
                continue
            name = f"{version}a{space_of(previous)}"
            assert offline is not None  # a previous version was found in it
            old = offline.filter(_rows_of(offline, region, model, previous))
            latest_old = old.filter(pc.equal(old.column("event_timestamp"), pc.max(old.column("event_timestamp"))))
            rows, alignment = aligned_rows(table.filter(_rows_of(table, region, model, version)), latest_old, name)
            target = settings.feast_dir / "aligned" / f"{region}_v{name}.parquet"
            unchanged = target.is_file() and pq.read_table(target).cast(SCHEMA).equals(rows)
            if not unchanged:
                write_parquet_atomic(rows, target)
                _log(settings, region, version, previous, name, alignment, target)
                log.info(
                    "aligned %s v%s into v%s's space as v%s: residual %.4f (unaligned %.4f) on %d cells",
                    region, version, previous, name, alignment.residual, alignment.residual_unaligned, alignment.n_cells,
                )  # fmt: skip
            out.append(target)
    return out


def alignment_record(path: Path) -> dict[str, Any]:
    """The rotation and residual recorded beside an aligned file."""
    return json.loads(path.with_suffix(".json").read_text())
