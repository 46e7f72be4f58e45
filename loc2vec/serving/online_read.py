"""Read the default store (file registry + SQLite online store) as Feast does, without importing Feast.

A `loc2vec features` call spent ~1.1 s of its ~2 s importing Feast and pandas to run one SELECT; the
2-second target was met only on idle cores. For the default store, a lookup reads the same two things Feast's
`get_online_features` reads, in the same order: the registry file (which publish swaps in whole), for the view
and the H3 resolution its publish tagged, then the view's online table, with the query of Feast's
`SqliteOnlineStore.online_read` (the same table name, entity-key bytes and value bytes; serving/wire.py). Hand
written rather than through Feast because Feast has no import path to its online read that does not build its
whole FeatureStore stack; tests/test_consumers.py checks it returns what Feast returns, for a pinned view, the
latest one, a cell not published and a retired version. Any other store (PostgreSQL, Redis, a SQL registry),
or a store whose shape this module does not know, is read through Feast (serving/lookup.py).
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from typing import Any

from loc2vec.serving.store import DirectStore
from loc2vec.serving.wire import decode_value, entity_keys, registry_feature_views


def view_tags(store: DirectStore) -> dict[str, dict[str, str]] | None:
    """The project's feature views and their tags, as the registry file holds them now (None: no registry yet)."""
    try:
        buf = store.registry.read_bytes()
    except FileNotFoundError:
        return None
    return {name: tags for (project, name), tags in registry_feature_views(buf).items() if project == store.project}


def read_rows(
    store: DirectStore, view: str, cells: list[str], features: tuple[str, ...]
) -> list[dict[str, Any] | None]:
    """Each cell's features in a view's online table (None: the cell has no row), decoded from Feast's bytes.

    Raises:
        sqlite3.Error: the database or the table cannot be read.
        serving.wire.WireFormatError: a value of a type loc2vec's views never hold.
    """
    keys = entity_keys(cells)
    distinct = list(dict.fromkeys(keys))
    quoted = '"' + store.table(view).replace('"', '""') + '"'
    found: dict[bytes, dict[str, Any]] = {}
    with closing(sqlite3.connect(f"{store.online_db.as_uri()}?mode=ro", uri=True)) as conn:  # read-only: a consumer
        for start in range(0, len(distinct), 500):  # SQLite's host-parameter limit
            chunk = distinct[start : start + 500]
            rows = conn.execute(
                f"SELECT entity_key, feature_name, value FROM {quoted} "
                f"WHERE entity_key IN ({','.join('?' * len(chunk))})",
                chunk,
            ).fetchall()
            for key, name, value in rows:
                if name in features:
                    found.setdefault(key, {})[name] = decode_value(value)
    return [found.get(k) for k in keys]
