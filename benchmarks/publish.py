"""Publish: a full publish and an incremental one (one region added to a store of several), in one run.

Regions: the project's embeddings (data/embeddings/*.parquet, real vectors of `loc2vec embed`); to reach
several regions and a store of a few hundred thousand cells from the one or two regions a checkout has,
each is also copied `n − 1` times with its cells moved by whole multiples of its latitude extent (the cell at
the moved centre, h3.latlng_to_cell; the vectors, histograms and tag counts are the real ones). The copies are
labelled ``<region>_copyK``: synthetic positions, used only here.

In a throwaway project (its own data/feast, SQLite online store), with `loc2vec.serving.publish.publish`:

* ``full``: the first publish of every region but the last (an empty store: every cell in every view);
* ``incremental``: then the last region added, given alone (`--embeddings` of that region, as the DVC stage
  ``publish@R`` runs it): only its partition written;
* ``noop``: the same again (nothing changed: nothing written); ``noop_all_files``: every region file given
  (what a bare `loc2vec publish` reads: each file is split and digested, then nothing is written).

``incremental.predicted_s`` is full's time scaled by the incremental's share of cells (its cells over full's);
``incremental.ratio`` its time over that (target ≤ 2). Times are end to end (reading the region files,
digests, apply, online writes, checks), after one untimed publish of a tiny region that imports Feast.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from loc2vec.cli.project import Project
from loc2vec.core.paths import ProjectPaths
from loc2vec.embedding.store import SCHEMA, read_embeddings


def _moved(table: pa.Table, k: int) -> pa.Table:
    """The region moved north by k times its latitude extent (+10%), under the name <region>_copy<k>."""
    import h3

    if k == 0:
        return table
    lat = table.column("lat").to_numpy()
    lon = table.column("lon").to_numpy()
    res = int(table.column("h3_resolution")[0].as_py())
    shift = k * 1.1 * (float(lat.max()) - float(lat.min()) + 0.01)
    cells = [h3.latlng_to_cell(float(a) + shift, float(b), res) for a, b in zip(lat, lon, strict=True)]
    region = f"{table.column('region')[0].as_py()}_copy{k}"
    out = table.set_column(table.schema.get_field_index("h3_cell"), "h3_cell", pa.array(cells))
    out = out.set_column(out.schema.get_field_index("lat"), "lat", pa.array(lat + shift))
    out = out.set_column(out.schema.get_field_index("region"), "region", pa.array([region] * out.num_rows))
    _, first = np.unique(np.asarray(cells), return_index=True)  # two centres may fall in one cell
    return out.take(pa.array(np.sort(first)))


def _settings(project: Project, root: Path):
    from loc2vec.serving.store import StoreSettings

    params = project.params
    paths = ProjectPaths(root=root)
    return StoreSettings.from_config(params.publish, params.embed, paths, project.info, "sqlite")


def _timed(settings, files: list[Path]) -> tuple[float, dict[str, Any]]:
    from loc2vec.serving.publish import publish

    started = time.perf_counter()
    report = publish(settings, files)
    return time.perf_counter() - started, report


def run(project: Project, *, region: str | None = None, n: int | None = None) -> dict:
    sources = sorted(project.paths.embeddings_dir.glob("*.parquet"))
    if region:
        sources = [project.paths.embeddings(region)]
    if not sources:
        raise ValueError(f"no embeddings in {project.paths.embeddings_dir}: run `loc2vec embed` first")
    regions = max(n or 4, 2)
    tables = [read_embeddings(p) for p in sources]
    made = [_moved(t, k) for k in range(-(-regions // len(tables))) for t in tables][:regions]
    with tempfile.TemporaryDirectory(prefix="loc2vec-bench-publish-") as tmp:
        root = Path(tmp)
        (root / "feature_repo").mkdir()
        files = []
        for t in made:
            name = t.column("region")[0].as_py()
            path = root / "data" / "embeddings" / f"{name}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(t.cast(SCHEMA), path, compression="zstd")
            files.append(path)
        warm = root / "warm"
        warm.mkdir()
        (warm / "feature_repo").mkdir()
        tiny = warm / "tiny.parquet"
        pq.write_table(made[0].slice(0, 64), tiny)
        _timed(_settings(project, warm), [tiny])  # Feast imported, definitions loaded: not timed below
        shutil.rmtree(warm)

        settings = _settings(project, root)
        full_s, full = _timed(settings, files[:-1])
        inc_s, inc = _timed(settings, files[-1:])  # as `publish@R` runs it: --embeddings of the new region
        noop_s, noop = _timed(settings, files[-1:])
        all_s, all_files = _timed(settings, files)  # `loc2vec publish` with every region file: nothing changed
        full_cells, inc_cells = full["materialized"]["cells"], inc["materialized"]["cells"]
        predicted = full_s * inc_cells / full_cells
        disk = sum(p.stat().st_size for p in (root / "data" / "feast" / "partitions").glob("*.parquet"))
        offline_rows = pc.sum(pa.array([t.num_rows for t in made])).as_py()
    return {
        "sources": [str(p) for p in sources],
        "regions": [t.column("region")[0].as_py() for t in made],
        "synthetic_copies": len(made) - len(tables[: len(made)]),
        "offline_rows": offline_rows,
        "full": {
            "cells": full_cells,
            "seconds": round(full_s, 2),
            "cells_per_s": round(full_cells / full_s, 1),
            "rows_written": full["materialized"]["rows_written"],
            "write_s": full["materialized"]["write_s"],
            "read_s": full["materialized"]["read_s"],
            "apply_s": full["apply_s"],
        },
        "incremental": {
            "cells": inc_cells,
            "share": round(inc_cells / full_cells, 4),
            "seconds": round(inc_s, 2),
            "cells_per_s": round(inc_cells / inc_s, 1),
            "predicted_s": round(predicted, 2),
            "ratio": round(inc_s / predicted, 2),
            "mode": inc["materialized"]["mode"],
            "read_partitions": inc["materialized"]["read_partitions"],
            "rows_written": inc["materialized"]["rows_written"],
            "write_s": inc["materialized"]["write_s"],
            "apply_s": inc["apply_s"],
        },
        "noop": {"seconds": round(noop_s, 2), "skipped": noop["skipped"]},
        "noop_all_files": {"seconds": round(all_s, 2), "skipped": all_files["skipped"]},
        "partition_bytes": disk,
        "target": {"full_cells_per_s": 10_000, "incremental_ratio_max": 2.0},
    }
