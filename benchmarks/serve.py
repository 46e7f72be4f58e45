"""Feast serving: materialization rows/s and online retrieval latency (1 and 100 entities), in-process and over
HTTP, on SQLite, PostgreSQL and Redis in one run.

Works on the published offline data (data/feast/embeddings.parquet, see loc2vec/serving/publish.py) but
materializes it into a *throwaway* store (a temporary registry + SQLite file; a `feast_bench` schema on
PostgreSQL, dropped afterwards; a redis-server of its own on a free port, stopped afterwards), so the
project's online stores are never touched. $LOC2VEC_BENCH_STORES (e.g. `sqlite,redis`) picks the stores
(default: all three).

Latency is in-process `FeatureStore.get_online_features` for the location_embedding view (embedding,
model_name, model_version), random published cells, after a warm-up; `http_1`/`http_100` ask Feast's
feature server (`feast serve` on the same throwaway store, 127.0.0.1, one worker) the same over HTTP, one
keep-alive connection, JSON encoded and decoded by the client; `e2e` adds what
`loc2vec.serving.lookup.get_location_embeddings` adds (lat/lon → H3, checks, DataFrame) on the project's store.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .common import latencies

if TYPE_CHECKING:
    from loc2vec.cli.project import Project
    from loc2vec.serving.store import StoreSettings

FEATURES = ["location_embedding:embedding", "location_embedding:model_name", "location_embedding:model_version"]
BENCH_SCHEMA = "feast_bench"


def _settings(project: Project, kind: str) -> StoreSettings:
    """The project's store of this kind (params publish/embed, its paths and database)."""
    from loc2vec.serving.store import StoreSettings

    params = project.params
    return StoreSettings.from_config(params.publish, params.embed, project.paths, project.info, kind)


@contextmanager
def _throwaway_store(settings: StoreSettings) -> Iterator[tuple[Any, dict]]:
    """A FeatureStore like the project's, with its own registry and online storage (and its config)."""
    import yaml

    from loc2vec.serving.feast_import import import_feast

    import_feast()
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    from loc2vec.osm.db import cursor
    from loc2vec.serving.store import store_yaml

    raw = yaml.safe_load(store_yaml(settings))
    with tempfile.TemporaryDirectory(prefix="loc2vec-bench-") as tmp:
        raw["registry"] = str(Path(tmp) / "registry.db")
        redis = None
        if settings.kind == "sqlite":
            raw["online_store"]["path"] = str(Path(tmp) / "online.db")
        elif settings.kind == "redis":
            from loc2vec.serving import redis_server

            redis = f"127.0.0.1:{_free_port()}"
            redis_server.start(redis, Path(tmp) / "redis")
            raw["online_store"]["connection_string"] = redis
        else:
            raw["online_store"]["db_schema"] = BENCH_SCHEMA
        config = RepoConfig(**raw)
        config.repo_path = settings.paths.feature_repo  # the offline source path resolves against it
        store = FeatureStore(repo_path=str(config.repo_path), config=config)
        try:
            yield store, raw
        finally:
            if settings.kind == "postgres":
                with cursor(settings.info) as cur:
                    cur.execute(f"DROP SCHEMA IF EXISTS {BENCH_SCHEMA} CASCADE")
            if redis is not None:
                from loc2vec.serving import redis_server

                redis_server.stop(redis)


def _bench_store(settings: StoreSettings, full, table, n: int, rng: np.random.Generator) -> dict[str, Any]:
    """full: the whole offline data (what materialize reads); table: the rows whose cells are looked up."""
    from loc2vec.serving.publish import load_definitions

    kind = settings.kind
    cells = np.asarray(sorted(set(table.column("h3_cell").to_pylist())))
    ts = full.column("event_timestamp")
    out: dict[str, Any] = {}
    with _throwaway_store(settings) as (store, raw):
        t0 = time.perf_counter()
        store.apply(load_definitions())
        out["apply_s"] = round(time.perf_counter() - t0, 2)
        start = pc.min(ts).as_py()
        end = max(datetime.now(UTC), pc.max(ts).as_py() + timedelta(microseconds=1))
        t0 = time.perf_counter()
        store.materialize(start_date=start, end_date=end)
        seconds = time.perf_counter() - t0
        n_cells = len(set(full.column("h3_cell").to_pylist()))
        rows = n_cells * len(store.list_feature_views())
        out["materialize"] = {
            "cells": n_cells,
            "rows": rows,
            "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds, 1),
        }

        def lookup(batch: list[str]) -> None:
            res = store.get_online_features(features=FEATURES, entity_rows={"h3_cell": batch}).to_dict()
            assert res["embedding"][0] is not None

        sizes = ((1, n), (100, max(50, n // 5)))
        batches = {
            size: [rng.choice(cells, size, replace=size > len(cells)).tolist() for _ in range(count)]
            for size, count in sizes
        }
        for size, _ in sizes:
            out[f"online_{size}"] = latencies(lookup, batches[size], warmup=20)
        out.update(_bench_http(raw, settings.paths.feature_repo, batches))

    # End to end through loc2vec.serving.lookup on the project's own store, when it is published there.
    if not settings.paths.publish_state(kind).is_file():
        out["e2e"] = f"skipped: the project is not published to {kind} (`loc2vec publish`)"
        return out
    try:
        import h3

        from loc2vec.serving.lookup import get_location_embeddings

        sample = rng.choice(cells, 100, replace=len(cells) < 100)
        lat, lon = np.array([h3.cell_to_latlng(c) for c in sample]).T
        get_location_embeddings(lat[:1], lon[:1], settings)
        reqs = [(lat[i : i + 1], lon[i : i + 1]) for i in rng.integers(0, len(lat), n)]
        out["e2e_1"] = latencies(lambda r: get_location_embeddings(r[0], r[1], settings), reqs, warmup=20)
        out["e2e_100"] = latencies(lambda _: get_location_embeddings(lat, lon, settings), [0] * (n // 5), warmup=20)
    except Exception as exc:  # not published to this store: the Feast numbers above still stand
        out["e2e"] = f"skipped: {type(exc).__name__}: {exc}"[:200]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _feature_server(raw: dict, repo: Path) -> Iterator[int]:
    """`feast serve` on the throwaway store (its config written next to its registry), on 127.0.0.1."""
    import yaml

    config_dir = Path(raw["registry"]).parent / "serve"
    config_dir.mkdir()
    (config_dir / "feature_store.yaml").write_text(yaml.safe_dump(raw))
    port = _free_port()
    feast = Path(sys.executable).with_name("feast")
    cmd = [str(feast), "-c", str(config_dir), "serve", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
    log = config_dir / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=repo, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"feast serve exited: {log.read_text()[-2000:]}")
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    conn.request("GET", "/health")
                    if conn.getresponse().status == 200:
                        conn.close()
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"feast serve did not answer in 180 s: {log.read_text()[-2000:]}")
                time.sleep(0.5)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _bench_http(raw: dict, repo: Path, batches: dict[int, list[list[str]]]) -> dict[str, Any]:
    """HTTP p50/p99 of get-online-features for the same batches as in-process, over one keep-alive connection."""
    out: dict[str, Any] = {}
    with _feature_server(raw, repo) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Content-Type": "application/json"}

        def ask(batch: list[str]) -> None:
            body = json.dumps({"features": FEATURES, "entities": {"h3_cell": batch}})
            conn.request("POST", "/get-online-features", body, headers)
            resp = conn.getresponse()
            data = json.loads(resp.read())
            assert resp.status == 200 and data["results"][1]["values"][0] is not None, data

        for size, reqs in batches.items():
            out[f"http_{size}"] = latencies(ask, reqs, warmup=20)
        conn.close()
    return out


STORES_ENV = "LOC2VEC_BENCH_STORES"


def run(project: Project, *, region: str | None = None, n: int | None = None, stores: str | None = None) -> dict:
    """Materialization and online latency of the project's published data on each store (`stores`, else
    $LOC2VEC_BENCH_STORES, else sqlite,postgres,redis), one after the other in this one run."""
    from loc2vec.serving.publish import PublishError

    path = project.paths.offline_store  # a file, or (partitioned, serving/offline.py) a link to a directory
    if not path.exists():
        raise PublishError(f"no published offline data at {path}: run `loc2vec embed` and `loc2vec publish` first")
    full = table = pq.read_table(path)
    if region:
        table = table.filter(pc.equal(table.column("region"), region))
        if table.num_rows == 0:
            raise PublishError(f"region {region!r} is not in {path}")
    n = n or 500
    kinds = [k.strip() for k in (stores or os.environ.get(STORES_ENV) or "sqlite,postgres,redis").split(",")]
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {
        "region": region or "all",
        "offline_rows": table.num_rows,
        "model_versions": sorted(set(table.column("model_version").to_pylist())),
    }
    for kind in kinds:
        result[kind] = _bench_store(_settings(project, kind), full, table, n, rng)
    return result


if __name__ == "__main__":
    import json

    from loc2vec.cli.project import Project as _Project

    print(json.dumps(run(_Project.load()), indent=1))
