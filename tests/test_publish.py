"""Embedding and Feast publishing on the real test region: real MLflow models, Feast, SQLite and PostgreSQL.

Two tiny untrained Encoders are registered in the test project's own MLflow store (v1, then v2, under a
model name of this module), so their registration times t1 < t2 are the embeddings' event timestamps.
The last tests add v3 and v4 and a second region (the southern half of the test bbox, imported after v3)
to check that a publish writes only the cells of the changed partitions (reading only the partitions that
share cells with them), and every cell when it must.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from .conftest import TEST_BBOX, VADUZ
from .fixtures.project import clear_published, embed, ingest_region, load_project, publish, store_settings
from .fixtures.registry import register_untrained
from .fixtures.trained import patched_params

MODEL = "loc2vec-encoder-publish-test"
RESOLUTION = 9  # ~175 m edge: ~200 cells in the test region
SOUTH = "test_li_south"  # the second region: the southern half of the test region (Vaduz), overlapping it
VIEWS = 3  # the latest views: location_embedding, tile_histogram, tag_counts (+ one view per served model version)


def _register(seed: int) -> str:
    return register_untrained(seed, MODEL, "loc2vec-publish-test")


@pytest.fixture(scope="module")
def setup(project: Path, region: str) -> Iterator[dict]:
    """Test params (coarse H3, own model name), a clean Feast dir and Postgres schema, model v1 as champion."""

    from loc2vec.osm.db import cursor
    from loc2vec.serving.store import forget_stores

    overrides = {"embed": {"h3_resolution": RESOLUTION, "batch_size": 64}, "train": {"registered_model": MODEL}}
    with patched_params(project, overrides):
        clear_published(project)
        with cursor(load_project().info) as cur:
            cur.execute("DROP SCHEMA IF EXISTS feast CASCADE")  # the test database's online tables
            cur.execute("DROP SCHEMA IF EXISTS feast_registry CASCADE")  # and its SQL registry
        forget_stores()
        yield {"v1": _register(1), "region": region}
        forget_stores()


def _online_rows(project: Path) -> list[tuple]:
    with sqlite3.connect(project / "data" / "feast" / "online.db") as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return [
            (t, *row)
            for t in tables
            for row in conn.execute(
                f'SELECT entity_key, feature_name, value, event_ts, created_ts FROM "{t}" ORDER BY 1, 2'
            )
        ]


@pytest.fixture(scope="module")
def south_pbf(tmp_path_factory: pytest.TempPathFactory, small_pbf: Path) -> Path:
    """The southern half of the test extract, cut with osmium like conftest's small_pbf."""
    west, south, east, north = TEST_BBOX
    out = tmp_path_factory.mktemp("osm-south") / "vaduz.osm.pbf"
    bbox = ",".join(str(v) for v in (west, south, east, (south + north) / 2))
    subprocess.run(
        ["osmium", "extract", "-b", bbox, "--set-bounds", "-s", "complete_ways", "-o", str(out), str(small_pbf)],
        check=True,
        capture_output=True,
    )
    return out


def _assert_online_serves_latest(project: Path) -> pd.DataFrame:
    """Every offline cell is served online with its latest offline row (all features and the event
    timestamp); returns those rows, indexed by cell."""
    from loc2vec.serving.store import feature_store

    offline = pq.read_table(project / "data" / "feast" / "embeddings.parquet").to_pandas()
    latest = offline.sort_values(["h3_cell", "event_timestamp"]).drop_duplicates("h3_cell", keep="last")
    latest = latest.set_index("h3_cell")
    online = (
        feature_store(store_settings("sqlite"))
        .get_online_features(
            features=[
                "location_embedding:embedding",
                "location_embedding:model_version",
                "tile_histogram:histogram",
                "tag_counts:tag_counts",
            ],
            entity_rows={"h3_cell": list(latest.index)},
        )
        .to_dict(include_event_timestamps=True)
    )
    for col in ("embedding", "histogram", "tag_counts"):
        np.testing.assert_array_equal(np.array(online[col], np.float32), np.stack(latest[col]), err_msg=col)
        assert online[f"{col}__ts"] == [int(t.timestamp()) for t in latest["event_timestamp"]], col
    assert online["model_version"] == list(latest["model_version"])
    return latest


def _embed_with(region: str, model) -> Path:
    """`loc2vec embed` of one region with a given registered version (not the champion)."""
    from loc2vec.embedding.run import embed_region

    from .fixtures.project import metatile_spec

    p = load_project()
    return embed_region(
        region,
        model,
        p.paths.embeddings(region),
        cfg=p.params.embed,
        spec=metatile_spec(p),
        paths=p.paths,
        info=p.info,
        orchestrate=p.params.orchestrate,
        progress=False,
    )


def _champion():
    from loc2vec.training.registry import resolve_alias

    return resolve_alias(load_project().paths, MODEL)


def test_embed_is_deterministic_and_complete(setup: dict, project: Path) -> None:
    from loc2vec.embedding.tag_counts import TAG_COUNT_NAMES

    first = embed(setup["region"])
    data = first.read_bytes()
    df = pd.read_parquet(first)
    assert 100 < len(df) < 400 and df["h3_cell"].is_unique
    assert {len(e) for e in df["embedding"]} == {16} and df["embedding"].iloc[0].dtype == np.float32
    assert {len(h) for h in df["histogram"]} == {12} and {len(t) for t in df["tag_counts"]} == {len(TAG_COUNT_NAMES)}
    h = np.stack(df["histogram"].to_numpy())
    assert ((h >= 0) & (h <= 1)).all() and (h.sum(axis=1) > 0).all(), "every cell on mapped land draws something"
    assert np.stack(df["tag_counts"].to_numpy())[:, 0].sum() > 0, "buildings are counted"
    ref = _champion()
    assert (df["model_name"] == MODEL).all() and (df["model_version"] == setup["v1"]).all()
    for col in ("event_timestamp", "created", "osm_timestamp"):
        assert str(df[col].dt.tz) == "UTC", col
    assert (df["event_timestamp"] == pd.Timestamp(ref.created)).all(), "valid from the version's registration"
    assert first.stats["cells"] == len(df) and first.stats["cells_per_s"] > 0

    again = embed(setup["region"])
    assert again.read_bytes() == data, "same model + same data → byte-identical Parquet"


def test_publish_serves_embeddings_online(setup: dict, project: Path) -> None:
    from loc2vec.serving.lookup import (
        InvalidLocationError,
        LocationNotPublishedError,
        get_location_embeddings,
    )

    report = publish(kind="sqlite")
    assert report["applied"] and not report["skipped"] and report["materialized"]["cells"] == report["cells"]
    assert report["materialized"]["mode"] == "full" and report["materialized"]["changed_partitions"] == 1

    sqlite = store_settings("sqlite")
    out = get_location_embeddings([VADUZ[0]], [VADUZ[1]], sqlite)
    row = out.iloc[0]
    assert len(row["embedding"]) == 16 and all(isinstance(v, float) for v in row["embedding"])
    assert row["model_version"] == setup["v1"] and row["model_name"] == MODEL
    offline = pd.read_parquet(project / "data" / "embeddings" / f"{setup['region']}.parquet").set_index("h3_cell")
    np.testing.assert_array_equal(np.float32(row["embedding"]), offline.loc[row["h3_cell"], "embedding"])

    with pytest.raises(LocationNotPublishedError, match="no published embedding"):
        get_location_embeddings([VADUZ[0], 0.0], [VADUZ[1], 0.0], sqlite)
    for lat, lon in ((float("nan"), 9.5), (91.0, 9.5), (47.1, 181.0)):
        with pytest.raises(InvalidLocationError):
            get_location_embeddings([lat], [lon], sqlite)


def test_republish_writes_nothing(setup: dict, project: Path) -> None:
    feast = project / "data" / "feast"
    files = [feast / "registry.db", feast / "online.db"]
    before = [(p.stat().st_mtime_ns, p.read_bytes()) for p in files]
    offline = _offline_files(feast)
    rows = _online_rows(project)
    assert rows and offline

    report = publish(kind="sqlite")
    assert report["skipped"] and not report["offline_rewritten"], report.get("reason")
    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in files] == before, "nothing is written"
    assert _offline_files(feast) == offline

    forced = publish(kind="sqlite", force=True)  # rewrites the same rows
    assert forced["applied"] and not forced["offline_rewritten"] and forced["partitions_written"] == 0
    assert forced["materialized"]["mode"] == "full" and forced["materialized"]["changed_partitions"] == 0
    assert _offline_files(feast) == offline, "unchanged offline content is not rewritten"
    assert _online_rows(project) == rows, "same values, event and created timestamps"


def _offline_files(feast: Path) -> list[tuple[str, int]]:
    """The offline store's generation and partition files (name, mtime): what a publish would rewrite."""
    source = feast / "embeddings.parquet"
    assert source.is_symlink() and source.is_dir(), "a link to a generation directory of partition files"
    files = sorted((feast / "partitions").glob("*.parquet"))
    return [(str(source.resolve()), 0)] + [(f.name, f.stat().st_mtime_ns) for f in files]


def test_new_version_publishes_alongside_and_joins_point_in_time(setup: dict, project: Path) -> None:
    from loc2vec.serving.lookup import get_location_embeddings, historical_features

    v1_path = project / "data" / "embeddings" / f"{setup['region']}.parquet"
    v1 = pd.read_parquet(v1_path).set_index("h3_cell")
    v2_version = _register(2)
    embed(setup["region"])
    v2 = pd.read_parquet(v1_path).set_index("h3_cell")
    t1, t2 = v1["event_timestamp"].iloc[0], v2["event_timestamp"].iloc[0]
    assert t1 < t2 and (v2["model_version"] == v2_version).all()

    report = publish(kind="sqlite")
    assert report["materialized"]["mode"] == "incremental", report["reason"]
    assert report["served_versions"] == [setup["v1"], v2_version]
    # v2's cells (all newer than v1's) in the latest views and in v2's own view; v1's view is left alone
    assert report["materialized"]["rows_written"] == len(v2) * VIEWS + len(v2)
    offline = pq.read_table(project / "data" / "feast" / "embeddings.parquet").to_pandas()
    assert sorted(offline["model_version"].unique()) == sorted([setup["v1"], v2_version]), "both versions kept"
    assert len(offline) == len(v1) + len(v2)

    sqlite = store_settings("sqlite")
    online = get_location_embeddings([VADUZ[0]], [VADUZ[1]], sqlite).iloc[0]
    assert online["model_version"] == v2_version, "online serves the latest event_timestamp"
    np.testing.assert_array_equal(np.float32(online["embedding"]), v2.loc[online["h3_cell"], "embedding"])

    cell = online["h3_cell"]
    times = [t1 - timedelta(seconds=1), t1 + (t2 - t1) / 2, t2 + timedelta(hours=1)]
    entity = pd.DataFrame(
        {"h3_cell": [cell] * 3, "event_timestamp": pd.to_datetime(times, utc=True), "label": [0, 1, 2]}
    )
    entity = entity.iloc[[2, 0, 1]].reset_index(drop=True)  # the caller's order must be kept
    got = historical_features(entity, "latest", sqlite)
    assert list(got["label"]) == [2, 0, 1] and len(got) == 3
    by_label = got.set_index("label")
    assert by_label.loc[0, "embedding"] is None or pd.isna(by_label.loc[0, "model_version"]), "before t1: nothing"
    assert by_label.loc[1, "model_version"] == setup["v1"], "between t1 and t2: v1, never v2"
    np.testing.assert_array_equal(np.float32(list(by_label.loc[1, "embedding"])), v1.loc[cell, "embedding"])
    assert by_label.loc[2, "model_version"] == v2_version
    np.testing.assert_array_equal(np.float32(list(by_label.loc[2, "embedding"])), v2.loc[cell, "embedding"])
    assert len(by_label.loc[2, "histogram"]) == 12 and len(by_label.loc[2, "tag_counts"]) > 0

    # identical (cell, time) rows, e.g. two labels at one place and moment, all get their features
    twice = pd.concat([entity, entity], ignore_index=True).assign(label=range(6))
    both = historical_features(twice, "latest", sqlite)
    assert list(both["label"]) == list(range(6))
    assert list(both["model_version"].iloc[3:]) == list(both["model_version"].iloc[:3])
    assert both["model_version"].notna().sum() == 4, "the 2 rows before t1 have nothing; the 4 others all join"


def test_postgres_online_store(setup: dict, project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loc2vec.osm.db import cursor
    from loc2vec.serving.lookup import LocationNotPublishedError, get_location_embeddings
    from loc2vec.serving.publish import materialize_incremental_only

    monkeypatch.setenv("LOC2VEC_ONLINE_STORE", "postgres")
    p = load_project()
    report = publish(project=p)
    assert report["online_store"] == "postgres" and report["applied"]
    with cursor(p.info) as cur:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'feast' ORDER BY 1")
        tables = [r[0] for r in cur.fetchall()]
        views = ["location_embedding", "tag_counts", "tile_histogram"]
        views += [f"location_embedding_v{v}" for v in report["served_versions"]]
        assert tables == sorted(f"loc2vec_{v}" for v in views)
        cur.execute('SELECT count(DISTINCT entity_key) FROM feast."loc2vec_location_embedding"')
        assert cur.fetchone()[0] == report["cells"]

    postgres = store_settings(project=p)  # $LOC2VEC_ONLINE_STORE chooses it
    assert postgres.kind == "postgres"
    pg = get_location_embeddings([VADUZ[0]], [VADUZ[1]], postgres).iloc[0]
    lite = get_location_embeddings([VADUZ[0]], [VADUZ[1]], store_settings("sqlite", project=p)).iloc[0]
    assert pg["model_version"] == lite["model_version"] and pg["embedding"] == lite["embedding"]
    with pytest.raises(LocationNotPublishedError):
        get_location_embeddings([0.0], [0.0], postgres)

    assert publish(project=p)["skipped"], "idempotent on PostgreSQL too"
    assert materialize_incremental_only(postgres)["online_store"] == "postgres"
    assert get_location_embeddings([VADUZ[0]], [VADUZ[1]], postgres).iloc[0]["embedding"] == pg["embedding"]
    assert p.paths.root == project
    assert report["materialized"]["mode"] == "full", "a new online store gets every cell"


def test_new_region_materializes_only_its_partition(setup: dict, project: Path, south_pbf: Path) -> None:
    v2 = _champion()
    setup["v3"] = _register(3)  # the champion from now on; registered before the south import (next test)
    ingest_region(SOUTH, south_pbf, force=True)  # imported now: the latest partition, on every run
    south = pd.read_parquet(_embed_with(SOUTH, v2))
    li = pd.read_parquet(load_project().paths.embeddings(setup["region"]))
    assert south["event_timestamp"].iloc[0] > li["event_timestamp"].iloc[0]
    both, li_only = set(li["h3_cell"]) & set(south["h3_cell"]), set(li["h3_cell"]) - set(south["h3_cell"])
    assert both and li_only, "the regions overlap in part"

    report = publish(kind="sqlite")
    done = report["materialized"]
    assert done["mode"] == "incremental" and done["changed_partitions"] == 1, report["reason"]
    # only the new partition: its cells in the latest views and in v2's view (south was embedded with v2)
    assert done["cells"] == len(south) and done["rows_written"] == len(south) * VIEWS + len(south)
    # read: south, and the partitions of the test region it overlaps (v1's and v2's), not rewritten
    assert done["read_partitions"] == 3 and report["partitions_written"] == 1
    assert report["cells"] == len(set(li["h3_cell"]) | set(south["h3_cell"]))

    latest = _assert_online_serves_latest(project)
    assert (latest.loc[sorted(both), "region"] == SOUTH).all(), "the newer import wins where they overlap"
    assert (latest.loc[sorted(li_only), "region"] == setup["region"]).all(), "the first region is left as it was"
    assert (latest.loc[sorted(li_only), "model_version"] == v2.version).all()
    assert publish(kind="sqlite")["skipped"]


def test_older_partition_never_overwrites_a_newer_row(setup: dict, project: Path) -> None:
    li = pd.read_parquet(embed(setup["region"]))  # v3, registered before the south import
    south = pd.read_parquet(load_project().paths.embeddings(SOUTH))
    assert (li["model_version"] == setup["v3"]).all()
    assert li["event_timestamp"].iloc[0] < south["event_timestamp"].iloc[0], "older than the published south rows"
    both, li_only = set(li["h3_cell"]) & set(south["h3_cell"]), set(li["h3_cell"]) - set(south["h3_cell"])

    report = publish(kind="sqlite")
    done = report["materialized"]
    assert done["mode"] == "incremental" and done["changed_partitions"] == 1, report["reason"]
    # the latest views: only the cells where v3's row is the newest (not south's); v3's view: all li's cells;
    # v2's view: nothing (v3's rows are not v2's)
    assert report["served_versions"][-1] == setup["v3"] and len(report["served_versions"]) == 3
    assert done["cells"] == len(li_only) and done["rows_written"] == len(li_only) * VIEWS + len(li)

    latest = _assert_online_serves_latest(project)
    assert (latest.loc[sorted(both), "region"] == SOUTH).all(), "the newer south rows stay online"
    assert (latest.loc[sorted(both), "model_version"] != setup["v3"]).all()
    assert (latest.loc[sorted(li_only), "model_version"] == setup["v3"]).all()


def test_changed_definitions_or_damaged_online_store_materialize_everything(setup: dict, project: Path) -> None:
    from loc2vec.serving.publish import definitions_digest

    feast = project / "data" / "feast"
    state_path = feast / "published_sqlite.json"
    state = json.loads(state_path.read_text())
    assert publish(kind="sqlite")["skipped"]
    state["definitions_digest"] = "0" * 64  # as if last published with other feature_repo/ definitions
    state_path.write_text(json.dumps(state))
    report = publish(kind="sqlite")
    done = report["materialized"]
    assert report["reason"] == "changed: definitions" and done["mode"] == "full"
    # every view in full: the latest views and those of v1, v2 (li and south together cover li's cells) and v3
    assert len(report["served_versions"]) == 3
    assert done["changed_partitions"] == 0 and done["rows_written"] == report["cells"] * (VIEWS + 3)
    assert json.loads(state_path.read_text())["definitions_digest"] == definitions_digest()
    _assert_online_serves_latest(project)

    def wipe_online() -> None:
        with sqlite3.connect(feast / "online.db") as conn:
            for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
                conn.execute(f'DELETE FROM "{table}"')

    wipe_online()  # unchanged data, damaged online store
    report = publish(kind="sqlite")
    assert report["materialized"]["mode"] == "full" and "unchanged, but" in report["reason"], report["reason"]
    _assert_online_serves_latest(project)

    wipe_online()  # a new partition, and the cells outside its window lost: not a window
    _register(4)
    embed(SOUTH)
    report = publish(kind="sqlite")
    assert report["materialized"]["mode"] == "full" and "outside their window" in report["reason"]
    assert report["materialized"]["changed_partitions"] == 1
    _assert_online_serves_latest(project)
