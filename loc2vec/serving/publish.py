"""Publish embeddings to Feast: the offline Parquet, `feast apply`, materialization to the online store.

Steps (serialised by a lock file: Feast's file registry has no protection against concurrent writers):

1. Offline: the regions' embeddings Parquets (default: every data/embeddings/*.parquet) are merged into
   data/feast/embeddings.parquet,
   the FileSource of all regions and model versions. A region's rows replace the earlier rows of the same
   (region, model, version, event_timestamp) and keep the others, so an older model version's rows stay
   with their own event timestamps (point-in-time joins need them). The file is rewritten (atomically)
   only when its content changes.
2. Apply: the definitions in feature_repo/ (imported like `feast apply` does), via FeatureStore.apply.
3. Materialize. Feast writes, per feature view, the latest row of each cell within the materialized
   event-time window, so the online store always serves the latest event_timestamp per cell (a new
   model version, or a new import, wins; an old one can never overwrite it), whatever order regions and
   versions were published in. Two modes:

   * full: the whole event-time range of the offline data. Used on the first publish to a store, when
     the definitions or the store config changed, when the state has no partition record, when a
     partition that was materialized is gone from the offline data or its set of cells changed, when
     the online store disagrees with the offline data (a spot check; e.g. online.db deleted), and when
     forced.
   * window: otherwise, only [earliest event_timestamp of the changed partitions, end]. A partition is
     (region, model_name, model_version, event_timestamp) (PARTITION); the state records a content
     digest of each one materialized, and the changed ones are those that are new or whose digest
     differs (same cells, other values). Why this is enough: a cell with a changed row has its globally
     latest row at a timestamp >= that row's, so inside the window, and Feast writes exactly that row;
     a cell without rows in the window has no changed row (every changed row is in the window) and
     lost none (a partition that lost cells is "full"), so its online value, already correct, is left
     untouched. The window may include unchanged partitions with later timestamps: their cells are
     rewritten with the same values. Before a window is used, the cells outside it are spot-checked
     online (they are not rewritten, so they must already be right); if they are not, it is "full".

Idempotence: the content digests of the offline data and of each of its partitions, the definitions
and the store config are recorded in data/feast/published_<store>.json, only after the materialization
and a spot check of online rows (cells spread over all cells' latest rows, and over the window's)
succeeded; when all match and a spot check agrees with the offline data, nothing is applied or written.
(Forced, re-materializing the same data rewrites the same values and timestamps: the rows are identical.)

Killed at any point, consumers keep answering: the registry consumers read (data/feast/registry.db) is
never written in place. A publish copies it to registry.db.staging, applies and materializes against
the copy, and only when the spot checks pass swaps it in with one `os.replace`. Feast's file registry
writes in place (truncate, then write) and materialize() flips every feature view to MATERIALIZING
in it first; a kill -9 mid-materialize used to leave the live registry with views in MATERIALIZING,
and every consumer lookup then failed until the next publish. Now a killed publish leaves only a stale
staging file (the next publish starts a new one from the live registry). An unreadable live registry is
rebuilt (apply + full materialization; it is derived state).

An unreadable SQLite online store (a corrupt or truncated online.db) is moved aside to online.db.corrupt
and rebuilt from the offline store (full materialization): it is derived from the offline Parquet too.

No half-updated online store: Feast writes each feature view's rows in one `online_write_batch` call
(`materialization.online_write_batch_size` unset, checked below), which both the SQLite store (one
`with conn:` transaction) and the PostgreSQL store (executemany + one commit) make a single transaction:
readers see a view all-old or all-new. The views are written one after the other; a view's columns
that belong together (embedding + model_version) are in the same view. A crash mid-publish leaves
each view at its old or new state and the recorded digests unchanged, so the next publish redoes it
(the same window, or the full range).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from loc2vec.core.atomic import file_lock, write_text
from loc2vec.core.errors import Loc2VecError
from loc2vec.embedding.store import SCHEMA, read_embeddings, write_parquet_atomic
from loc2vec.serving.aligned import aligned_files
from loc2vec.serving.feast_import import import_feast
from loc2vec.serving.sql_registry import staged_sql_registry
from loc2vec.serving.store import (
    DEFINITION_MODULES,
    SOURCE_REPO,
    FeatureStoreError,
    StoreSettings,
    describe,
    forget_stores,
    is_sql_registry,
    online_db_path,
    refresh_cached,
    registry_path,
    staged_store,
    store_yaml,
)
from loc2vec.serving.versions import (
    LATEST_VIEW,
    ServedVersion,
    VersionError,
    check_same_models,
    pinned_view,
    served_versions,
    version_key,
    view_version,
    write_version_file,
)

log = logging.getLogger(__name__)
PARTITION = ("region", "model_name", "model_version", "event_timestamp")
SPOT_CHECK = 32  # cells compared between offline and online data


class PublishError(Loc2VecError, RuntimeError):
    """Nothing to publish, or the online store does not hold what was published."""


def publish_lock(settings: StoreSettings) -> contextlib.AbstractContextManager[None]:
    """One writer of a store at a time (Feast's file registry does not protect itself)."""
    return file_lock(settings.feast_dir / ".publish.lock")


# ---------------------------------------------------------------- offline data


def _region_files(files: Iterable[Path] | None, settings: StoreSettings) -> list[Path]:
    if files is None:
        found = sorted(settings.paths.embeddings_dir.glob("*.parquet"))
        if not found:
            raise PublishError(
                f"no embeddings in {settings.paths.embeddings_dir}: run `loc2vec embed --region NAME` first"
            )
        return found
    return [Path(f) for f in files]


def merge_offline(existing: pa.Table | None, new: list[pa.Table]) -> pa.Table:
    """Existing rows minus the partitions the new tables bring, plus the new rows; one row per
    (h3_cell, event_timestamp) (overlapping regions: the alphabetically first region's row), sorted."""
    tables = [t.cast(SCHEMA) for t in new]
    if existing is not None and existing.num_rows:
        replaced = set()
        for t in tables:
            replaced |= {tuple(r[c] for c in PARTITION) for r in t.select(list(PARTITION)).to_pylist()}
        part = existing.select(list(PARTITION)).to_pylist()
        keep = np.array([tuple(r[c] for c in PARTITION) not in replaced for r in part], dtype=bool)
        tables.insert(0, existing.cast(SCHEMA).filter(pa.array(keep)))
    merged = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    merged = merged.sort_by([("h3_cell", "ascending"), ("event_timestamp", "ascending"), ("region", "ascending")])
    # Feast's point-in-time join breaks ties on event_timestamp arbitrarily: keep one row per tie.
    cell, ts = merged.column("h3_cell").to_numpy(zero_copy_only=False), merged.column("event_timestamp").to_numpy()
    first = np.ones(len(cell), dtype=bool)
    first[1:] = (cell[1:] != cell[:-1]) | (ts[1:] != ts[:-1])
    return merged.filter(pa.array(first)).combine_chunks()


def update_offline(files: Iterable[Path] | None, settings: StoreSettings) -> tuple[Path, bool, pa.Table]:
    """Merge region embeddings into the offline Parquet; rewrite it only if its content changes."""
    path = settings.paths.offline_store
    existing = pq.read_table(path).cast(SCHEMA) if path.is_file() else None
    merged = merge_offline(existing, [read_embeddings(p) for p in _region_files(files, settings)])
    if existing is not None and existing.equals(merged):
        return path, False, existing
    write_parquet_atomic(merged, path)
    log.info("offline store: %d rows → %s", merged.num_rows, path)
    return path, True, merged


def file_digest(path: Path) -> str:
    """The offline file's sha256: it is rewritten only when its content changes, so this is stable."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _hash_array(h: Any, arr: pa.Array | pa.ChunkedArray) -> None:
    """Feed an array's values into h in a canonical form: independent of chunks, slices and buffer layout."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    h.update(str(arr.type).encode() + b"\0" + len(arr).to_bytes(8, "little"))
    h.update(np.packbits(arr.is_null().to_numpy(zero_copy_only=False)).tobytes())
    typ = arr.type
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        h.update(pc.list_value_length(arr).fill_null(0).to_numpy().astype("<i8").tobytes())
        _hash_array(h, arr.flatten())  # the values of the non-null lists, in order
    elif pa.types.is_string(typ) or pa.types.is_large_string(typ):
        arr = arr.fill_null("")
        h.update(pc.binary_length(arr).to_numpy().astype("<i8").tobytes())
        joined = pc.binary_join(pa.ListArray.from_arrays(pa.array([0, len(arr)], pa.int32()), arr), "")[0]
        h.update(joined.as_buffer() or b"")
    else:
        if pa.types.is_timestamp(typ):
            arr = arr.cast(pa.int64())
        h.update(np.ascontiguousarray(arr.fill_null(0).to_numpy(zero_copy_only=False)).tobytes())


def _partition_id(key: tuple) -> str:
    return "/".join(key)


def partition_digests(table: pa.Table) -> dict[tuple[str, ...], dict[str, Any]]:
    """Per partition (PARTITION; event_timestamp as UTC ISO text): rows, a digest of its cells and a digest
    of its whole content (rows in h3_cell order; each cell has one row per partition). Vectorised: ~1 s for
    850k rows."""
    keys = [(c, "ascending") for c in PARTITION]
    ordered = table.sort_by([*keys, ("h3_cell", "ascending")])
    groups = table.group_by(list(PARTITION)).aggregate([([], "count_all")]).sort_by(keys)
    columns = [c for c in ordered.column_names if c not in PARTITION]
    out: dict[tuple[str, ...], dict[str, Any]] = {}
    offset = 0
    for group in groups.to_pylist():
        n = group["count_all"]
        part = ordered.slice(offset, n)
        offset += n
        cells, content = hashlib.sha256(), hashlib.sha256()
        _hash_array(cells, part.column("h3_cell"))
        for name in columns:
            content.update(name.encode() + b"\0")
            _hash_array(content, part.column(name))
        key = (*(group[c] for c in PARTITION[:-1]), group["event_timestamp"].astimezone(UTC).isoformat())
        out[key] = {"rows": n, "cells_digest": cells.hexdigest(), "digest": content.hexdigest()}
    return out


# ---------------------------------------------------------------- definitions


def _definition_modules() -> dict[str, Any]:
    """The modules of feature_repo/, imported the way `feast apply` does (repo dir on sys.path)."""
    import_feast()
    repo = str(SOURCE_REPO)
    added = repo not in sys.path
    if added:
        sys.path.insert(0, repo)
    try:
        modules = {}
        for name in DEFINITION_MODULES:
            module = importlib.import_module(name)
            if Path(module.__file__ or "").resolve().parent != SOURCE_REPO:
                raise FeatureStoreError(f"module {name!r} is {module.__file__}, not {SOURCE_REPO / name}.py")
            modules[name] = module
    finally:
        if added:
            sys.path.remove(repo)
    return modules


def load_definitions(settings: StoreSettings | None = None, versions: Iterable[ServedVersion] = ()) -> list[Any]:
    """The Feast objects of feature_repo/*.py, plus, for each served model version, its pinned view (over its
    own offline file) and pinned services; the latest view is tagged with the newest version's H3 resolution
    (what a client needs to turn a location into a cell)."""
    modules = _definition_modules()
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    objects: list[Any] = []
    for module in modules.values():
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if isinstance(obj, Entity | DataSource | FeatureView | FeatureService) and not any(
                obj is o for o in objects
            ):
                objects.append(obj)
    versions = list(versions)
    if not versions:
        return objects
    assert settings is not None, "versioned definitions need the store's paths"
    newest = versions[-1]
    for i, obj in enumerate(objects):
        if isinstance(obj, FeatureView) and obj.name == LATEST_VIEW:
            latest = obj.__copy__()
            latest.tags = {**obj.tags, **newest.tags, "model_version": ""}
            objects[i] = latest
    for v in versions:
        path = os.path.relpath(settings.paths.version_offline_store(v.version), settings.paths.feature_repo)
        view = modules["features"].pinned_embedding_view(v.version, path, v.tags)
        objects += [view.batch_source, view, *modules["services"].pinned_services(view, v.version)]
    return objects


def definitions_digest() -> str:
    """A digest of the definition files (Feast objects are mutated by apply: their protos are not stable)."""
    h = hashlib.sha256()
    for name in DEFINITION_MODULES:
        h.update(name.encode() + b"\0" + (SOURCE_REPO / f"{name}.py").read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- online checks


def latest_rows(table: pa.Table) -> pa.Table:
    """The row with the latest event_timestamp per cell: what the online store must serve."""
    ordered = table.sort_by([("h3_cell", "ascending"), ("event_timestamp", "descending")])
    cell = ordered.column("h3_cell").to_numpy(zero_copy_only=False)
    first = np.ones(len(cell), dtype=bool)
    first[1:] = cell[1:] != cell[:-1]
    return ordered.filter(pa.array(first))


def spot_check(store, latest: pa.Table, n: int = SPOT_CHECK, versions: dict[str, pa.Table] | None = None) -> list[str]:
    """Compare n evenly spread cells' online values with the offline latest rows, and, for each served version
    (`versions`: its view → its latest rows), n of its cells in its own view; returns the mismatches."""
    bad = _spot_check_latest(store, latest, n)
    for view, rows in (versions or {}).items():
        bad += _spot_check_view(store, view, rows, n)
    return bad


def _spread(rows: pa.Table, n: int) -> list[dict[str, Any]]:
    idx = np.unique(np.linspace(0, rows.num_rows - 1, min(n, rows.num_rows)).astype(int))
    return rows.take(pa.array(idx)).to_pylist()


def _spot_check_latest(store, latest: pa.Table, n: int) -> list[str]:
    if latest.num_rows == 0:
        return []
    rows = _spread(latest, n)
    online = store.get_online_features(
        features=[
            f"{LATEST_VIEW}:embedding",
            f"{LATEST_VIEW}:model_version",
            "tile_histogram:histogram",
            "tag_counts:tag_counts",
        ],
        entity_rows={"h3_cell": [r["h3_cell"] for r in rows]},
    ).to_dict()
    bad = []
    for i, r in enumerate(rows):
        for col in ("embedding", "histogram", "tag_counts"):
            got = online[col][i]
            if got is None or not np.array_equal(np.asarray(got, np.float32), np.asarray(r[col], np.float32)):
                bad.append(f"{r['h3_cell']}.{col}")
        if online["model_version"][i] != r["model_version"]:
            bad.append(f"{r['h3_cell']}.model_version")
    return bad


def _spot_check_view(store, view: str, latest: pa.Table, n: int) -> list[str]:
    if latest.num_rows == 0:
        return []
    rows = _spread(latest, n)
    online = store.get_online_features(
        features=[f"{view}:embedding", f"{view}:model_version"],
        entity_rows={"h3_cell": [r["h3_cell"] for r in rows]},
    ).to_dict()
    bad = []
    for i, r in enumerate(rows):
        got = online["embedding"][i]
        if got is None or not np.array_equal(np.asarray(got, np.float32), np.asarray(r["embedding"], np.float32)):
            bad.append(f"{view}:{r['h3_cell']}.embedding")
        if online["model_version"][i] != r["model_version"]:
            bad.append(f"{view}:{r['h3_cell']}.model_version")
    return bad


def version_latest(served: Iterable[ServedVersion]) -> dict[str, pa.Table]:
    """Each served version's view → its latest row per cell (what that view must serve)."""
    return {v.view: latest_rows(v.rows) for v in served}


# ---------------------------------------------------------------- the registry and the online store


def _registry_readable(path: Path) -> bool:
    import_feast()
    from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto

    try:
        RegistryProto().ParseFromString(path.read_bytes())
    except Exception:  # truncated or garbage: protobuf raises DecodeError (or RuntimeWarning-ish errors)
        return False
    return True


@contextlib.contextmanager
def staged_registry(settings: StoreSettings) -> Iterator[tuple[Any, Any]]:
    """A FeatureStore on a staged copy of the live registry, and a function that swaps the copy in.

    Leaving the block without swapping (an error, a skipped publish) discards the copy; the live registry,
    which consumers read, is only ever replaced whole (os.replace; a SQL registry: one transaction).
    """
    if is_sql_registry(settings):  # the postgres store: serving/sql_registry.py
        with staged_sql_registry(settings) as staged_pair:
            yield staged_pair
        return
    live = registry_path(settings)
    staged = live.with_name(live.name + ".staging")
    staged.unlink(missing_ok=True)  # a killed publish's
    if live.is_file():
        if _registry_readable(live):
            shutil.copyfile(live, staged)
        else:
            log.warning("the Feast registry %s is unreadable: rebuilding it (apply + full materialization)", live)
    store = staged_store(settings, staged)

    def swap_in() -> None:
        os.replace(staged, live)
        refresh_cached(settings)

    try:
        yield store, swap_in
    finally:
        staged.unlink(missing_ok=True)


def repair_online_store(settings: StoreSettings) -> str | None:
    """Move an unreadable SQLite online store aside (it is rebuilt from the offline store); returns why, or None."""
    path = online_db_path(settings)
    if path is None or not path.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
        problem = None if result == "ok" else str(result)
    except sqlite3.DatabaseError as exc:
        problem = str(exc)
    if problem is None:
        return None
    aside = path.with_name(path.name + ".corrupt")
    forget_stores()  # cached stores hold connections to the damaged file
    os.replace(path, aside)
    for suffix in ("-wal", "-shm", "-journal"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    reason = f"the SQLite online store {path} was unreadable ({problem}): moved to {aside.name}, rebuilt"
    log.warning("%s from the offline store", reason)
    return reason


# ---------------------------------------------------------------- publish


def _read_state(settings: StoreSettings) -> dict[str, Any]:
    path = settings.paths.publish_state(settings.kind)
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(settings: StoreSettings, state: dict[str, Any]) -> None:
    write_text(settings.paths.publish_state(settings.kind), json.dumps(state, indent=1, sort_keys=True))


def _check_single_batch(store) -> None:
    size = store.config.materialization_config.online_write_batch_size
    if size is not None:
        raise FeatureStoreError(
            f"materialization.online_write_batch_size={size}: each view must be written in one batch "
            "(one transaction), or readers could see a half-updated online store"
        )


def _apply(store, objects: list[Any]) -> None:
    store.apply(objects)
    store.refresh_registry()


@dataclass
class _Plan:
    """What a publish writes: nothing (reason None), the full event-time range, or the window from start."""

    reason: str | None
    changed: list[tuple[str, ...]] = field(default_factory=list)  # partitions new or changed since the state
    mode: str = "full"
    start: datetime | None = None


def _state_partitions(parts: dict[tuple[str, ...], dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**dict(zip(PARTITION, key, strict=True)), **value} for key, value in sorted(parts.items())]


def _recorded_partitions(state: dict[str, Any]) -> dict[tuple[str, ...], dict[str, Any]] | None:
    if "partitions" not in state:
        return None
    return {tuple(p[c] for c in PARTITION): p for p in state["partitions"]}


def _rows_from(rows: pa.Table, when: datetime, *, before: bool = False) -> pa.Table:
    """The rows with event_timestamp >= when (or, before, < when)."""
    ts = rows.column("event_timestamp")
    at = pa.scalar(when, type=ts.type)
    return rows.filter(pc.less(ts, at) if before else pc.greater_equal(ts, at))


def _online_problem(store, rows: pa.Table, versions: dict[str, pa.Table] | None = None) -> str | None:
    """Why the online store does not hold `rows` (and each version view its rows): a spot check; None when it does."""
    try:
        bad = spot_check(store, rows, versions=versions)
    except Exception as exc:  # a deleted online.db or dropped table is "not published", not a crash
        return f"online store unreadable ({type(exc).__name__}: {exc})"
    return f"online store differs from the offline data at {bad[:3]}" if bad else None


def _versions_before(versions: dict[str, pa.Table], when: datetime) -> dict[str, pa.Table]:
    return {view: _rows_from(rows, when, before=True) for view, rows in versions.items()}


def _plan(
    old: dict[str, Any],
    new: dict[str, Any],
    parts: dict[tuple[str, ...], dict[str, Any]],
    store,
    latest: pa.Table,
    force: bool,
    versions: dict[str, pa.Table] | None = None,
) -> _Plan:
    """Full range, window, apply only or nothing (see the module docstring); spot-checks the online store
    when needed. `versions`: each served version's view → its latest rows."""
    versions = versions or {}
    recorded = _recorded_partitions(old)
    known = recorded or {}
    changed = sorted(k for k, v in parts.items() if known.get(k, {}).get("digest") != v["digest"])
    if force:
        return _Plan("forced", changed)
    if not old:
        return _Plan("first publish to this store", changed)
    digests = [k.removesuffix("_digest") for k in ("definitions_digest", "store_digest") if old.get(k) != new[k]]
    if digests:
        return _Plan(f"changed: {', '.join(digests)}", changed)
    if recorded is None:
        return _Plan("no record of the materialized partitions", changed)
    gone = [k for k in recorded if k not in parts]
    if gone:
        return _Plan(
            f"{len(gone)} materialized partition(s) gone from the offline data: {_partition_id(gone[0])}…", changed
        )
    recelled = [k for k in changed if k in recorded and recorded[k].get("cells_digest") != parts[k]["cells_digest"]]
    if recelled:  # cells may have been removed: their latest row may now lie before any window
        return _Plan(
            f"the cells of {len(recelled)} materialized partition(s) changed: {_partition_id(recelled[0])}…", changed
        )
    was, now = old.get("versions"), new["versions"]
    added = [v for v in now if v not in (was or [])]
    # A new version's view is empty: every row of it must be in the window, i.e. none of its partitions
    # may have been materialized before (then its rows could lie before the window).
    stale = [v for v in added if any(k[2] == v and k not in changed for k in parts)]
    if was is None or stale:
        return _Plan(f"version view(s) {stale or now} new for partitions already published", changed)
    retired = [v for v in was if v not in now]
    if not changed:
        problem = _online_problem(store, latest, versions)
        if problem:
            return _Plan(f"unchanged, but {problem}")
        return _Plan(f"retiring version(s) {retired}", mode="apply") if retired else _Plan(None)
    start = min(datetime.fromisoformat(k[-1]) for k in changed)
    what = f"{len(changed)} changed partition(s): {', '.join(_partition_id(k) for k in changed[:3])}"
    # the cells the window leaves alone, in every view
    problem = _online_problem(store, _rows_from(latest, start, before=True), _versions_before(versions, start))
    if problem:
        return _Plan(f"{what}, and outside their window the {problem}", changed)
    return _Plan(what, changed, mode="window", start=start)


def _materialize(
    store, table: pa.Table, latest: pa.Table, versions: dict[str, pa.Table], plan: _Plan
) -> tuple[dict[str, Any], pa.Table, dict[str, pa.Table]]:
    """Materialize the plan's range; returns the report and the latest rows of the cells it wrote (in the
    latest views, and in each version's view)."""
    ts = table.column("event_timestamp")
    start = plan.start if plan.mode == "window" else pc.min(ts).as_py().astimezone(UTC)
    assert start is not None
    end = max(datetime.now(UTC), pc.max(ts).as_py().astimezone(UTC) + timedelta(microseconds=1))
    t0 = time.perf_counter()
    store.materialize(start_date=start, end_date=end)
    seconds = time.perf_counter() - t0
    written = _rows_from(latest, start)  # a cell is written iff it has a row in the window
    written_versions = {view: _rows_from(rows, start) for view, rows in versions.items()}
    latest_views = len(store.list_feature_views()) - len(versions)
    rows = written.num_rows * latest_views + sum(t.num_rows for t in written_versions.values())
    report = {
        "mode": plan.mode,
        "changed_partitions": len(plan.changed),
        "start": start.isoformat(),
        "end": end.isoformat(),
        "cells": written.num_rows,
        "rows_written": rows,
        "materialize_s": round(seconds, 2),
        "rows_per_s": round(rows / seconds, 1) if seconds > 0 else None,
    }
    return report, written, written_versions


def _retire(store, retired: list[str]) -> None:
    """Remove retired versions' views, the services pinned to them and their sources from the (staged)
    registry, in one commit; their online tables are dropped only after the registry is swapped in."""
    views = {pinned_view(v) for v in retired}
    # List first: Feast's list_* re-read the registry file, dropping uncommitted deletions.
    services = [s for s in store.list_feature_services() if any(p.name in views for p in s.feature_view_projections)]
    found = [v for v in store.list_feature_views() if v.name in views]
    project, registry = store.project, store.registry
    for service in services:
        registry.delete_feature_service(service.name, project, commit=False)
    for view in found:
        registry.delete_feature_view(view.name, project, commit=False)
        with contextlib.suppress(Exception):  # a source another view still uses, or already gone
            registry.delete_data_source(view.batch_source.name, project, commit=False)
    registry.commit()
    store.refresh_registry()


def _drop_online(store, settings: StoreSettings, versions: list[str]) -> None:
    """Drop the online tables of retired versions (idempotent: a table already dropped is fine)."""
    if not versions:
        return
    features = _definition_modules()["features"]
    stubs = [
        features.pinned_embedding_view(
            v, os.path.relpath(settings.paths.version_offline_store(v), settings.paths.feature_repo), {}
        )
        for v in versions
    ]
    store._get_provider().update_infra(
        project=store.project,
        tables_to_delete=stubs,
        tables_to_keep=[],
        entities_to_delete=[],
        entities_to_keep=[],
        partial=True,
    )
    for v in versions:
        settings.paths.version_offline_store(v).unlink(missing_ok=True)


def _registry_versions(store) -> list[str]:
    return sorted(
        {v for view in store.list_feature_views() if (v := view_version(view.name)) is not None}, key=version_key
    )


def publish(settings: StoreSettings, files: Iterable[Path] | None = None, *, force: bool = False) -> dict[str, Any]:
    """Publish region embeddings to the offline and online stores.

    Idempotent: unchanged data, definitions and store → nothing is written (`"skipped": true`), unless force.
    Otherwise materializes the full event-time range or only the window of the changed partitions (see
    the module docstring). The newest `settings.retain_versions` model versions get their own views and
    pinned services (serving/versions.py); older ones are retired: gone from the registry in the same swap
    that publishes the rest, then their online tables are dropped.

    Args:
        settings: the store (StoreSettings.from_config).
        files: embeddings Parquets to merge in (default: every data/embeddings/*.parquet).
        force: publish even if nothing changed.

    Returns:
        What was done: offline rows, the versions served and retired, whether each step ran,
        materialization mode, cells and rows/s.

    Raises:
        PublishError: nothing to publish, or the online store disagrees with the offline data afterwards.
    """
    kind = settings.kind
    started = time.perf_counter()
    with publish_lock(settings):
        files = aligned_files(settings, files)  # publish.align_to: previous adds aligned versions (serving/aligned.py)
        path, offline_changed, table = update_offline(None if files is None else list(files), settings)
        if table.num_rows == 0:
            raise PublishError(f"{path} holds no rows: nothing to publish")
        old = _read_state(settings)
        try:
            served, _ = served_versions(table, settings.retain_versions)
            check_same_models(served, old.get("served_models", {}))
        except VersionError as exc:
            raise PublishError(str(exc)) from None
        for v in served:  # the pinned views' sources (rewritten only when a version's rows change)
            write_version_file(settings.paths.version_offline_store(v.version), v.rows)
        repaired = repair_online_store(settings)
        with staged_registry(settings) as (store, swap_in):
            _check_single_batch(store)
            objects = load_definitions(settings, served)
            parts = partition_digests(table)
            state = {
                "offline_digest": file_digest(path),
                "definitions_digest": definitions_digest(),
                "store_digest": hashlib.sha256(store_yaml(settings, password=False).encode()).hexdigest(),
                "partitions": _state_partitions(parts),
                "versions": [v.version for v in served],
                "served_models": {v.version: v.model_name for v in served},
            }
            names = set(state["versions"])
            retired = sorted(
                {v for v in [*old.get("versions", []), *_registry_versions(store)] if v not in names}, key=version_key
            )
            latest = latest_rows(table)
            versions = version_latest(served)
            report: dict[str, Any] = {
                **describe(settings),
                "offline_path": str(path),
                "offline_rows": table.num_rows,
                "offline_rewritten": offline_changed,
                "cells": latest.num_rows,
                "model_versions": sorted(set(table.column("model_version").to_pylist()), key=version_key),
                "served_versions": state["versions"],
                "retired_versions": retired,
            }
            plan = _plan(old, state, parts, store, latest, force or repaired is not None, versions)
            if repaired is not None:
                plan.reason = repaired
            if plan.reason is None:
                log.info("publish (%s): data, definitions and store unchanged: nothing to do", kind)
                return {
                    **report,
                    "skipped": True,
                    "applied": False,
                    "materialized": None,
                    "seconds": round(time.perf_counter() - started, 2),
                }
            log.info("publish (%s, %s): %s", kind, plan.mode, plan.reason)
            report["reason"] = plan.reason
            t0 = time.perf_counter()
            _apply(store, objects)
            if retired:
                _retire(store, retired)
            report["apply_s"] = round(time.perf_counter() - t0, 2)
            if plan.mode == "apply":
                report["materialized"] = None
                bad = spot_check(store, latest, versions=versions)
            else:
                report["materialized"], written, written_versions = _materialize(store, table, latest, versions, plan)
                bad = spot_check(store, latest, versions=versions)  # cells spread over all of them, written or not
                if plan.mode == "window":
                    bad += spot_check(store, written, versions=written_versions)  # and over those written
            if bad:
                raise PublishError(f"online store disagrees with the offline data after materializing: {bad[:5]}")
            swap_in()
            _drop_online(store, settings, retired)  # consumers no longer see them: now their rows can go
        _write_state(settings, state)
    report.update(skipped=False, applied=True, seconds=round(time.perf_counter() - started, 2))
    done = report["materialized"] or {"cells": 0}
    log.info(
        "published %d of %d cells (%s; versions %s served, %s retired) to %s in %.1f s",
        done["cells"],
        report["cells"],
        plan.mode,
        report["served_versions"],
        retired,
        kind,
        report["seconds"],
    )
    return report


def published_record(settings: StoreSettings, files: Iterable[Path] | None = None) -> dict[str, Any]:
    """What the store serves for the regions of `files` (default: every published region): the publish
    stage's DVC output.

    Made from the recorded state (written only after a publish succeeded), not from what this run did,
    so it is the same whether the run materialized or found everything in place, on any machine: no
    timings, no paths. (The publish report, on stdout, has those.)

    Raises:
        PublishError: nothing was published to this store yet.
    """
    state = _read_state(settings)
    if not state.get("partitions"):
        raise PublishError(f"nothing published to the {settings.kind} store yet: run `loc2vec publish`")
    regions = None if files is None else {str(r) for f in files for r in _file_regions(Path(f))}
    parts = [p for p in state["partitions"] if regions is None or p["region"] in regions]
    return {
        "online_store": settings.kind,
        "regions": sorted({p["region"] for p in parts}),
        "partitions": parts,
        "served_versions": state.get("versions", []),
        "definitions_digest": state.get("definitions_digest"),
    }


def _file_regions(path: Path) -> list[str]:
    return sorted(set(pq.read_table(path, columns=["region"]).column("region").to_pylist()))


def materialize_incremental_only(settings: StoreSettings) -> dict[str, Any]:
    """Materialize offline rows newer than the last materialization (for a scheduled flow).

    Cheap, and enough when new rows carry newer event timestamps (a new model version or import). A
    region embedded with an *older* model version after a later publish needs `publish()`, which
    materializes from the earliest changed partition's event timestamp (or the whole range).

    Raises:
        PublishError: nothing was published to this store yet.
    """
    with publish_lock(settings):
        offline = settings.paths.offline_store
        if not offline.is_file():
            raise PublishError(f"no offline data at {offline}: run `loc2vec publish` first")
        with staged_registry(settings) as (store, swap_in):
            _check_single_batch(store)
            if not store.list_feature_views():
                raise PublishError(f"nothing applied to the {settings.kind} store yet: run `loc2vec publish` first")
            end = datetime.now(UTC)
            t0 = time.perf_counter()
            store.materialize_incremental(end_date=end)
            swap_in()
        return {**describe(settings), "end": end.isoformat(), "materialize_s": round(time.perf_counter() - t0, 2)}
