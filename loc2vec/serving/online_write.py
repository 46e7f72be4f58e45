"""Write rows to a feature view's online table directly: only the cells that changed, one transaction per view.

Publish used to call Feast's `materialize`, which re-reads the whole offline source once per feature view and
writes every row in the window. Now publish knows which cells' newest rows changed (serving/publish.py) and
writes exactly those with Feast's online write path, `provider.online_write_batch` (what
`FeatureStore.write_to_online_store` and push call), in one call per view, i.e. one transaction per view for
SQLite (one `with conn:`) and PostgreSQL (executemany + one commit): readers see a view all-old or all-new.

What Feast's own path costs, measured on 89,492 Liechtenstein cells of one view with two features:
`write_to_online_store` 16.2 s, of which converting the DataFrame to protos 6.2 s and SQLite's
`online_write_batch` 5.0 s (one `execute` per cell and feature). Here the values are encoded once per cell
without Feast's per-value type dispatch (a 16-float list is a fixed protobuf prefix + its bytes, checked
against protobuf by tests), and for SQLite the same rows go in with one `executemany` (the same table, columns
and values as Feast's `online_write_batch` writes: tests/test_publish.py compares them); PostgreSQL and Redis get
Feast's `online_write_batch` with protos parsed from those bytes.
"""

from __future__ import annotations

import hashlib
import itertools
import operator
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from loc2vec.serving.feast_import import import_feast
from loc2vec.serving.wire import JOIN_KEY, entity_keys, varint

SQLITE_CACHE_KIB = 256 * 1024  # page cache while writing (PRAGMA cache_size, negative: KiB)
REBUILD_INDEX_ROWS = 50_000  # cells from which a view's write drops Feast's entity_key index and builds it anew


def _float_lists(column: pa.ChunkedArray | pa.Array) -> list[bytes]:
    """Serialized ValueProto(float_list_val=...) of each list (field 16; FloatList.val packed, field 1)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise ValueError("null feature values cannot be written online")
    lengths = pc.list_value_length(arr).to_numpy()
    values = np.ascontiguousarray(arr.flatten().to_numpy(zero_copy_only=False), dtype="<f4")
    out: list[bytes] = []
    if len(lengths) == 0:
        return out
    if (lengths == lengths[0]).all():  # the usual case: one length, one prefix, one reshape
        n = int(lengths[0])
        inner = b"\x0a" + varint(4 * n) if n else b""
        prefix = b"\x82\x01" + varint(len(inner) + 4 * n) + inner
        rows = values.reshape(len(lengths), n).view(np.uint8).reshape(len(lengths), 4 * n)
        return [prefix + r.tobytes() for r in rows]
    start = 0
    for n in lengths.tolist():
        inner = (b"\x0a" + varint(4 * n) + values[start : start + n].tobytes()) if n else b""
        out.append(b"\x82\x01" + varint(len(inner)) + inner)
        start += n
    return out


def _strings(column: pa.ChunkedArray | pa.Array) -> tuple[list[bytes], list[str]]:
    """Serialized ValueProto(string_val=...) (field 2) of each string, and the strings (SQLite's value_text)."""
    texts = column.to_pylist()
    cache: dict[str, bytes] = {}
    out = []
    for t in texts:
        b = cache.get(t)
        if b is None:
            raw = t.encode()
            b = cache[t] = b"\x12" + varint(len(raw)) + raw
        out.append(b)
    return out, texts


def encode_features(
    view, table: pa.Table, cache: dict | None = None
) -> dict[str, tuple[list[bytes], list[str] | None]]:
    """Each feature of `view`: the serialized ValueProto of every row, and its text (string features).

    `cache` (one dict for the views of one write, whose tables outlive it): a column of the same table
    encoded for an earlier view is reused (publish writes the same newest rows to several views)."""
    import_feast()
    from feast.types import Array, Float32, String

    cache = {} if cache is None else cache
    out: dict[str, tuple[list[bytes], list[str] | None]] = {}
    for field in view.features:
        slot = ("feature", id(table), field.name, str(field.dtype))
        if slot in cache:
            out[field.name] = cache[slot]
            continue
        column = table.column(field.name)
        if field.dtype == String:
            out[field.name] = _strings(column)
        elif field.dtype == Array(Float32):
            out[field.name] = (_float_lists(column), None)
        else:
            raise TypeError(f"{view.name}.{field.name}: no encoder for {field.dtype}")
        cache[slot] = out[field.name]
    return out


def _datetimes(column: pa.ChunkedArray, *, naive: bool = False) -> list[datetime]:
    """Timestamps as UTC datetimes (naive: as Feast's SQLite writer stores them), converted once per distinct
    value (a partition has one)."""
    encoded = column.combine_chunks().dictionary_encode()
    distinct = [v.astimezone(UTC) for v in encoded.dictionary.to_pylist()]
    if naive:
        distinct = [v.replace(tzinfo=None) for v in distinct]
    return [distinct[i] for i in encoded.indices.to_numpy(zero_copy_only=False).tolist()]


def _sqlite_values(values: list[datetime]) -> list[Any]:
    """What Feast's SQLite writer stores for these datetimes: the value of the sqlite3 adapter Feast registers
    for datetime (in 0.67 the Unix second), applied once per distinct value."""
    import sqlite3

    import_feast()
    import feast.infra.online_stores.sqlite  # noqa: F401  # registers the adapter

    adapt = sqlite3.adapters.get((datetime, sqlite3.PrepareProtocol), lambda v: v)
    cache: dict[datetime, Any] = {}
    return [cache[v] if v in cache else cache.setdefault(v, adapt(v)) for v in values]


def _sqlite_fast(store) -> bool:
    """Whether the store is SQLite without the optional columns Feast's writer adds (then we write its rows)."""
    online = store.config.online_store
    return (
        getattr(online, "type", None) == "sqlite"
        and not getattr(online, "vector_enabled", False)
        and not getattr(online, "enable_openai_compatible_store", False)
    )


def write_view(store, view_name: str, table: pa.Table, cache: dict | None = None) -> int:
    """Write `table`'s rows (one per cell) to a view's online table in one transaction; returns rows written.

    `cache`: one dict shared by the views of one publish (their tables alive meanwhile): what depends only on
    the table (entity keys, encoded columns, timestamps, the key order) is computed once per table."""
    if table.num_rows == 0:
        return 0
    cache = {} if cache is None else cache
    view = store.get_feature_view(view_name, allow_registry_cache=True)
    features = encode_features(view, table, cache)
    slot = ("keys", id(table))
    if slot not in cache:
        cache[slot] = entity_keys(table.column(JOIN_KEY).to_pylist())
    keys = cache[slot]
    source = view.batch_source
    created_column = source.created_timestamp_column  # as Feast: a created timestamp only when the source names one
    if _sqlite_fast(store):

        def sqlite_times(column: str) -> list[Any]:
            slot = ("sqlite_times", id(table), column)
            if slot not in cache:
                cache[slot] = _sqlite_values(_datetimes(table.column(column), naive=True))
            return cache[slot]

        event = sqlite_times(source.timestamp_field)
        created = sqlite_times(created_column) if created_column else [None] * len(keys)
        write_sqlite_view(store, view, keys, features, event, created)
    else:
        event = _datetimes(table.column(source.timestamp_field))
        created = _datetimes(table.column(created_column)) if created_column else [None] * len(keys)
        _write_feast(store, view, table, features, event, created)
    return table.num_rows


def write_sqlite_view(store, view, keys: list[bytes], features, event: list[Any], created: list[Any]) -> None:
    """The rows Feast's SqliteOnlineStore.online_write_batch writes (entity_key, feature_name, value, value_text,
    event_ts, created_ts; timestamps as Feast's sqlite3 adapter stores naive UTC datetimes), with one executemany in
    one transaction. The page cache is raised for the write (SQLite's default 2 MB thrashes on a few hundred
    thousand cells' index pages)."""
    import_feast()
    from feast.infra.online_stores.helpers import compute_table_id

    config = store.config
    conn = store._get_provider().online_store._get_conn(config)
    name = compute_table_id(config.project, view, config.registry.enable_online_feature_view_versioning)
    quoted = '"' + name.replace('"', '""') + '"'
    sql = (
        f"INSERT INTO {quoted} (entity_key, feature_name, value, value_text, event_ts, created_ts) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(entity_key, feature_name) DO UPDATE SET "
        "value = excluded.value, value_text = excluded.value_text, event_ts = excluded.event_ts, "
        "created_ts = excluded.created_ts;"
    )

    # In the primary key's order (entity_key, feature_name; SQLite compares BLOBs and BINARY text as memcmp, as
    # Python compares bytes): each insert lands next to the previous one in the table's key index instead of
    # at a random page of it (measured on a full publish of 267,883 cells: see benchmarks/README.md, "publish").
    # One executemany per feature over C-level zips of the reordered columns, not a Python generator per row.
    order = sorted(range(len(keys)), key=keys.__getitem__)
    pick = operator.itemgetter(*order) if len(order) > 1 else (lambda seq: tuple(seq[i] for i in order))
    sorted_keys, sorted_event, sorted_created = pick(keys), pick(event), pick(created)

    conn.execute(f"PRAGMA cache_size = {-SQLITE_CACHE_KIB}")
    index = name + "_ek"  # Feast's secondary index on entity_key (the primary key already starts with it)
    present = conn.execute("SELECT max(rowid) FROM " + quoted).fetchone()[0] or 0  # O(log n): ~rows in the table
    rebuild = (
        len(keys) >= REBUILD_INDEX_ROWS
        and len(keys) * len(features) >= present  # building it anew costs the whole table: only for big writes
        and conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (index,)).fetchone()
    )
    with conn:  # one transaction: readers see the index and the rows before or after, never in between
        if rebuild:  # many rows: maintaining it row by row costs more than building it once (measured ~25%)
            conn.execute(f'DROP INDEX "{index.replace(chr(34), chr(34) * 2)}"')
        for feature in sorted(features):
            values, texts = features[feature]
            conn.executemany(
                sql,
                zip(
                    sorted_keys,
                    itertools.repeat(feature),
                    pick(values),
                    itertools.repeat(None) if texts is None else pick(texts),
                    sorted_event,
                    sorted_created,
                    strict=False,  # the repeats are endless; the columns are the same length
                ),
            )
        if rebuild:
            conn.execute(f'CREATE INDEX "{index.replace(chr(34), chr(34) * 2)}" ON {quoted} (entity_key)')


def _write_feast(store, view, table: pa.Table, features, event: list[datetime], created: list[Any]) -> None:
    """Any other online store: Feast's online_write_batch, one call (its store's transaction) per view."""
    import_feast()
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    cells = table.column(JOIN_KEY).to_pylist()
    names = list(features)
    parsed = {n: [ValueProto.FromString(b) for b in features[n][0]] for n in names}
    rows = [
        (
            EntityKeyProto(join_keys=[JOIN_KEY], entity_values=[ValueProto(string_val=c)]),
            {n: parsed[n][i] for n in names},
            event[i],
            created[i],
        )
        for i, c in enumerate(cells)
    ]
    store._get_provider().online_write_batch(store.config, view, rows, progress=None)


def record_interval(store, view_names: Iterable[str], start: datetime, end: datetime) -> None:
    """Record [start, end] as materialized for these views in the (staged) registry, as `materialize` does,
    so that `materialize_incremental` later starts from `end`."""
    registry = store.registry
    for name in view_names:
        view = store.get_feature_view(name, allow_registry_cache=True)
        registry.apply_materialization(view, store.project, start, end, commit=False)
    registry.commit()


# ---------------------------------------------------------------- what the online store holds


def expected_digests(view, table: pa.Table) -> dict[str, str]:
    """Per cell, a digest of what the view must serve for it (its features' serialized values and event second)."""
    features = encode_features(view, table)
    seconds = [int(t.timestamp()) for t in table.column("event_timestamp").to_pylist()]
    out = {}
    for i, cell in enumerate(table.column(JOIN_KEY).to_pylist()):
        h = hashlib.sha256(str(seconds[i]).encode())
        for name in sorted(features):
            h.update(name.encode() + b"\0" + features[name][0][i])
        out[cell] = h.hexdigest()[:24]
    return out


def online_digests(store, view_name: str, cells: list[str]) -> dict[str, str | None]:
    """Per cell, the digest (as `expected_digests`) of what the view serves online, or None when it has nothing."""
    import_feast()
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    view = store.get_feature_view(view_name, allow_registry_cache=True)
    names = sorted(f.name for f in view.features)
    keys = [EntityKeyProto(join_keys=[JOIN_KEY], entity_values=[ValueProto(string_val=c)]) for c in cells]
    # requested_features named: without them Feast 0.67's PostgreSQL online_read passes one parameter too many;
    # a copy: Redis's appends its timestamp field to the list it is given
    got = store._get_provider().online_read(
        config=store.config, table=view, entity_keys=keys, requested_features=list(names)
    )
    out: dict[str, str | None] = {}
    for cell, (ts, values) in zip(cells, got, strict=True):
        if ts is None or not values or any(n not in values for n in names):
            out[cell] = None
            continue
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=UTC)
        h = hashlib.sha256(str(int(ts.timestamp())).encode())
        for name in names:
            h.update(name.encode() + b"\0" + values[name].SerializeToString())
        out[cell] = h.hexdigest()[:24]
    return out


def feature_columns(view) -> list[str]:
    """A view's feature names (its entity column excluded)."""
    return [f.name for f in view.features]


def spread(n_rows: int, n: int) -> np.ndarray:
    """n indices spread evenly over n_rows (all of them when fewer)."""
    if n_rows == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, n_rows - 1, min(n, n_rows)).astype(np.int64))
