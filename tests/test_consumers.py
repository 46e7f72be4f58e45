"""Consumers in production (#14): version-pinned embeddings, retirement, the CLI, Feast's HTTP feature server
and the thin client's imports, against the real Feast store (SQLite online store), MLflow and `loc2vec`
processes.

Tiny untrained Encoders are registered under a model name of this module (v1, v2, … in registration
order), the test region is embedded with each at a coarse H3 resolution and published with
`publish.retain_versions: 2`.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from .conftest import REPO, VADUZ
from .fixtures.project import clear_published, embed, load_project, publish, store_settings
from .fixtures.registry import register_untrained
from .fixtures.trained import patched_params

MODEL = "loc2vec-encoder-consumers-test"
RESOLUTION = 9  # ~175 m cells: ~200 in the test region
RETAIN = 2
SCHAAN = (47.1660, 9.5055)


def _register(seed: int) -> str:
    return register_untrained(seed, MODEL, "loc2vec-consumers-test")


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "loc2vec.cli", *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def world(project: Path, region: str) -> Iterator[dict]:
    """Test params (coarse H3, own model name, 2 retained versions) and a clean Feast directory."""

    from loc2vec.serving.store import forget_stores

    overrides = {
        "embed": {"h3_resolution": RESOLUTION, "batch_size": 64},
        "train": {"registered_model": MODEL},
        "publish": {"retain_versions": RETAIN},
    }
    with patched_params(project, overrides):
        clear_published(project)
        forget_stores()
        yield {"region": region}
        forget_stores()
        # leave no published data behind: another module's model would reuse these version numbers
        clear_published(project)


def _fresh_store():
    """A consumer started now: a new FeatureStore reading the registry as it is."""
    from loc2vec.serving.store import feature_store, forget_stores

    forget_stores()
    return feature_store(store_settings("sqlite"))


def _service_rows(service: str, cells: list[str]) -> dict:
    store = _fresh_store()
    return store.get_online_features(
        features=store.get_feature_service(service), entity_rows={"h3_cell": cells}
    ).to_dict()


def _offline(project: Path, region: str) -> pd.DataFrame:
    return pd.read_parquet(project / "data" / "embeddings" / f"{region}.parquet").set_index("h3_cell")


def test_pinned_version_survives_a_new_champion(world: dict, project: Path) -> None:
    """Publish v1, train a classifier on pinned v1 features, publish v2 as champion: the pinned service returns
    v1 bit for bit and the classifier's predictions are unchanged; `latest` returns v2."""
    from sklearn.linear_model import LogisticRegression

    from loc2vec.serving.lookup import get_location_embeddings, historical_features

    v1 = world["v1"] = _register(1)
    embed(world["region"])
    report = publish(kind="sqlite")
    assert report["served_versions"] == [v1] and report["retired_versions"] == []
    off1 = _offline(project, world["region"])
    cells = sorted(off1.index)

    # a consumer trains on its pinned service (point-in-time join), labels from the buildings channel
    service = f"transport_mode_v{v1}"
    entity = pd.DataFrame({"h3_cell": cells, "event_timestamp": pd.Timestamp.now(tz="UTC")})
    train = historical_features(entity, service, store_settings("sqlite"))
    assert (train["model_version"] == v1).all()
    x_train = np.stack(train["embedding"].map(np.asarray)).astype(np.float32)
    np.testing.assert_array_equal(x_train, np.stack(off1.loc[cells, "embedding"]))
    hist = np.stack(off1.loc[cells, "histogram"])
    y = (hist[:, 6] > np.median(hist[:, 6])).astype(int)  # buildings: more than the median cell
    clf = LogisticRegression(max_iter=1000).fit(x_train, y)
    before = _service_rows(service, cells)
    predicted = clf.predict(np.asarray(before["embedding"], np.float32))

    v2 = world["v2"] = _register(2)  # the new champion
    embed(world["region"])
    report = publish(kind="sqlite")
    assert report["served_versions"] == [v1, v2] and report["materialized"]["mode"] == "incremental", report["reason"]
    off2 = _offline(project, world["region"])
    assert not np.array_equal(np.stack(off2.loc[cells, "embedding"]), np.stack(off1.loc[cells, "embedding"]))

    after = _service_rows(service, cells)
    assert after["embedding"] == before["embedding"], "the pinned service returns v1, bit for bit"
    assert set(after["model_version"]) == {v1}
    assert after["histogram"] == before["histogram"] and after["tag_counts"] == before["tag_counts"]
    np.testing.assert_array_equal(clf.predict(np.asarray(after["embedding"], np.float32)), predicted)
    again = historical_features(entity, service, store_settings("sqlite"))
    np.testing.assert_array_equal(np.stack(again["embedding"].map(np.asarray)).astype(np.float32), x_train)

    latest = _service_rows("latest", cells)
    assert set(latest["model_version"]) == {v2}
    np.testing.assert_array_equal(np.asarray(latest["embedding"], np.float32), np.stack(off2.loc[cells, "embedding"]))
    assert _service_rows(f"transport_mode_v{v2}", cells)["embedding"] == latest["embedding"]

    settings = store_settings("sqlite")
    pinned = get_location_embeddings([VADUZ[0]], [VADUZ[1]], settings, version=v1).iloc[0]
    newest = get_location_embeddings([VADUZ[0]], [VADUZ[1]], settings).iloc[0]
    assert (pinned["model_version"], newest["model_version"]) == (v1, v2)
    np.testing.assert_array_equal(np.float32(pinned["embedding"]), off1.loc[pinned["h3_cell"], "embedding"])
    np.testing.assert_array_equal(np.float32(newest["embedding"]), off2.loc[newest["h3_cell"], "embedding"])
    assert publish(kind="sqlite")["skipped"], "idempotent with versions"


def test_old_version_retired_after_retain_versions_newer(world: dict, project: Path) -> None:
    """v3 published with retain_versions 2: v1's view, services, online table and file go; v2 is untouched."""
    from loc2vec.serving.catalog import VersionNotServedError, served_versions
    from loc2vec.serving.lookup import get_location_embeddings

    v1, v2 = world["v1"], world["v2"]
    cells = sorted(_offline(project, world["region"]).index)
    pinned_v2 = _service_rows(f"transport_mode_v{v2}", cells)
    v1_file = load_project().paths.version_offline_store(v1)
    assert v1_file.is_dir(), "a link to its directory of partition files"

    v3 = world["v3"] = _register(3)
    embed(world["region"])
    report = publish(kind="sqlite")
    assert report["served_versions"] == [v2, v3] and report["retired_versions"] == [v1]

    store = _fresh_store()
    assert served_versions(store) == [v2, v3]
    names = {s.name for s in store.list_feature_services()}
    assert names == {"latest", f"transport_mode_v{v2}", f"venue_v{v2}", f"transport_mode_v{v3}", f"venue_v{v3}"}
    with sqlite3.connect(project / "data" / "feast" / "online.db") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert f"loc2vec_location_embedding_v{v1}" not in tables, "its online rows are gone"
    assert {f"loc2vec_location_embedding_v{v2}", f"loc2vec_location_embedding_v{v3}"} <= tables
    assert not v1_file.exists() and not v1_file.is_symlink()
    offline = pd.read_parquet(project / "data" / "feast" / "embeddings.parquet")
    assert v1 in set(offline["model_version"]), "the offline history keeps every version"

    assert _service_rows(f"transport_mode_v{v2}", cells)["embedding"] == pinned_v2["embedding"]
    with pytest.raises(VersionNotServedError, match=f"model version {v1} is not served"):
        get_location_embeddings([VADUZ[0]], [VADUZ[1]], store_settings("sqlite"), version=v1)
    assert publish(kind="sqlite")["skipped"]


def test_cli_services_and_features(world: dict, project: Path, tmp_path: Path) -> None:
    v2, v3 = world["v2"], world["v3"]
    services = json.loads(_run_cli("services", "--online-store", "sqlite", "--json").stdout)
    pins = {s["name"]: s["model_version"] for s in services}
    assert pins == {
        "latest": None,
        f"transport_mode_v{v2}": v2,
        f"venue_v{v2}": v2,
        f"transport_mode_v{v3}": v3,
        f"venue_v{v3}": v3,
    }

    lat, lon = (str(v) for v in VADUZ)
    pinned = json.loads(_run_cli("features", "--lat", lat, "--lon", lon, "--version", v2).stdout)
    newest = json.loads(_run_cli("features", "--lat", lat, "--lon", lon).stdout)
    assert (pinned["model_version"], newest["model_version"]) == (v2, v3)
    offline = pd.read_parquet(project / "data" / "feast" / "embeddings.parquet")
    row = offline[(offline["h3_cell"] == pinned["h3_cell"]) & (offline["model_version"] == v2)].iloc[0]
    np.testing.assert_array_equal(np.float32(pinned["embedding"]), row["embedding"])

    points = tmp_path / "points.csv"
    points.write_text(f"name,lat,lon\nvaduz,{VADUZ[0]},{VADUZ[1]}\nschaan,{SCHAAN[0]},{SCHAAN[1]}\n")
    out = _run_cli("features", "--csv", str(points), "--version", v2).stdout
    rows = list(csv.DictReader(out.splitlines()))
    assert [r["model_version"] for r in rows] == [v2, v2] and rows[0]["h3_cell"] == pinned["h3_cell"]
    assert json.loads(rows[0]["embedding"]) == pinned["embedding"]

    no_lon = tmp_path / "no_lon.csv"
    no_lon.write_text(f"lat,longitude\n{VADUZ[0]},{VADUZ[1]}\n")
    for args, message in (
        (["--lat", lat, "--lon", lon, "--version", world["v1"]], f"model version {world['v1']} is not served"),
        (["--csv", str(no_lon)], "expected a header with columns lat and lon"),
        ([], "give either --lat and --lon, or --csv FILE"),
    ):
        bad = subprocess.run(
            [sys.executable, "-m", "loc2vec.cli", "features", *args], cwd=REPO, capture_output=True, text=True
        )
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_default_store_is_read_as_feast_reads_it(world: dict, project: Path) -> None:
    """A lookup on the default store reads the registry file and the SQLite rows itself (serving/online_read.py):
    for the latest view and each pinned one, the same cells, vectors, model names and versions as Feast's
    get_online_features, nothing where Feast has nothing; a retired version is refused with the same words;
    the views and tags read from the registry file are Feast's."""
    import h3

    from loc2vec.serving import lookup
    from loc2vec.serving.catalog import VersionNotServedError
    from loc2vec.serving.online_read import view_tags
    from loc2vec.serving.store import EMBEDDING_FEATURES, direct_store

    settings = store_settings("sqlite")
    store = direct_store(settings)
    assert store is not None
    assert view_tags(store) == {v.name: dict(v.tags) for v in _fresh_store().list_feature_views()}
    cells = sorted(_offline(project, world["region"]).index)[::3]
    lat, lon = (np.array(x) for x in zip(*[h3.cell_to_latlng(c) for c in cells], (40.0, 9.5), strict=True))

    def same(values: list) -> list:
        return [None if v is None or len(v) == 0 else [float(x) for x in v] for v in values]

    for version in (None, world["v2"], world["v3"]):
        direct = lookup._read_direct(settings, lat, lon, version)
        via_feast = lookup._read_feast(settings, lat, lon, version)
        assert direct is not None and direct[0] == via_feast[0], version
        for name in EMBEDDING_FEATURES:
            got, want = direct[1][name], via_feast[1][name]
            assert same(got) == same(want) if name == "embedding" else got == want, (version, name)
        assert direct[1]["embedding"][-1] is None and sum(e is None for e in direct[1]["embedding"]) == 1
    refused = []
    for read in (lookup._read_direct, lookup._read_feast):
        with pytest.raises(VersionNotServedError) as caught:
            read(settings, lat, lon, world["v1"])
        refused.append(str(caught.value))
    assert refused[0] == refused[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture()
def server(world: dict, tmp_path: Path) -> Iterator[str]:
    """`loc2vec serve --port P` as a real process; its base URL once /health answers."""
    port = _free_port()
    path = tmp_path / "serve.log"
    with open(path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loc2vec.cli", "serve", "--online-store", "sqlite", "--port", str(port)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield _wait_healthy(f"http://127.0.0.1:{port}", proc, path)
        finally:
            proc.terminate()  # gunicorn's master stops its workers
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(base: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return base
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def test_feature_server_over_http(world: dict, project: Path, server: str) -> None:
    """The real feature server answers get-online-features for a pinned service and a pinned view, with the
    values the in-process store serves; it binds 127.0.0.1."""
    v2 = world["v2"]
    cells = sorted(_offline(project, world["region"]).index)[:5]
    got = _post(
        server + "/get-online-features", {"feature_service": f"transport_mode_v{v2}", "entities": {"h3_cell": cells}}
    )
    names = got["metadata"]["feature_names"]
    columns = {name: got["results"][i]["values"] for i, name in enumerate(names)}
    expected = _service_rows(f"transport_mode_v{v2}", cells)
    assert columns["h3_cell"] == cells
    assert columns["model_version"] == [v2] * len(cells)
    np.testing.assert_array_equal(
        np.asarray(columns["embedding"], np.float32), np.asarray(expected["embedding"], np.float32)
    )
    assert all(s == "PRESENT" for s in got["results"][names.index("embedding")]["statuses"])

    view = f"location_embedding_v{world['v3']}"
    got = _post(server + "/get-online-features", {"features": [f"{view}:embedding"], "entities": {"h3_cell": cells}})
    assert len(got["results"][1]["values"]) == len(cells)

    with socket.socket() as s:  # not on another interface
        s.settimeout(2)
        host = socket.gethostbyname(socket.gethostname())
        if host != "127.0.0.1":
            assert s.connect_ex((host, int(server.rsplit(":", 1)[1]))) != 0


def test_versioned_read_check_answers_as_feasts() -> None:
    """serving/feast_import.py answers Feast's "does this online store support versioned reads" by class name,
    without importing every store's module; for the stores loc2vec uses and one Feast refuses, as Feast does."""
    from loc2vec.serving import feast_import

    feast_import.import_feast()
    from feast.infra.online_stores.online_store import OnlineStore
    from feast.infra.online_stores.postgres_online_store.postgres import PostgreSQLOnlineStore
    from feast.infra.online_stores.redis import RedisOnlineStore
    from feast.infra.online_stores.remote import RemoteOnlineStore
    from feast.infra.online_stores.sqlite import SqliteOnlineStore

    assert feast_import.feast_versioned_read_check is not None, "Feast was imported the fast way"
    for cls in (SqliteOnlineStore, PostgreSQLOnlineStore, RedisOnlineStore, RemoteOnlineStore):
        store = object.__new__(cls)
        assert store._is_versioned_read_supported() == feast_import.feast_versioned_read_check(store), cls
        assert OnlineStore._is_versioned_read_supported is feast_import._versioned_read_supported
    assert not object.__new__(RemoteOnlineStore)._is_versioned_read_supported()


def test_thin_client_imports_no_torch_mapnik_or_sklearn(world: dict) -> None:
    """`from loc2vec.serving import get_location_embeddings` and a lookup load neither torch, Mapnik nor
    scikit-learn (a fresh interpreter, checked through sys.modules); `lookup_locations` (what `loc2vec features`
    calls) on the default store loads neither Feast, pandas nor pyarrow."""
    code = f"""
import sys
from loc2vec.serving import get_location_embeddings
from loc2vec.cli.project import Project
from loc2vec.serving.store import StoreSettings
p = Project.load()
s = StoreSettings.from_config(p.params.publish, p.params.embed, p.paths, p.info, "sqlite", reader=p.reader)
from loc2vec.serving.lookup import lookup_locations
found = lookup_locations([{VADUZ[0]}], [{VADUZ[1]}], s, version="{world["v2"]}")
print(sorted(m for m in ("feast", "pandas", "pyarrow") if m in sys.modules))  # the default store: read directly
row = get_location_embeddings([{VADUZ[0]}], [{VADUZ[1]}], s, version="{world["v2"]}").iloc[0]
assert row["embedding"] == found.embedding[0]
print(row["model_version"], sorted(m for m in ("torch", "mapnik", "sklearn") if m in sys.modules))
print("dask.dataframe" in sys.modules)  # the file offline store's, 1.7 s: not needed online
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["[]", world["v2"], "[]", "False"], out.stdout


PIPELINE_ONLY = (  # the `pipeline` extra's packages (pyproject.toml) a client install lacks (tqdm comes with Feast)
    "torch", "mapnik", "sklearn", "mlflow", "prefect", "prefect_dask", "dvc", "zarr", "faiss", "matplotlib",
    "rich", "PIL", "websockets", "networkx", "pydot", "ruamel",
)  # fmt: skip
BLOCKING_RUNNER = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("not in a client install: " + name)
sys.meta_path.insert(0, Blocker())
from loc2vec.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_client_cli_without_pipeline_packages(world: dict, tmp_path: Path) -> None:
    """`loc2vec features` and `services` where none of the pipeline's packages can be imported, run from a
    directory outside the checkout with only the store templates (LOC2VEC_FEATURE_REPO): the same vector."""
    import shutil

    repo = tmp_path / "feature_repo"
    repo.mkdir()
    for name in ("feature_store.yaml", "feature_store.postgres.yaml"):
        shutil.copy(REPO / "feature_repo" / name, repo / name)
    runner = tmp_path / "client.py"
    runner.write_text(f"BLOCKED = {PIPELINE_ONLY!r}\n" + BLOCKING_RUNNER)
    env = {**os.environ, "LOC2VEC_FEATURE_REPO": str(repo)}
    lat, lon = (str(v) for v in VADUZ)

    def client(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, str(runner), *args], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    v3 = world["v3"]
    got = json.loads(client("features", "--lat", lat, "--lon", lon, "--version", v3, "--online-store", "sqlite"))
    want = json.loads(_run_cli("features", "--lat", lat, "--lon", lon, "--version", v3).stdout)
    assert got == want and got["model_version"] == v3
    pins = {s["name"]: s["model_version"] for s in json.loads(client("services", "--json", "--online-store", "sqlite"))}
    assert pins["latest"] is None and pins[f"transport_mode_v{v3}"] == v3


def test_publish_killed_between_swap_and_drop_finishes_retiring(world: dict, project: Path, tmp_path: Path) -> None:
    """A publish killed after swapping in the registry without v2, before dropping v2's online table: consumers
    already see v2 retired (and v3, v4 served); the next publish drops the table and records the state."""
    from loc2vec.serving.catalog import served_versions

    v2, v3 = world["v2"], world["v3"]
    cells = sorted(_offline(project, world["region"]).index)
    pinned_v3 = _service_rows(f"transport_mode_v{v3}", cells)
    v4 = _register(4)
    embed(world["region"])
    killed = subprocess.run(
        [sys.executable, "-m", "tests.fixtures.kill_at", "loc2vec.serving.publish:_drop_online", "before", "1"]
        + ["--", "publish", "--online-store", "sqlite"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]

    def tables() -> set[str]:
        with sqlite3.connect(project / "data" / "feast" / "online.db") as conn:
            return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}

    assert served_versions(_fresh_store()) == [v3, v4], "the swap retired v2 for consumers at once"
    assert f"loc2vec_location_embedding_v{v2}" in tables(), "killed before its table was dropped"
    assert _service_rows(f"transport_mode_v{v3}", cells)["embedding"] == pinned_v3["embedding"]

    report = json.loads(_run_cli("publish", "--online-store", "sqlite").stdout)
    assert report["retired_versions"] == [v2] and report["served_versions"] == [v3, v4]
    assert f"loc2vec_location_embedding_v{v2}" not in tables()
    assert not load_project().paths.version_offline_store(v2).exists()
    assert _service_rows(f"transport_mode_v{v3}", cells)["embedding"] == pinned_v3["embedding"]
    assert json.loads(_run_cli("publish", "--online-store", "sqlite").stdout)["skipped"]


@pytest.fixture()
def redis_store(world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real redis-server of its own (Debian's), started like `loc2vec redis start`; its connection string."""
    from loc2vec.serving import redis_server

    connection = f"127.0.0.1:{_free_port()}"
    assert redis_server.start(connection, tmp_path / "redis")
    monkeypatch.setenv("LOC2VEC_REDIS", connection)
    try:
        yield connection
    finally:
        assert redis_server.stop(connection)


def test_redis_online_store(world: dict, project: Path, redis_store: str) -> None:
    """Publishing to Redis serves what SQLite serves (pinned and latest), idempotently; retiring a version
    removes its fields from every cell's hash."""
    import redis

    from loc2vec.serving.catalog import VersionNotServedError, served_versions
    from loc2vec.serving.lookup import get_location_embeddings

    report = publish(kind="redis")
    assert report["online_store"] == "redis" and report["redis"] == redis_store
    served = report["served_versions"]
    assert served == served_versions(_fresh_store())
    lats, lons = [VADUZ[0], SCHAAN[0]], [VADUZ[1], SCHAAN[1]]
    for version in (None, *served):
        on_redis = get_location_embeddings(lats, lons, store_settings("redis"), version=version)
        on_sqlite = get_location_embeddings(lats, lons, store_settings("sqlite"), version=version)
        assert on_redis["embedding"].tolist() == on_sqlite["embedding"].tolist(), version
        assert on_redis["model_version"].tolist() == on_sqlite["model_version"].tolist()
    assert publish(kind="redis")["skipped"]

    oldest = served[0]
    _register(len(served) + 10)  # a newer version: the oldest served one is retired
    embed(world["region"])
    report = publish(kind="redis")
    assert report["retired_versions"] == [oldest]
    with pytest.raises(VersionNotServedError):
        get_location_embeddings(lats, lons, store_settings("redis"), version=oldest)
    client = redis.Redis(host="127.0.0.1", port=int(redis_store.rsplit(":", 1)[1]))
    fields = {f for key in client.scan_iter(count=1000) for f in client.hkeys(key)}
    assert fields and not any(f"location_embedding_v{oldest}".encode() in f for f in fields)
    assert any(f"location_embedding_v{report['served_versions'][-1]}".encode() in f for f in fields)


def test_running_server_serves_the_next_publish(world: dict, project: Path, server: str) -> None:
    """A running feature server picks up a publish (it re-reads the registry every serve.registry_ttl_s):
    the new version's service answers and the retired one's stops, without a restart."""
    from loc2vec.serving.catalog import served_versions

    cells = sorted(_offline(project, world["region"]).index)[:3]
    before = served_versions(_fresh_store())
    newest = str(
        max(int(v) for v in pd.read_parquet(load_project().paths.embeddings(world["region"]))["model_version"])
    )
    assert newest not in before, "the region was embedded with a version not yet published to SQLite"

    def ask(service: str) -> dict | None:
        try:
            return _post(server + "/get-online-features", {"feature_service": service, "entities": {"h3_cell": cells}})
        except urllib.error.HTTPError:
            return None

    assert ask(f"transport_mode_v{before[0]}") is not None and ask(f"transport_mode_v{newest}") is None
    report = publish(kind="sqlite")
    assert report["served_versions"] == [before[-1], newest] and report["retired_versions"] == [before[0]]
    deadline = time.monotonic() + 60
    while (got := ask(f"transport_mode_v{newest}")) is None:
        assert time.monotonic() < deadline, "the server never served the new version"
        time.sleep(1)
    names = got["metadata"]["feature_names"]
    assert got["results"][names.index("model_version")]["values"] == [newest] * len(cells)
    assert ask(f"transport_mode_v{before[0]}") is None, "the retired version is gone from the server too"


def test_versions_of_another_model_are_not_pinned_and_never_reuse_a_number() -> None:
    """Rows of another registered model (a renamed train.registered_model) stay offline but get no pinned view;
    a version number served for one model is never re-pointed at another's."""
    import pyarrow as pa

    from loc2vec.embedding.store import SCHEMA
    from loc2vec.serving.versions import VersionError, check_same_models, served_versions

    def rows(model: str, version: str, day: int) -> list[dict]:
        ts = pd.Timestamp(f"2026-01-{day:02d}", tz="UTC")
        return [
            {"h3_cell": f"89{day:02d}{i}", "model_name": model, "model_version": version, "h3_resolution": 9}
            | {"event_timestamp": ts, "created": ts}
            for i in range(2)
        ]

    data = rows("old-model", "1", 1) + rows("old-model", "2", 2) + rows("new-model", "1", 3)
    columns = {f.name: [r.get(f.name) for r in data] for f in SCHEMA}
    table = pa.table(columns, schema=SCHEMA)
    served, retired = served_versions(table, retain=3)
    assert [(v.model_name, v.version) for v in served] == [("new-model", "1")] and retired == []
    check_same_models(served, {"1": "new-model", "7": "old-model"})
    with pytest.raises(VersionError, match="consumers pinned to it would silently get another model"):
        check_same_models(served, {"1": "old-model", "2": "old-model"})


def test_second_interpreter_runs_this_package_whatever_the_working_directory(tmp_path: Path) -> None:
    """The re-execution under tcmalloc runs the package the first process ran: started from a folder that holds
    another `loc2vec/` (another checkout), `python -m loc2vec.cli` would import that one (until 2026-12-05 a
    bench run from a second checkout measured the second checkout's code)."""
    from loc2vec.cli.allocator import tcmalloc_path

    assert tcmalloc_path() is not None, "make setup installs libtcmalloc-minimal4"
    decoy = tmp_path / "loc2vec" / "cli"
    decoy.mkdir(parents=True)
    (tmp_path / "loc2vec" / "__init__.py").write_text("")
    (decoy / "__init__.py").write_text("")
    (decoy / "__main__.py").write_text("print('decoy'); raise SystemExit(3)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LOC2VEC_ALLOCATOR")}
    program = Path(sys.executable).parent / "loc2vec"  # the console script, as a user starts it
    out = subprocess.run([str(program), "ingest", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "decoy" not in out.stdout and "--region" in out.stdout, out.stdout + out.stderr


def test_lookups_run_without_a_second_interpreter() -> None:
    """`loc2vec features`/`services` are not re-executed under tcmalloc (cli/allocator.py: they compute
    nothing, and a second interpreter start is ~0.1 s of a lookup); the command is found past options and
    --params' value."""
    from loc2vec.cli.allocator import command_of

    assert command_of(["--params", "features", "train", "--out", "x"]) == "train"
    assert command_of(["-v", "features", "--lat", "47.1"]) == "features"
    assert command_of(["--debug"]) is None
    code = "from loc2vec.cli.allocator import reexec_under_tcmalloc as r; r(['features', '--lat', '1']); print('ran')"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LOC2VEC_ALLOCATOR")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ran", out.stderr[-2000:]
