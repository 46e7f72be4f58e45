"""Fault injection with real components: ingest, embed and publish killed with SIGKILL at chosen points.

Each killed command is a real `loc2vec` process (tests/fixtures/kill_at.py wraps one function so that its
Nth call kills the process: nothing below it gets to clean up, exactly like `kill -9`). While it runs,
and after it died, this test process plays a consumer that starts afresh each time (a new FeatureStore that
reads the registry file as it is now) and asks the online store, through the consumers' API
(`get_location_embeddings`) and a consumer feature service (`transport_mode_v1`), for cells of another
region, already published: every answer must come, and be the published values. After each kill, the
previous data must be intact (the import's metadata and rows; the embeddings file's bytes; the online
values), and the same command, re-run, must complete.

Regions: `test_mc` (the session's Monaco cut) is the consumers' region, embedded with model v1 and
published once. `fault_li` is the one the faults hit: imported from the southern half of the Vaduz test
extract, then the whole of it, alternately (each killed ingest tries the other extract), then embedded and
published. (The two do not overlap, so a cell's newest row is always its own region's.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from psycopg2 import sql

from .conftest import REPO, TEST_BBOX, cut_pbf
from .fixtures.project import clear_published, embed, ingest_region, load_project, publish, store_settings
from .fixtures.registry import register_encoder
from .fixtures.trained import patched_params

MODEL = "loc2vec-encoder-faults-test"
RESOLUTION = 9  # ~175 m cells: ~200 in the test region, so every command takes seconds
FAULT = "fault_li"
SERVICE = "transport_mode_v1"
KILLED = -9


# ---------------------------------------------------------------- the consumer


@dataclass
class Probe:
    """Cells of the consumers' region and the values the online store published for them."""

    lats: np.ndarray
    lons: np.ndarray
    cells: list[str]
    expected: list[list[float]]

    def answer(self) -> None:
        """A consumer started now: a fresh FeatureStore, the lookup API and a feature service."""
        from loc2vec.serving.lookup import get_location_embeddings
        from loc2vec.serving.store import feature_store, forget_stores

        forget_stores()
        settings = store_settings("sqlite")
        got = get_location_embeddings(self.lats, self.lons, settings)
        assert got["h3_cell"].tolist() == self.cells
        assert got["embedding"].tolist() == self.expected, "the consumers' region changed"
        store = feature_store(settings)
        service = store.get_feature_service(SERVICE)
        rows = store.get_online_features(features=service, entity_rows=[{"h3_cell": c} for c in self.cells]).to_dict()
        assert all(e is not None for e in rows["embedding"]) and all(h is not None for h in rows["histogram"])


def run_killed(args: list[str], target: str, mode: str, n: int, probe: Probe, log: Path) -> tuple[int, int]:
    """Run `loc2vec ARGS` killed at TARGET (kill_at.py) while the consumer asks; returns (exit status, answers)."""
    cmd = [sys.executable, "-m", "tests.fixtures.kill_at", target, mode, str(n), "--", *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        answers = 0
        try:
            while proc.poll() is None:
                probe.answer()  # throughout: every answer must come
                answers += 1
                time.sleep(0.1)
        finally:
            if proc.poll() is None:  # a consumer failed: do not leave the command running
                proc.kill()
                proc.wait()
    probe.answer()  # and after the kill
    return proc.returncode, answers + 1


def run_cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "loc2vec.cli", *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ---------------------------------------------------------------- set-up


@pytest.fixture(scope="module")
def south_pbf(tmp_path_factory: pytest.TempPathFactory, small_pbf: Path) -> Path:
    west, south, east, north = TEST_BBOX
    out = tmp_path_factory.mktemp("osm-faults") / "vaduz_south.osm.pbf"
    return cut_pbf(small_pbf, (west, south, east, (south + north) / 2), out)


@pytest.fixture(scope="module")
def world(project: Path, coast_region: str, small_pbf: Path, south_pbf: Path) -> Iterator[dict]:
    """v1 as champion; the consumers' region embedded and published; the fault region imported (south)."""
    from loc2vec.serving.store import forget_stores
    from loc2vec.training.model import Encoder

    overrides = {"embed": {"h3_resolution": RESOLUTION, "batch_size": 64}, "train": {"registered_model": MODEL}}
    with patched_params(project, overrides):
        for sub in ("feast", "embeddings"):
            shutil.rmtree(project / "data" / sub, ignore_errors=True)
        forget_stores()
        torch.manual_seed(1)
        register_encoder(Encoder().eval(), MODEL, "loc2vec-faults-test")
        region = coast_region
        table = pq.read_table(embed(region))
        publish([region], kind="sqlite")
        idx = np.linspace(0, table.num_rows - 1, 12).astype(int)
        lats = np.asarray(table.column("lat").to_numpy())[idx]
        lons = np.asarray(table.column("lon").to_numpy())[idx]
        cells = [table.column("h3_cell")[int(i)].as_py() for i in idx]
        from loc2vec.serving.lookup import get_location_embeddings

        expected = get_location_embeddings(lats, lons, store_settings("sqlite"))["embedding"].tolist()
        ingest_region(FAULT, south_pbf, force=True)
        yield {
            "probe": Probe(lats, lons, cells, expected),
            "extracts": {"old": south_pbf, "new": small_pbf},
            "region": region,
        }
        forget_stores()
        # leave no published data behind: another module's model would reuse these version numbers
        clear_published(project)


# ---------------------------------------------------------------- ingest


def _import_state(region: str) -> tuple:
    from loc2vec.osm.db import cursor, get_import

    info = load_project().info
    record = get_import(region, info)
    with cursor(info) as cur:
        counts = []
        for table in ("planet_osm_point", "planet_osm_line", "planet_osm_polygon", "land_polygons"):
            cur.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(region), sql.Identifier(table)))
            counts.append(cur.fetchone()[0])
    return record.sha256, record.imported_at, tuple(counts)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(cmdline)
    return found


INGEST_POINTS = [
    # osm2pgsql (the second subprocess.run of an ingest; the first is osmium) killed 0.3 s into its import
    ("subprocess:run", "during:0.3", 2),
    ("loc2vec.osm.ingest:build_land_water", "after", 1),  # imported and coast built in staging, not swapped
    ("loc2vec.osm.ingest:rename_owned_schema", "after", 1),  # inside the swap's transaction, uncommitted
    ("loc2vec.osm.ingest:register_adhoc_region", "after", 1),  # registry written, the import not committed
]


@pytest.mark.parametrize(
    ("target", "mode", "n"), INGEST_POINTS, ids=[f"{t.split(':')[1]}-{m}" for t, m, _ in INGEST_POINTS]
)
def test_killed_ingest_keeps_the_previous_import(world: dict, tmp_path: Path, target: str, mode: str, n: int) -> None:
    from loc2vec.osm.extracts import sha256_file

    old, new = world["extracts"]["old"], world["extracts"]["new"]
    before = _import_state(FAULT)
    assert before[0] == sha256_file(old)
    args = ["ingest", "--region", FAULT, "--pbf", str(new), "--force"]
    status, answers = run_killed(args, target, mode, n, world["probe"], tmp_path / "ingest.log")
    assert status == KILLED, (tmp_path / "ingest.log").read_text()[-3000:]
    assert answers >= 1
    print(f"FAULT-RESULT ingest {target} {mode} {n}: killed; consumers answered {answers} times")
    assert _import_state(FAULT) == before, "the previous import is intact"
    deadline = time.monotonic() + 30  # osm2pgsql got SIGKILL with its parent (PR_SET_PDEATHSIG)
    while _processes_mentioning(f"{FAULT}__staging") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_mentioning(f"{FAULT}__staging"), "no osm2pgsql left writing into the staging schema"

    proc = run_cli(*args)  # the re-run completes: the new extract is imported and registered
    assert proc.stdout.startswith("imported ")
    after = _import_state(FAULT)
    assert after[0] == sha256_file(new) and after[2] != before[2]
    assert load_project().params.regions.registry[FAULT].sha256 == sha256_file(new)
    from loc2vec.osm.db import cursor

    with cursor(load_project().info) as cur:
        cur.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (f"{FAULT}__staging",))
        assert cur.fetchone()[0] == 0, "the killed run's staging schema was cleaned up"
    world["extracts"] = {"old": new, "new": old}  # the next fault tries the other extract
    world["probe"].answer()


# ---------------------------------------------------------------- embed


EMBED_POINTS = [
    ("loc2vec.raster.metatiles:MetatileIndex.save", "after", 1),  # one metatile rendered and indexed, others not
    # cells encoded (the dense path, embed.method's default: its first metatile), nothing written
    ("loc2vec.embedding.dense:encode_metatile", "after", 1),
    ("pyarrow.parquet:write_table", "after", 1),  # the new Parquet complete beside the old, not swapped in
]


@pytest.fixture(scope="module")
def embed_world(world: dict) -> dict:
    """v2 becomes the champion: each killed embed of the consumers' region would replace v1's file."""
    from loc2vec.training.model import Encoder

    torch.manual_seed(2)
    register_encoder(Encoder().eval(), MODEL, "loc2vec-faults-test")
    return {"reruns": []}


@pytest.mark.parametrize(
    ("target", "mode", "n"), EMBED_POINTS, ids=[f"{t.split(':')[1]}-{m}" for t, m, _ in EMBED_POINTS]
)
def test_killed_embed_keeps_the_previous_embeddings(
    world: dict, embed_world: dict, tmp_path: Path, target: str, mode: str, n: int
) -> None:
    region = world["region"]
    p = load_project()
    out = p.paths.embeddings(region)
    before = out.read_bytes()
    if "MetatileIndex" in target:  # make the embed render its metatiles
        shutil.rmtree(p.paths.metatiles(region), ignore_errors=True)
    args = ["embed", "--region", region]
    status, answers = run_killed(args, target, mode, n, world["probe"], tmp_path / "embed.log")
    assert status == KILLED, (tmp_path / "embed.log").read_text()[-3000:]
    print(f"FAULT-RESULT embed {target} {mode} {n}: killed; consumers answered {answers} times")
    assert out.read_bytes() == before, "the previous embeddings are intact"

    run_cli(*args)
    rerun = out.read_bytes() + out.with_suffix(".json").read_bytes()  # the Parquet and its record (DVC outputs)
    assert out.read_bytes() != before or embed_world["reruns"], "the re-run wrote v2's embeddings"
    assert set(pq.read_table(out).column("model_version").to_pylist()) == {"2"}
    embed_world["reruns"].append(rerun)
    assert len(set(embed_world["reruns"])) == 1, "every re-run after a kill writes the same bytes"
    world["probe"].answer()


# ---------------------------------------------------------------- publish


def _registry_states(project: Path) -> dict[str, str]:
    from feast.feature_view import FeatureViewState
    from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto

    proto = RegistryProto()
    proto.ParseFromString((project / "data" / "feast" / "registry.db").read_bytes())
    return {fv.spec.name: FeatureViewState(fv.meta.state).name for fv in proto.feature_views}


PUBLISH_POINTS = [
    ("loc2vec.serving.offline:write_parquet_atomic", "after", 1),  # a partition file written, nothing applied
    ("feast.infra.registry.file:FileRegistryStore._write_registry", "torn", 1),  # a registry write torn mid-apply
    ("loc2vec.serving.online_write:write_sqlite_view", "after", 1),  # one view of four written
    ("loc2vec.serving.online_write:write_sqlite_view", "before", 3),  # two views of four
    ("loc2vec.serving.publish:_write_state", "before", 1),  # registry swapped in, state not recorded
]


@pytest.fixture(scope="module")
def publish_world(world: dict) -> dict:
    """The fault region embedded (with the champion): what the killed publishes bring."""
    path = embed(FAULT)
    table = pq.read_table(path)
    idx = np.linspace(0, table.num_rows - 1, 8).astype(int)
    return {
        "file": path,
        "lats": np.asarray(table.column("lat").to_numpy())[idx],
        "lons": np.asarray(table.column("lon").to_numpy())[idx],
        "values": [table.column("embedding")[int(i)].as_py() for i in idx],
        "runs": 0,
    }


@pytest.mark.parametrize(
    ("target", "mode", "n"),
    PUBLISH_POINTS,
    ids=[f"{t.split(':')[1].split('.')[-1]}-{m}{n}" for t, m, n in PUBLISH_POINTS],
)
def test_killed_publish_never_takes_consumers_down(
    project: Path, world: dict, publish_world: dict, tmp_path: Path, target: str, mode: str, n: int
) -> None:
    from loc2vec.serving.lookup import get_location_embeddings
    from loc2vec.serving.store import forget_stores

    first = publish_world["runs"] == 0
    args = ["publish", "--online-store", "sqlite", "--embeddings", str(publish_world["file"])]
    killed_args = args if first else [*args, "--force"]  # after the first, only a forced publish does the work
    status, answers = run_killed(killed_args, target, mode, n, world["probe"], tmp_path / "publish.log")
    assert status == KILLED, (tmp_path / "publish.log").read_text()[-3000:]
    assert answers >= 1
    print(f"FAULT-RESULT publish {target} {mode} {n}: killed; consumers answered {answers} times")
    states = _registry_states(project)
    assert states and "MATERIALIZING" not in states.values(), f"the registry consumers read: {states}"

    proc = run_cli(*args)  # the re-run completes, and its stdout is the JSON report alone
    report = json.loads(proc.stdout)
    assert report["online_store"] == "sqlite"
    publish_world["runs"] += 1
    forget_stores()
    got = get_location_embeddings(publish_world["lats"], publish_world["lons"], store_settings("sqlite"))
    np.testing.assert_array_equal(np.array(got["embedding"].tolist(), np.float32), np.array(publish_world["values"]))
    world["probe"].answer()


def test_registry_left_materializing_by_an_older_publish_is_repaired(
    project: Path, world: dict, publish_world: dict
) -> None:
    """A registry with views stuck in MATERIALIZING (what a killed publish of an older loc2vec left): consumers
    fail, and the next `loc2vec publish` — nothing changed otherwise — repairs it."""
    from feast.feature_view import FeatureViewState

    from loc2vec.serving.store import feature_store, forget_stores

    forget_stores()
    store = feature_store(store_settings("sqlite"))
    for fv in store.list_feature_views():
        fv.state = FeatureViewState.MATERIALIZING
        store.registry.apply_feature_view(fv, store.project, commit=True)
    assert set(_registry_states(project).values()) == {"MATERIALIZING"}
    with pytest.raises(Exception, match="MATERIALIZING"):
        world["probe"].answer()
    # Nothing else changed (the fault region's file was published last): only the spot check sees the problem.
    report = json.loads(
        run_cli("publish", "--online-store", "sqlite", "--embeddings", str(publish_world["file"])).stdout
    )
    assert not report["skipped"] and "unreadable" in report["reason"] and "MATERIALIZING" in report["reason"]
    assert "MATERIALIZING" not in _registry_states(project).values()
    world["probe"].answer()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_sqlite_online_store_is_rebuilt_by_publish(
    project: Path, world: dict, publish_world: dict, damage: str
) -> None:
    """The online store is derived state: a damaged one is moved aside and rebuilt from the offline store.

    Only the fault region's file is published (as last time), so the consumers' region must come back with
    the values it had: the killed-embed tests left a v2 file of it in data/embeddings, never published.
    """
    online = project / "data" / "feast" / "online.db"
    data = online.read_bytes()
    online.write_bytes(b"this is not a database" * 100 if damage == "garbage" else data[: len(data) // 3])
    with pytest.raises(Exception, match="not a database|malformed|no such table"):
        world["probe"].answer()  # consumers are down: the damage is real
    only_fault = ["--embeddings", str(publish_world["file"])]
    report = json.loads(run_cli("publish", "--online-store", "sqlite", *only_fault).stdout)
    assert not report["skipped"] and "unreadable" in report["reason"]
    assert report["materialized"]["mode"] == "full"
    assert (project / "data" / "feast" / "online.db.corrupt").is_file(), "the damaged file is kept aside"
    world["probe"].answer()
    assert json.loads(run_cli("publish", "--online-store", "sqlite", "--force", *only_fault).stdout)["applied"]
    world["probe"].answer()


def test_publish_record_depends_only_on_what_is_served(tmp_path: Path, publish_world: dict) -> None:
    """The publish stage's DVC output is the same whether the run materialized or found everything in place."""
    args = ["publish", "--online-store", "sqlite", "--embeddings", str(publish_world["file"])]
    forced = json.loads(run_cli(*args, "--force", "--record", str(tmp_path / "forced.json")).stdout)
    skipped = json.loads(run_cli(*args, "--record", str(tmp_path / "skipped.json")).stdout)
    assert not forced["skipped"] and skipped["skipped"]
    assert (tmp_path / "forced.json").read_bytes() == (tmp_path / "skipped.json").read_bytes()
    record = json.loads((tmp_path / "forced.json").read_text())
    assert record["regions"] == [FAULT] and record["partitions"]
    assert not {"seconds", "apply_s", "materialized", "feast_dir", "offline_path"} & set(record)
