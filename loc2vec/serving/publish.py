"""Publish embeddings to Feast: partitioned offline files, `feast apply`, and online writes of only the changed cells.

Steps (serialised by a lock file: Feast's file registry has no protection against concurrent writers):

1. Offline (serving/offline.py): each region embeddings file (default: every data/embeddings/*.parquet) is split
   into partitions (region, model_name, model_version, event_timestamp); a partition new or changed since the
   last publish (its content digest differs from the recorded one) gets its own Parquet file, and a new
   generation of hard links swaps in under the FileSources (data/feast/embeddings.parquet, and
   data/feast/versions/embeddings_vN.parquet per served version) with one `os.replace` each. Unchanged
   partitions are neither read nor written. Every model version keeps its rows offline with its own event
   timestamps (point-in-time joins need them).
2. Apply: the definitions in feature_repo/ (imported like `feast apply` does), via FeatureStore.apply.
3. Online (serving/online_write.py): the rows each view must now serve for the changed cells, written with
   Feast's online write path, one transaction per view. No `materialize`: it re-read all of the offline
   history once per view. Two modes:

   * incremental: only the changed partitions' cells. Their newest rows are computed from the changed
     partitions and the partitions that may share cells with them (a common H3 parent cell at resolution 5,
     recorded per partition: other regions are not read), and a cell is written iff its newest row (per
     view: the latest views over every version, each pinned view over its version) is in a changed
     partition. A cell whose newest row is elsewhere keeps its online value, which was already correct;
     a newer row is never overwritten by an older one, whatever order regions and versions are published in.
   * full: every cell's newest row in every view (reads every partition). On the first publish to a store,
     when the definitions or the store config changed, when the state predates partition records, when a
     recorded partition's file is gone, when a changed partition's set of cells changed (a removed cell's
     newest row may lie in any partition), when a version view is new for partitions already published, when
     the online store fails its check (below; e.g. online.db deleted or damaged), and when forced.

Checks, without reading the offline data: the state keeps a sample of cells per view with a digest of what the
view must serve for each (serialized values and event second), refreshed from the rows each publish writes.
Before an incremental write the sampled cells it will not write are compared with the online store (they must
already be right; if not, it is "full"), and a publish with nothing changed compares them all. After writing,
the sample and up to 32 of the written cells per view must match, or the publish fails before the registry
is swapped in.

Idempotence: the content digests of each partition, the definitions and the store config are recorded in
data/feast/published_<store>.json, only after the online writes and their check succeeded; when all match
and the sample check agrees, nothing is applied or written. (Forced, the same rows are rewritten: the
online store's rows are identical.)

Killed at any point, consumers keep answering: the registry consumers read (data/feast/registry.db) is
never written in place. A publish copies it to registry.db.staging, applies and writes against the copy
(recording the materialized interval per view, as `materialize` does, so `materialize_incremental` still
works), and only when the checks pass swaps it in with one `os.replace`. A killed publish leaves only a stale
staging file (the next publish starts a new one from the live registry). An unreadable live registry is
rebuilt (apply + full write; it is derived state). A registry left with views MATERIALIZING by an older
loc2vec fails the consumer-style read of the check, and is repaired the same way.

An unreadable SQLite online store (a corrupt or truncated online.db) is moved aside to online.db.corrupt
and rebuilt from the offline store (full write): it is derived from the offline files too.

No half-updated online store: each view's rows are written in one `online_write_batch`-equivalent call
(SQLite: one `with conn:` transaction; PostgreSQL: executemany + one commit): readers see a view all-old or
all-new. A view's columns that belong together (embedding + model_version) are in the same view. A crash
mid-publish leaves each view at its old or new state and the recorded digests unchanged, so the next
publish redoes it.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from loc2vec.core.atomic import file_lock, write_text
from loc2vec.core.errors import Loc2VecError
from loc2vec.embedding.store import read_embeddings
from loc2vec.serving import dask_tokens, online_write
from loc2vec.serving.aligned import aligned_files
from loc2vec.serving.feast_import import import_feast
from loc2vec.serving.offline import (
    PARTITION,
    OfflineLayout,
    Partition,
    latest_of_sorted,
    overlapping,
    resolve_ties,
    split,
    with_hidden,
)
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
from loc2vec.serving.versions import ServedVersion, VersionError, check_same_models, served_partitions
from loc2vec.serving.view_names import LATEST_VIEW, pinned_view, version_key, view_version

log = logging.getLogger(__name__)
LATEST_VIEWS = (LATEST_VIEW, "tile_histogram", "tag_counts")  # feature_repo/features.py: over every version
SPOT_CHECK = 32  # written cells compared per view after writing
SAMPLE_ADD = 32  # cells added to a view's recorded sample per publish
SAMPLE_MAX = 256  # cells kept in a view's sample


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


# ---------------------------------------------------------------- state


def _read_state(settings: StoreSettings) -> dict[str, Any]:
    path = settings.paths.publish_state(settings.kind)
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(settings: StoreSettings, state: dict[str, Any]) -> None:
    write_text(settings.paths.publish_state(settings.kind), json.dumps(state, indent=1, sort_keys=True))


def _recorded(state: dict[str, Any]) -> dict[tuple[str, ...], Partition] | None:
    """The partitions the state records, or None for a state of the single-file layout (no parents)."""
    parts = state.get("partitions")
    if parts is None or any("parents" not in p for p in parts):
        return None
    return {(p := Partition.from_record(r)).key: p for r in parts}


def _partition_id(key: tuple) -> str:
    return "/".join(key)


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


# ---------------------------------------------------------------- the online check


def _online_problem(store, sample: dict[str, dict[str, str]], skip: dict[str, set[str]] | None = None) -> str | None:
    """Why the online store does not serve the recorded sample (minus `skip`: per view, cells about to be
    written); None when it does. Reads each view once the way consumers do (a registry left MATERIALIZING,
    a dropped table fail here) and compares digests."""
    skip = skip or {}
    bad: list[str] = []
    try:
        for view, expected in sorted(sample.items()):
            cells = sorted(c for c in expected if c not in skip.get(view, set()))
            if not cells:
                continue
            features = [f"{view}:{f}" for f in online_write.feature_columns(store.get_feature_view(view))]
            store.get_online_features(features=features, entity_rows=[{"h3_cell": cells[0]}])
            got = online_write.online_digests(store, view, cells)
            bad += [f"{view}:{c}" for c in cells if got[c] != expected[c]]
    except Exception as exc:  # a deleted online.db, a dropped table, a registry left MATERIALIZING
        return f"online store unreadable ({type(exc).__name__}: {exc})"
    return f"online store differs from the offline data at {bad[:3]}" if bad else None


def _check_written(store, written: dict[str, pa.Table]) -> list[str]:
    """Up to SPOT_CHECK spread cells of each view's written rows, read back from the online store."""
    bad: list[str] = []
    for view, rows in written.items():
        some = rows.take(pa.array(online_write.spread(rows.num_rows, SPOT_CHECK)))
        expected = online_write.expected_digests(store.get_feature_view(view), some)
        got = online_write.online_digests(store, view, sorted(expected))
        bad += [f"{view}:{c}" for c in sorted(expected) if got[c] != expected[c]]
    return bad


def _new_sample(
    store, old: dict[str, dict[str, str]], written: dict[str, pa.Table], views: list[str], full: bool
) -> dict[str, dict[str, str]]:
    """The sample to record: per view, the digests of written cells already sampled updated, SAMPLE_ADD spread
    written cells added (first), at most SAMPLE_MAX kept; views no longer served dropped; reset when full."""
    out: dict[str, dict[str, str]] = {}
    for view in views:
        rows = written.get(view)
        before = {} if full else dict(old.get(view, {}))
        if rows is None or rows.num_rows == 0:
            if before:
                out[view] = before
            continue
        view_obj = store.get_feature_view(view)
        cells = rows.column("h3_cell").to_pylist()
        known = [i for i, c in enumerate(cells) if c in before]
        add = online_write.spread(rows.num_rows, SAMPLE_ADD * (2 if full else 1)).tolist()
        idx = sorted(set(known) | set(add))
        digests = online_write.expected_digests(view_obj, rows.take(pa.array(idx, pa.int64())))
        fresh = {cells[i]: digests[cells[i]] for i in add}
        merged = {**fresh, **{c: digests.get(c, d) for c, d in before.items() if c not in fresh}}
        out[view] = dict(list(merged.items())[:SAMPLE_MAX])
    return out


# ---------------------------------------------------------------- what to write


@dataclass
class _Plan:
    """What a publish writes: nothing (reason None), every view in full, or only the changed partitions' cells."""

    reason: str | None
    changed: list[tuple[str, ...]] = field(default_factory=list)  # partitions new or changed since the state
    mode: str = "full"


def _plan(
    old: dict[str, Any],
    new: dict[str, Any],
    recorded: dict[tuple[str, ...], Partition] | None,
    current: dict[tuple[str, ...], Partition],
    changed: list[tuple[str, ...]],
    gone: list[tuple[str, ...]],
    force: bool,
) -> _Plan:
    """Full, incremental, apply only or nothing (see the module docstring), before any online check."""
    if force:
        return _Plan("forced", changed)
    if not old:
        return _Plan("first publish to this store", changed)
    digests = [k.removesuffix("_digest") for k in ("definitions_digest", "store_digest") if old.get(k) != new[k]]
    if digests:
        return _Plan(f"changed: {', '.join(digests)}", changed)
    if recorded is None:
        return _Plan("no record of the published partitions (an older loc2vec's state)", changed)
    if gone:
        return _Plan(
            f"{len(gone)} published partition(s) gone from the offline files: {_partition_id(gone[0])}…", changed
        )
    recelled = [k for k in changed if k in recorded and recorded[k].cells_digest != current[k].cells_digest]
    if recelled:  # cells may have been removed: their newest row may now lie in any partition
        return _Plan(
            f"the cells of {len(recelled)} published partition(s) changed: {_partition_id(recelled[0])}…", changed
        )
    was, now = old.get("versions"), new["versions"]
    added = [v for v in now if v not in (was or [])]
    # A new version's view is empty: every partition of it must be written now, i.e. be a changed one.
    model = new["model"]
    stale = [
        v
        for v in added
        if any(p.model_version == v and p.model_name == model and k not in changed for k, p in current.items())
    ]
    if was is None or stale:
        return _Plan(f"version view(s) {stale or now} new for partitions already published", changed)
    retired = [v for v in was if v not in now]
    if not changed:
        return _Plan(f"retiring version(s) {retired}", mode="apply") if retired else _Plan(None)
    what = f"{len(changed)} changed partition(s): {', '.join(_partition_id(k) for k in changed[:3])}"
    return _Plan(what, changed, mode="incremental")


def _rows_to_write(
    tables: dict[tuple[str, ...], pa.Table],
    parts: dict[tuple[str, ...], Partition],
    changed: set[tuple[str, ...]] | None,
    served: list[ServedVersion],
    latest_views: list[str],
    known: dict[tuple[str, ...], Partition],
) -> tuple[dict[str, pa.Table], dict[tuple[str, ...], tuple[Partition, pa.Table]], int]:
    """Per view, the rows to write: the newest visible row of each cell over `tables` (all partitions, or the
    changed ones and those that may share cells with them), restricted, when `changed` is given, to rows of
    changed partitions; each partition's record and visible rows given its ties in `tables`; and how many of
    the cells have rows only in partitions not in `known` (cells new to the store)."""
    visible, losers = resolve_ties(tables)
    keys = sorted(tables)
    updated = {k: with_hidden(parts[k], tables[k], losers[k]) for k in keys}
    part_col = visible.column("_part").to_numpy()
    if changed is not None:
        mine = np.isin(part_col, [i for i, k in enumerate(keys) if k in changed])
        cells = pc.unique(visible.column("h3_cell").filter(pa.array(mine)))
        visible = visible.filter(pc.is_in(visible.column("h3_cell"), value_set=cells))
    chosen = np.array([k in changed for k in keys] if changed is not None else [True] * len(keys), dtype=bool)

    def newest(rows: pa.Table) -> pa.Table:
        latest = latest_of_sorted(rows)  # rows: resolve_ties' visible ones or a filter of them (sorted)
        keep = chosen[latest.column("_part").to_numpy()] if latest.num_rows else np.zeros(0, bool)
        return latest.filter(pa.array(keep)).drop_columns(["_part"])

    fresh = np.array([k not in known for k in keys], dtype=bool)
    per_cell = (
        visible.select(["h3_cell"])
        .append_column("_old", pa.array((~fresh[visible.column("_part").to_numpy()]).astype(np.int8)))
        .group_by("h3_cell", use_threads=False)
        .aggregate([("_old", "max")])
    )
    new_cells = int((per_cell.column("_old_max").to_numpy() == 0).sum())
    latest = newest(visible)
    out = {view: latest for view in latest_views}
    for v in served:
        mask = pc.and_(
            pc.equal(visible.column("model_name"), v.model_name), pc.equal(visible.column("model_version"), v.version)
        )
        out[v.view] = newest(visible.filter(mask))
    return out, updated, new_cells


def _write_online(store, rows: dict[str, pa.Table]) -> tuple[int, float]:
    t0 = time.perf_counter()
    cache: dict = {}  # the views' tables are often one table (the newest rows): its keys and columns encoded once
    n = sum(online_write.write_view(store, view, table, cache) for view, table in rows.items())
    return n, time.perf_counter() - t0


def _read_partitions(
    layout: OfflineLayout, keys: Iterable[tuple[str, ...]], parts: dict, incoming: dict
) -> dict[tuple[str, ...], pa.Table]:
    """The input rows of partitions: from this run's files when they brought them, else their partition files."""
    return {k: incoming[k][1] if k in incoming else layout.read(parts[k]) for k in keys}


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


def _drop_online(store, layout: OfflineLayout, versions: list[str]) -> None:
    """Drop the online tables of retired versions (idempotent: a table already dropped is fine)."""
    if not versions:
        return
    features = _definition_modules()["features"]
    stubs = [
        features.pinned_embedding_view(v, os.path.relpath(layout.version_source(v), layout.paths.feature_repo), {})
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
        layout.drop_version(v)


def _registry_versions(store) -> list[str]:
    return sorted(
        {v for view in store.list_feature_views() if (v := view_version(view.name)) is not None}, key=version_key
    )


def publish(settings: StoreSettings, files: Iterable[Path] | None = None, *, force: bool = False) -> dict[str, Any]:
    """Publish region embeddings to the offline and online stores.

    Idempotent: unchanged data, definitions and store → nothing is written (`"skipped": true`), unless force.
    Otherwise writes every cell's newest rows (full) or only the changed partitions' cells (incremental; see
    the module docstring). The newest `settings.retain_versions` model versions get their own views and
    pinned services (serving/versions.py); older ones are retired: gone from the registry in the same swap
    that publishes the rest, then their online tables are dropped.

    Args:
        settings: the store (StoreSettings.from_config).
        files: embeddings Parquets to merge in (default: every data/embeddings/*.parquet).
        force: publish even if nothing changed.

    Returns:
        What was done: offline rows and partitions, the versions served and retired, whether each step ran,
        the write mode, cells and rows/s.

    Raises:
        PublishError: nothing to publish, or the online store disagrees with the offline data afterwards.
    """
    kind = settings.kind
    started = time.perf_counter()
    with publish_lock(settings):
        files = aligned_files(settings, files)  # publish.align_to: previous adds aligned versions (serving/aligned.py)
        layout = OfflineLayout(settings.paths)
        old = _read_state(settings)
        recorded = _recorded(old)
        incoming: dict[tuple[str, ...], tuple[Partition, pa.Table]] = {}
        legacy = layout.legacy()
        if legacy:  # the single file of an older loc2vec: its partitions become partition files
            incoming.update(split(layout.read_legacy()))
        for path in _region_files(None if files is None else list(files), settings):
            incoming.update(split(read_embeddings(path)))
        catalog = layout.read_catalog()
        if catalog is None:  # no catalog yet: what this store recorded (of the partition layout) is the offline data
            catalog = {k: p for k, p in (recorded or {}).items() if layout.has_input(p)}
        added = sorted(k for k, (p, _) in incoming.items() if k not in catalog or catalog[k].digest != p.digest)
        current = {**catalog, **{k: incoming[k][0] for k in added}}
        written_inputs = sum(layout.write_input(current[k], incoming[k][1]) for k in added)
        for k in [k for k, p in current.items() if k not in incoming and not layout.has_input(p)]:
            log.warning("offline partition %s: its file is gone", _partition_id(k))
            del current[k]
        known = recorded or {}
        changed = sorted(k for k, p in current.items() if k not in known or known[k].digest != p.digest)
        gone = sorted(k for k in known if k not in current)
        if not current:
            raise PublishError(f"{layout.source} holds no rows: nothing to publish")
        try:
            served, _ = served_partitions(list(current.values()), settings.retain_versions)
            check_same_models(served, old.get("served_models", {}))
        except VersionError as exc:
            raise PublishError(str(exc)) from None
        repaired = repair_online_store(settings)
        with staged_registry(settings) as (store, swap_in):
            _check_single_batch(store)
            objects = load_definitions(settings, served)
            latest_views = sorted(
                o.name for o in objects if type(o).__name__ == "FeatureView" and view_version(o.name) is None
            )
            views = latest_views + [v.view for v in served]
            state: dict[str, Any] = {
                "definitions_digest": definitions_digest(),
                "store_digest": hashlib.sha256(store_yaml(settings, password=False).encode()).hexdigest(),
                "versions": [v.version for v in served],
                "served_models": {v.version: v.model_name for v in served},
                "model": served[-1].model_name if served else None,
            }
            names = set(state["versions"])
            retired = sorted(
                {v for v in [*old.get("versions", []), *_registry_versions(store)] if v not in names}, key=version_key
            )
            report: dict[str, Any] = {
                **describe(settings),
                "offline_path": str(layout.source),
                "offline_rows": sum(p.rows for p in current.values()),
                "offline_partitions": len(current),
                "offline_rewritten": written_inputs > 0 or legacy,
                "partitions_written": written_inputs,
                "cells": old.get("cells"),
                "model_versions": sorted({p.model_version for p in current.values()}, key=version_key),
                "served_versions": state["versions"],
                "retired_versions": retired,
            }
            plan = _plan(old, state, recorded, current, changed, gone, force)
            if legacy:
                plan = _Plan("the offline store was one file (an older loc2vec's): split into partition files", changed)
            if repaired is not None:
                plan = _Plan(repaired, changed)
            sample = {v: s for v, s in old.get("sample", {}).items() if v in views}
            rows: dict[str, pa.Table] = {}
            t_read = time.perf_counter()
            if plan.mode == "incremental":
                group = sorted(
                    {
                        *changed,
                        *(
                            p.key
                            for p in overlapping(
                                [current[k] for k in changed], [p for k, p in current.items() if k not in changed]
                            )
                        ),
                    }
                )
                tables = _read_partitions(layout, group, current, incoming)
                rows, updated, new_cells = _rows_to_write(tables, current, set(changed), served, latest_views, known)
                skip = {view: set(t.column("h3_cell").to_pylist()) for view, t in rows.items()}
                problem = _online_problem(store, sample, skip)
                if problem:
                    plan = _Plan(f"{plan.reason}, and outside their window the {problem}", changed)
            elif plan.reason is None or plan.mode == "apply":
                problem = _online_problem(store, sample)
                if problem:
                    plan = _Plan(f"unchanged, but {problem}", changed)
            if plan.reason is None:
                log.info("publish (%s): data, definitions and store unchanged: nothing to do", kind)
                return {
                    **report,
                    "skipped": True,
                    "applied": False,
                    "materialized": None,
                    "seconds": round(time.perf_counter() - started, 2),
                }
            if plan.mode == "full":
                tables = _read_partitions(layout, sorted(current), current, incoming)
                rows, updated, new_cells = _rows_to_write(tables, current, None, served, latest_views, {})
            read_s = time.perf_counter() - t_read
            if plan.mode != "apply":
                for k, (p, visible) in updated.items():
                    current[k] = p
                    layout.write_visible(p, visible)
            report["cells"] = state["cells"] = (
                rows[LATEST_VIEW].num_rows
                if plan.mode == "full"
                else (old.get("cells") or 0) + (new_cells if plan.mode == "incremental" else 0)
            )
            versions = {
                v.version: [p for p in current.values() if (p.model_name, p.model_version) == (v.model_name, v.version)]
                for v in served
            }
            layout.switch(layout.generation(current.values(), versions), versions)
            layout.write_catalog(current.values())
            log.info("publish (%s, %s): %s", kind, plan.mode, plan.reason)
            report["reason"] = plan.reason
            t0 = time.perf_counter()
            _apply(store, objects)
            if retired:
                _retire(store, retired)
            report["apply_s"] = round(time.perf_counter() - t0, 2)
            if plan.mode == "apply":
                report["materialized"] = None
                bad = []
            else:
                n, seconds = _write_online(store, rows)
                first = min(datetime.fromisoformat(p.event_timestamp) for p in current.values())
                online_write.record_interval(store, views, first, datetime.now(UTC))
                report["materialized"] = {
                    "mode": plan.mode,
                    "changed_partitions": len(plan.changed),
                    "read_partitions": len(tables),
                    "cells": rows[LATEST_VIEW].num_rows,
                    "rows_written": n,
                    "read_s": round(read_s, 2),
                    "write_s": round(seconds, 2),
                    "rows_per_s": round(n / seconds, 1) if seconds > 0 else None,
                }
                bad = _check_written(store, rows)
            state["sample"] = _new_sample(store, sample, rows, views, plan.mode == "full")
            problem = None if bad else _online_problem(store, state["sample"])
            if bad or problem:
                raise PublishError(f"online store disagrees with the offline data after writing: {bad[:5] or problem}")
            swap_in()
            _drop_online(store, layout, retired)  # consumers no longer see them: now their rows can go
        state["partitions"] = [p.record() for _, p in sorted(current.items())]
        _write_state(settings, state)
        layout.clean(current.values())
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
    fields = (*PARTITION, "rows", "cells_digest", "digest")
    parts = [{f: p[f] for f in fields} for p in state["partitions"] if regions is None or p["region"] in regions]
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
        if not offline.exists():
            raise PublishError(f"no offline data at {offline}: run `loc2vec publish` first")
        with staged_registry(settings) as (store, swap_in):
            _check_single_batch(store)
            if not store.list_feature_views():
                raise PublishError(f"nothing applied to the {settings.kind} store yet: run `loc2vec publish` first")
            end = datetime.now(UTC)
            t0 = time.perf_counter()
            dask_tokens.register()  # materialize reads the offline store with dask (serving/dask_tokens.py)
            store.materialize_incremental(end_date=end)
            swap_in()
        return {**describe(settings), "end": end.isoformat(), "materialize_s": round(time.perf_counter() - t0, 2)}
