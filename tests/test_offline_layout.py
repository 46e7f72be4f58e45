"""The partitioned offline store and the direct online writer against the real h3, protobuf and Feast SQLite store.

What publish relies on beyond tests/test_publish.py: the vectorised H3 parents equal h3's, the hand-encoded
protobuf values and entity keys equal Feast's, the SQLite rows written with one executemany equal the rows
Feast's own `online_write_batch` writes, and tied rows of overlapping partitions resolve to one visible row.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import h3
import numpy as np
import pyarrow as pa
import pytest

from loc2vec.embedding.store import SCHEMA

VADUZ = (47.1410, 9.5209)


def _cells(n: int, res: int = 11) -> list[str]:
    rng = np.random.default_rng(0)
    lats = VADUZ[0] + rng.uniform(-0.3, 0.3, n)
    lons = VADUZ[1] + rng.uniform(-0.3, 0.3, n)
    return sorted({h3.latlng_to_cell(float(a), float(b), res) for a, b in zip(lats, lons, strict=True)})


def _table(cells: list[str], region: str, version: str, ts: datetime, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = len(cells)
    columns = {
        "h3_cell": cells,
        "lat": np.zeros(n),
        "lon": np.zeros(n),
        "embedding": list(rng.normal(size=(n, 16)).astype(np.float32)),
        "histogram": list(rng.uniform(size=(n, 12)).astype(np.float32)),
        "tag_counts": list(rng.uniform(size=(n, 5)).astype(np.float32)),
        "h3_resolution": [h3.get_resolution(c) for c in cells],
        "model_name": ["m"] * n,
        "model_version": [version] * n,
        "osm_timestamp": [ts] * n,
        "event_timestamp": [ts] * n,
        "created": [ts] * n,
        "region": [region] * n,
    }
    return pa.table({f.name: pa.array(columns[f.name], f.type) for f in SCHEMA if f.name in columns}).cast(SCHEMA)


@pytest.mark.parametrize("res", [9, 11, 5, 3])
def test_h3_parents_equal_h3s(res: int) -> None:
    from loc2vec.serving.offline import PARENT_RESOLUTION, h3_parents

    cells = _cells(500, res)
    want = sorted({h3.cell_to_parent(c, PARENT_RESOLUTION) if res > PARENT_RESOLUTION else c for c in cells})
    assert h3_parents(cells) == want


def test_values_and_keys_encode_as_feast_does() -> None:
    from loc2vec.serving.feast_import import import_feast
    from loc2vec.serving.online_write import _float_lists, _strings, entity_keys

    import_feast()
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import FloatList, Value

    lists = [np.arange(16, dtype=np.float32) * 0.5, np.full(16, np.nan, np.float32), -np.ones(16, np.float32)]
    ragged = [np.arange(3, dtype=np.float32), np.zeros(0, np.float32), np.arange(200, dtype=np.float32)]
    for rows in (lists, ragged):
        got = _float_lists(pa.array([r.tolist() for r in rows], pa.list_(pa.float32())))
        assert got == [Value(float_list_val=FloatList(val=r.tolist())).SerializeToString() for r in rows]
    texts = ["1", "loc2vec-encoder", "é" * 200]
    assert _strings(pa.array(texts))[0] == [Value(string_val=t).SerializeToString() for t in texts]
    cells = _cells(5)
    assert entity_keys(cells) == [
        serialize_entity_key(
            EntityKey(join_keys=["h3_cell"], entity_values=[Value(string_val=c)]), entity_key_serialization_version=3
        )
        for c in cells
    ]


def test_values_and_registry_decode_as_feast_does() -> None:
    """serving/wire.py reads Feast's bytes as Feast's protobuf classes do: the ValueProto cases loc2vec's views
    hold (strings, ints, float lists packed or not, unset) and the file registry's feature views with their
    tags; any other value case is refused, not guessed."""
    from loc2vec.serving.feast_import import import_feast
    from loc2vec.serving.wire import WireFormatError, decode_value, registry_feature_views

    import_feast()
    from feast.protos.feast.core.Entity_pb2 import Entity, EntitySpecV2
    from feast.protos.feast.core.FeatureView_pb2 import FeatureView, FeatureViewSpec
    from feast.protos.feast.core.Registry_pb2 import Registry
    from feast.protos.feast.types.Value_pb2 import FloatList, Value

    values = [
        Value(string_val="loc2vec-encoder"),
        Value(string_val="é" * 200),
        Value(string_val=""),
        Value(int64_val=-5),
        Value(int64_val=1 << 40),
        Value(int32_val=-7),
        Value(float_list_val=FloatList(val=(np.arange(16, dtype=np.float32) * -0.37).tolist())),
        Value(float_list_val=FloatList(val=[])),
    ]
    for v in values:
        got = decode_value(v.SerializeToString())
        want = getattr(v, v.WhichOneof("val"))
        assert (list(got) == list(want.val)) if v.HasField("float_list_val") else got == want, v
    assert decode_value(Value().SerializeToString()) is None
    unpacked = b"\x82\x01\x0a" + b"".join(b"\x0d" + np.float32(x).tobytes() for x in (1.5, -2.25))
    assert list(decode_value(unpacked)) == list(Value.FromString(unpacked).float_list_val.val) == [1.5, -2.25]
    for bad in (Value(bytes_val=b"x").SerializeToString(), Value(double_val=1.0).SerializeToString(), b"\x12\x05ab"):
        with pytest.raises(WireFormatError):
            decode_value(bad)

    views = {
        ("loc2vec", "location_embedding_v3"): {"model_name": "loc2vec-encoder", "h3_resolution": "11"},
        ("loc2vec", "location_embedding"): {},
        ("other", "location_embedding"): {"h3_resolution": "9"},
    }
    registry = Registry(
        entities=[Entity(spec=EntitySpecV2(name="h3_cell", project="loc2vec"))],
        feature_views=[FeatureView(spec=FeatureViewSpec(name=n, project=p, tags=t)) for (p, n), t in views.items()],
        version_id="x",
    )
    assert registry_feature_views(registry.SerializeToString()) == views


def _store(root: Path):
    from loc2vec.serving.feast_import import import_feast

    import_feast()
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource, ValueType
    from feast.repo_config import RepoConfig
    from feast.types import Array, Float32, String

    (root / "data").mkdir(parents=True)
    config = RepoConfig(
        project="t",
        provider="local",
        registry=str(root / "data" / "registry.db"),
        online_store={"type": "sqlite", "path": str(root / "data" / "online.db")},
        offline_store="file",
        entity_key_serialization_version=3,
    )
    config.repo_path = root
    store = FeatureStore(repo_path=str(root), config=config)
    entity = Entity(name="h3_cell", join_keys=["h3_cell"], value_type=ValueType.STRING)
    source = FileSource(
        name="s", path=str(root / "x.parquet"), timestamp_field="event_timestamp", created_timestamp_column="created"
    )
    view = FeatureView(
        name="v",
        entities=[entity],
        ttl=timedelta(days=3650),
        schema=[
            Field(name="h3_cell", dtype=String),
            Field(name="embedding", dtype=Array(Float32)),
            Field(name="model_version", dtype=String),
        ],
        source=source,
    )
    store.apply([entity, source, view])
    return store


def _rows(store) -> list[tuple]:
    conn = store._get_provider().online_store._get_conn(store.config)
    return conn.execute(
        "SELECT entity_key, feature_name, value, value_text, event_ts, created_ts FROM t_v ORDER BY 1, 2"
    ).fetchall()


@pytest.mark.parametrize("rebuild_index", [False, True])
def test_sqlite_rows_equal_feasts_own_write(tmp_path: Path, rebuild_index: bool, monkeypatch) -> None:
    """One executemany writes the rows Feast's online_write_batch writes, and reads back through Feast (also
    when a large write drops Feast's entity_key index and builds it again)."""
    from loc2vec.serving import online_write
    from loc2vec.serving.online_write import expected_digests, online_digests, write_view

    if rebuild_index:
        monkeypatch.setattr(online_write, "REBUILD_INDEX_ROWS", 1)

    ts = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    table = _table(_cells(300), "r", "7", ts, 1)
    ours, feasts = _store(tmp_path / "ours"), _store(tmp_path / "feast")
    assert write_view(ours, "v", table) == table.num_rows
    feasts.write_to_online_store(
        "v", table.select(["h3_cell", "embedding", "model_version", "event_timestamp", "created"]).to_pandas()
    )
    assert _rows(ours) == _rows(feasts) and len(_rows(ours)) == 2 * table.num_rows
    conn = ours._get_provider().online_store._get_conn(ours.config)
    assert conn.execute("SELECT sql FROM sqlite_master WHERE name = 't_v_ek'").fetchone(), "the index is there"
    cells = table.column("h3_cell").to_pylist()[:20]
    assert online_digests(ours, "v", cells) == expected_digests(ours.get_feature_view("v"), table.slice(0, 20))
    assert online_digests(ours, "v", ["8b1f8e0c0000fff"]) == {"8b1f8e0c0000fff": None}
    got = ours.get_online_features(features=["v:embedding"], entity_rows=[{"h3_cell": cells[3]}]).to_dict()
    np.testing.assert_array_equal(np.float32(got["embedding"][0]), table.column("embedding")[3].as_py())


def test_ties_resolve_to_the_first_region_and_come_back() -> None:
    """Overlapping regions embedded with one model at one event time: the alphabetically first region's row is
    visible; the other's tied rows are hidden, and visible again once the winner is gone."""
    from loc2vec.serving.offline import latest_of_sorted, latest_per_cell, resolve_ties, split, with_hidden

    ts = datetime(2026, 1, 1, tzinfo=UTC)
    cells = _cells(100)
    a = _table(cells[:60], "a", "1", ts, 1)
    b = _table(cells[40:], "b", "1", ts, 2)  # cells 40..59 tie with a's
    c = _table(cells[50:], "c", "2", ts + timedelta(days=1), 3)  # newer: wins wherever it has a row
    parts = {k: v for t in (a, b, c) for k, v in split(t).items()}
    tables = {k: t for k, (_, t) in parts.items()}
    visible, losers = resolve_ties(tables)
    by_region = {k[0]: k for k in tables}
    assert losers[by_region["b"]].sum() == 20 and not losers[by_region["a"]].any()
    assert visible.num_rows == a.num_rows + b.num_rows - 20 + c.num_rows
    latest = latest_per_cell(visible.drop_columns(["_part"])).to_pandas().set_index("h3_cell")
    assert latest_of_sorted(visible).equals(latest_per_cell(visible)), "visible rows come sorted: no second sort"
    assert (latest.loc[cells[50:], "region"] == "c").all()
    assert (latest.loc[cells[40:50], "region"] == "a").all(), "the tie goes to the first region"
    b_part, b_visible = with_hidden(parts[by_region["b"]][0], tables[by_region["b"]], losers[by_region["b"]])
    assert b_part.hidden and b_visible.num_rows == b.num_rows - 20 and b_part.visible_name != b_part.file_name

    del tables[by_region["a"]]  # the winner gone: b's rows are all visible again
    visible, losers = resolve_ties(tables)
    assert not losers[by_region["b"]].any() and visible.num_rows == b.num_rows + c.num_rows
