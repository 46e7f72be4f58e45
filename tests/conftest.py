"""Shared fixtures: a real PostGIS test database and small bbox cuts of the real Liechtenstein and Monaco extracts.

Tests run against the project's PostgreSQL cluster (started by `make setup`) but in their
own database, with their own params.yaml copy in a temporary project root, so nothing a
developer has ingested or rendered is touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from loc2vec.core.config import ComputeConfig
from loc2vec.core.numerics import pin_cpu_numerics

# The CPU numerics every `loc2vec` command runs with (params compute:, defaults), set before torch or numpy
# is imported: tests compare what they compute in-process with what CLI subprocesses compute.
pin_cpu_numerics(ComputeConfig())

REPO = Path(__file__).resolve().parents[1]
# Several suites can run side by side on one machine, each in its own database (e.g. LOC2VEC_TEST_DB=loc2vec_test2);
# so do pytest-xdist's workers (`make test` runs two): each gets its own database, roles and project root.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
TEST_DB = os.environ.get("LOC2VEC_TEST_DB", "loc2vec_test") + (f"_{XDIST_WORKER}" if XDIST_WORKER else "")
# Vaduz centre, Schaan and its railway station, and the Rhine on the Swiss border.
TEST_BBOX = (9.485, 47.125, 9.545, 47.180)  # west, south, east, north
TEST_REGION = "test_li"
VADUZ = (47.1410, 9.5209)
# Monaco: Fontvieille, the Rock, Port Hercule, Monte-Carlo and the sea to the south-east (coastline).
MONACO_BBOX = (7.410, 43.722, 7.445, 43.750)
MONACO_REGION = "test_mc"
MONACO_INLAND_BBOX = (7.400, 43.752, 7.425, 43.768)  # the hills above Monaco, in France: no coastline


def _shared_pbf(name: str) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    src = Path(params["regions"]["registry"][name]["source"])
    return src if src.is_absolute() else (REPO / src).resolve()


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A temporary project root with its own params.yaml (absolute extract paths) and test database.

    Like the command line, tests load the configuration at the edge: `load_project()` (after any
    `patched_params`) gives the params, paths and database to pass to library code.
    """
    from loc2vec.core.config import load_params
    from loc2vec.osm import cluster

    root = tmp_path_factory.mktemp("project")
    # What xdist workers share (the trained encoder fixture): the session's base temp, above the workers' own.
    base = tmp_path_factory.getbasetemp()
    os.environ["LOC2VEC_TEST_SHARED_DIR"] = str(base.parent if XDIST_WORKER else base)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for spec in params["regions"]["registry"].values():
        if not spec["source"].startswith(("http://", "https://")):
            spec["source"] = str((REPO / spec["source"]).resolve())
    # The suite's own roles (owner and read-only, like the project's, never the project's own: setting up
    # roles resets their passwords) and password file, in the test project.
    params["db"].update(
        user=f"{TEST_DB}_owner", reader=f"{TEST_DB}_reader", passfile=str(root / "pgpass"), dbname=TEST_DB
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "loc2vec").mkdir()  # marks the directory as a project root

    old = {k: os.environ.get(k) for k in ("LOC2VEC_PARAMS", "LOC2VEC_PG_DSN", "PGPASSFILE")}
    os.environ.pop("PGPASSFILE", None)
    os.environ["LOC2VEC_PARAMS"] = str(root / "params.yaml")
    db = load_params().db
    cluster.start_cluster(db)
    if cluster.database_owner(db, TEST_DB) not in (None, db.user):  # an older suite's (a superuser's): start afresh
        cluster.drop_database(db, TEST_DB)
    cluster.setup_cluster(db)
    os.environ["LOC2VEC_PG_DSN"] = f"host={db.host} port={db.port} dbname={TEST_DB} user={db.user}"
    yield root
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def cut_pbf(src: Path, bbox: tuple[float, float, float, float], out: Path, strategy: str = "complete_ways") -> Path:
    """A bbox cut of an extract with osmium (header bbox = the cut, as Geofabrik's extracts have)."""
    subprocess.run(
        [
            "osmium",
            "extract",
            "-b",
            ",".join(str(v) for v in bbox),
            "--set-bounds",
            "-s",
            strategy,
            "-o",
            str(out),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def small_pbf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bbox cut (Vaduz–Schaan–Rhine) of the real Liechtenstein extract, made with osmium."""
    out = tmp_path_factory.mktemp("osm") / "vaduz_schaan.osm.pbf"
    return cut_pbf(_shared_pbf("liechtenstein"), TEST_BBOX, out)


@pytest.fixture(scope="session")
def monaco_pbf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bbox cut of the real Monaco extract with coastline and open sea in it (complete ways: the
    coastline runs out of the cut on both sides)."""
    return cut_pbf(_shared_pbf("monaco"), MONACO_BBOX, tmp_path_factory.mktemp("osm") / "monaco_coast.osm.pbf")


@pytest.fixture(scope="session")
def coast_region(project: Path, monaco_pbf: Path) -> str:
    """The Monaco cut, ingested into the test database (once per session)."""
    from tests.fixtures.project import ingest_region

    ingest_region(MONACO_REGION, monaco_pbf)
    return MONACO_REGION


@pytest.fixture(scope="session")
def region(project: Path, small_pbf: Path) -> str:
    """The test region, ingested into the test database (once per session)."""
    from tests.fixtures.project import ingest_region

    ingest_region(TEST_REGION, small_pbf)
    return TEST_REGION


@pytest.fixture()
def proj(project: Path):
    """The test project as the command line loads it: params, paths and database (fresh for each test)."""
    from tests.fixtures.project import load_project

    return load_project()


@pytest.fixture()
def corrupt_pbf(tmp_path: Path, small_pbf: Path) -> Path:
    """The small extract truncated to half its size."""
    data = small_pbf.read_bytes()
    out = tmp_path / "truncated.osm.pbf"
    out.write_bytes(data[: len(data) // 2])
    return out


def copy_pbf(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst
