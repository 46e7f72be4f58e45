"""The PostgreSQL store's registry in the project database (Feast's SQL registry), against the real PostgreSQL.

A second host needs only the client configuration: these tests look a cell up from another directory whose
project has no data/feast at all, as the read-only role, and get the publisher's vector bit for bit. They
check the read-only role's privileges on the registry schema and that a publish killed mid-materialization,
or inside the registry swap's transaction, leaves consumers reading the registry as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from .conftest import REPO, VADUZ
from .fixtures.project import clear_published, embed, load_project, publish, store_settings
from .fixtures.registry import register_untrained
from .fixtures.trained import patched_params
from .test_consumers import BLOCKING_RUNNER, PIPELINE_ONLY

MODEL = "loc2vec-encoder-sqlregistry-test"
RESOLUTION = 9
REGISTRY_SCHEMA = "feast_registry"


def _register(seed: int) -> str:
    return register_untrained(seed, MODEL, "loc2vec-sqlregistry-test")


@pytest.fixture(scope="module")
def pg(project: Path, region: str) -> Iterator[dict]:
    """Test params (coarse H3, own model name), the postgres store, empty Feast schemas, v1 embedded."""
    from loc2vec.osm.db import cursor
    from loc2vec.serving.store import forget_stores

    overrides = {
        "embed": {"h3_resolution": RESOLUTION, "batch_size": 64},
        "train": {"registered_model": MODEL},
        "publish": {"online_store": "postgres", "retain_versions": 2},
    }
    with patched_params(project, overrides):
        clear_published(project)
        with cursor(load_project().info) as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS feast CASCADE; DROP SCHEMA IF EXISTS {REGISTRY_SCHEMA} CASCADE")
        forget_stores()
        v1 = _register(1)
        embed(region)
        yield {"region": region, "v1": v1}
        forget_stores()
        clear_published(project)
        with cursor(load_project().info) as cur:  # another module's model would reuse these version numbers
            cur.execute(f"DROP SCHEMA IF EXISTS feast CASCADE; DROP SCHEMA IF EXISTS {REGISTRY_SCHEMA} CASCADE")


def _client_dir(tmp_path: Path, project: Path) -> tuple[Path, dict[str, str]]:
    """Another project directory: its params.yaml (the same database) and feature_store.postgres.yaml only."""
    client = tmp_path / "client"
    (client / "feature_repo").mkdir(parents=True)
    shutil.copy(REPO / "feature_repo" / "feature_store.postgres.yaml", client / "feature_repo")
    shutil.copy(project / "params.yaml", client / "params.yaml")
    (client / "client.py").write_text(f"BLOCKED = {PIPELINE_ONLY!r}\n" + BLOCKING_RUNNER)
    env = {
        **os.environ,
        "LOC2VEC_PARAMS": str(client / "params.yaml"),
        "LOC2VEC_FEATURE_REPO": str(client / "feature_repo"),
    }
    return client, env


def _client(client: Path, env: dict[str, str], *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(client / "client.py"), *args], cwd=client, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _registry_rows() -> dict[str, list]:
    from loc2vec.osm.db import cursor

    with cursor(load_project().info) as cur:
        out = {}
        for table, col in (("feature_views", "feature_view_name"), ("feature_services", "feature_service_name")):
            cur.execute(
                f"SELECT {col}, md5(encode({table[:-1]}_proto, 'hex')) FROM {REGISTRY_SCHEMA}.{table} ORDER BY 1"
            )
            out[table] = cur.fetchall()
        return out


def test_second_host_reads_the_sql_registry(pg: dict, project: Path, tmp_path: Path) -> None:
    """Published with the SQL registry (no registry file), looked up from another directory holding only
    the client configuration, as the read-only role, without the pipeline's packages: the same vector."""
    report = publish(project=load_project())
    assert report["online_store"] == "postgres" and report["applied"]
    assert not list((project / "data" / "feast").glob("registry*")), "no registry file: it is in the database"
    views = [name for name, _ in _registry_rows()["feature_views"]]
    assert f"location_embedding_v{pg['v1']}" in views and "location_embedding" in views

    client, env = _client_dir(tmp_path, project)
    lat, lon = (str(v) for v in VADUZ)
    got = _client(client, env, "features", "--lat", lat, "--lon", lon, "--version", pg["v1"])
    assert not (client / "data" / "feast").exists() or not list((client / "data" / "feast").iterdir())
    assert got["model_version"] == pg["v1"]

    offline = pd.read_parquet(project / "data" / "embeddings" / f"{pg['region']}.parquet").set_index("h3_cell")
    want = np.asarray(offline.loc[got["h3_cell"], "embedding"], np.float32)
    np.testing.assert_array_equal(np.asarray(got["embedding"], np.float32), want)
    services = {s["name"]: s["model_version"] for s in _client(client, env, "services", "--json")}
    assert services["latest"] is None and services[f"transport_mode_v{pg['v1']}"] == pg["v1"]


def test_reader_may_read_the_registry_and_nothing_more(pg: dict) -> None:
    """The read-only role: USAGE on the registry schema and SELECT on its tables; no CREATE, INSERT, UPDATE,
    DELETE; the pipeline role owns them."""
    from loc2vec.osm.db import cursor

    p = load_project()
    reader = p.reader.user
    with cursor(p.info) as cur:
        cur.execute(
            "SELECT has_schema_privilege(%s, %s, 'USAGE'), has_schema_privilege(%s, %s, 'CREATE'), "
            "pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = %s",
            (reader, REGISTRY_SCHEMA, reader, REGISTRY_SCHEMA, REGISTRY_SCHEMA),
        )
        assert cur.fetchone() == (True, False, p.info.user)
        cur.execute(
            "SELECT tablename, tableowner, has_table_privilege(%s, schemaname || '.' || tablename, 'SELECT'), "
            "has_table_privilege(%s, schemaname || '.' || tablename, 'INSERT,UPDATE,DELETE,TRUNCATE') "
            "FROM pg_tables WHERE schemaname = %s",
            (reader, reader, REGISTRY_SCHEMA),
        )
        rows = cur.fetchall()
    assert {"feature_views", "feature_services", "entities", "projects"} <= {r[0] for r in rows}
    assert all(owner == p.info.user and select and not write for _, owner, select, write in rows), rows
    with pytest.raises(Exception, match="read-only transaction|permission denied"), cursor(p.reader) as cur:
        cur.execute(f"DELETE FROM {REGISTRY_SCHEMA}.feature_views")


def _killed_publish(target: str, mode: str) -> None:
    killed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fixtures.kill_at",
            target,
            mode,
            "1",
            "--",
            "publish",
            "--online-store",
            "postgres",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]


def test_killed_publish_leaves_the_sql_registry_as_it_was(pg: dict, project: Path, tmp_path: Path) -> None:
    """A new champion's publish killed after materializing (before the swap), then one killed inside the swap's
    transaction: the registry rows are unchanged, consumers still see only v1 (no view MATERIALIZING), and
    the next publish serves v1 and v2."""
    from loc2vec.serving.catalog import served_versions
    from loc2vec.serving.store import feature_store, forget_stores

    before = _registry_rows()
    v2 = _register(2)
    embed(pg["region"])
    client, env = _client_dir(tmp_path, project)
    lat, lon = (str(v) for v in VADUZ)
    pinned = _client(client, env, "features", "--lat", lat, "--lon", lon, "--version", pg["v1"])

    for target, mode in (
        ("loc2vec.serving.publish:_check_written", "after"),  # written online, staged registry not swapped in
        ("loc2vec.serving.sql_registry:_name_project", "after"),  # inside the transaction, rows deleted
    ):
        _killed_publish(target, mode)
        assert _registry_rows() == before, f"killed at {target}: the registry changed"
        forget_stores()
        assert served_versions(feature_store(store_settings())) == [pg["v1"]]
        assert _client(client, env, "features", "--lat", lat, "--lon", lon, "--version", pg["v1"]) == pinned

    report = publish(project=load_project())
    assert report["served_versions"] == [pg["v1"], v2]
    forget_stores()
    assert served_versions(feature_store(store_settings())) == [pg["v1"], v2]
    assert _client(client, env, "features", "--lat", lat, "--lon", lon, "--version", pg["v1"]) == pinned
    latest = _client(client, env, "features", "--lat", lat, "--lon", lon)
    assert latest["model_version"] == v2
    assert publish(project=load_project())["skipped"], "idempotent with the SQL registry"
    assert (
        yaml.safe_load((REPO / "feature_repo" / "feature_store.postgres.yaml").read_text())["registry"]["registry_type"]
        == "sql"
    )
