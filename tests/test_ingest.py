"""Ingest against the real PostGIS server: metadata, idempotence, atomic failure, name validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from psycopg2 import sql

from loc2vec.cli.project import Project
from loc2vec.core.config import RegionSpec
from loc2vec.core.errors import ConfigError
from loc2vec.osm.db import ConnInfo, cursor, get_import
from loc2vec.osm.extracts import IngestError, fetch_extract, sha256_file
from loc2vec.osm.ownership import SchemaNotOwnedError

from .fixtures.project import ingest_region


def _row_counts(region: str, info: ConnInfo) -> dict[str, int]:
    counts = {}
    with cursor(info) as cur:
        for table in ("planet_osm_point", "planet_osm_line", "planet_osm_polygon"):
            cur.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(region), sql.Identifier(table)))
            counts[table] = cur.fetchone()[0]
    return counts


def test_import_records_metadata(region: str, small_pbf: Path, proj: Project) -> None:
    record = get_import(region, proj.info)
    assert record is not None
    assert record.sha256 == sha256_file(small_pbf)
    assert record.osm_timestamp is not None and record.osm_timestamp.year == 2021
    assert record.imported_at.tzinfo is not None
    assert record.contains(47.1410, 9.5209)  # Vaduz centre
    counts = _row_counts(region, proj.info)
    assert counts["planet_osm_polygon"] > 1000 and counts["planet_osm_line"] > 500


def test_reingest_unchanged_does_nothing(region: str, small_pbf: Path, proj: Project) -> None:
    before = get_import(region, proj.info)
    result = ingest_region(region, small_pbf, project=proj)
    assert result.changed is False
    assert "up to date" in result.message
    assert get_import(region, proj.info).imported_at == before.imported_at


def test_corrupt_pbf_leaves_previous_import_intact(region: str, corrupt_pbf: Path, proj: Project) -> None:
    before, counts = get_import(region, proj.info), _row_counts(region, proj.info)
    with pytest.raises(IngestError, match="not a readable OSM extract|osm2pgsql failed"):
        ingest_region(region, corrupt_pbf, project=proj)
    assert get_import(region, proj.info) == before
    assert _row_counts(region, proj.info) == counts
    with cursor(proj.info) as cur:
        cur.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE %s", (f"{region}\\_\\_staging",))
        assert cur.fetchone()[0] == 0, "the staging schema must be cleaned up"


def test_corrupt_pbf_cli_exits_nonzero_with_message(region: str, corrupt_pbf: Path, proj: Project) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loc2vec.cli", "ingest", "--region", region, "--pbf", str(corrupt_pbf)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "not a readable OSM extract" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert get_import(region, proj.info) is not None


@pytest.mark.parametrize("name", ["Vaduz", "1abc", "a-b", "a b", "x;drop", "public", "pg_x", "a__staging", ""])
def test_invalid_region_names_are_rejected(small_pbf: Path, proj: Project, name: str) -> None:
    with pytest.raises(ConfigError, match="invalid region name"):
        ingest_region(name, small_pbf, project=proj)


def test_reserved_schemas_are_rejected(small_pbf: Path, proj: Project) -> None:
    """The schemas params.yaml gives to the import metadata and the Feast tables are not region names."""
    for name in proj.params.reserved_schemas:
        with pytest.raises(ConfigError, match="invalid region name"):
            ingest_region(name, small_pbf, project=proj)


def test_checksum_mismatch_is_a_clear_error(small_pbf: Path, proj: Project) -> None:
    spec = RegionSpec(name="x", source=str(small_pbf), sha256="0" * 64)
    with pytest.raises(IngestError, match="checksum mismatch"):
        fetch_extract(spec, proj.paths.root, proj.paths.download_dir)


def test_unknown_region_without_pbf(proj: Project) -> None:
    with pytest.raises(IngestError, match="unknown region 'atlantis'.*--pbf"):
        ingest_region("atlantis", project=proj)


def test_url_source_requires_checksum(proj: Project) -> None:
    spec = RegionSpec(name="x", source="https://example.invalid/x.osm.pbf", sha256=None)
    with pytest.raises(IngestError, match="without a sha256"):
        fetch_extract(spec, proj.paths.root, proj.paths.download_dir)


# ---------------------------------------------------------------- ownership: only loc2vec's schemas are dropped


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loc2vec.cli", *args], capture_output=True, text=True, env=env)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The CLI's error: exit 2, one `loc2vec …: error: …` line on stderr (log lines aside), no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _sentinel(info: ConnInfo, schema: str) -> None:
    """Someone else's schema: a table with a row."""
    with cursor(info) as cur:
        cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {}.keep (v text)").format(sql.Identifier(schema)))
        cur.execute(sql.SQL("INSERT INTO {}.keep VALUES ('mine')").format(sql.Identifier(schema)))


def _sentinel_rows(info: ConnInfo, schema: str) -> list:
    with cursor(info) as cur:
        cur.execute(sql.SQL("SELECT v FROM {}.keep").format(sql.Identifier(schema)))
        return cur.fetchall()


def _drop(info: ConnInfo, schema: str) -> None:
    with cursor(info) as cur:
        cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def test_ingest_feast_is_refused_and_the_online_store_survives(small_pbf: Path, proj: Project) -> None:
    """`publish.postgres_schema` (the PostgreSQL online store) is reserved: refused by name, the schema kept."""
    schema = proj.params.publish.postgres_schema
    _sentinel(proj.info, schema)
    before = _sentinel_rows(proj.info, schema)
    line = _one_line_error(_cli("ingest", "--region", schema, "--pbf", str(small_pbf)))
    assert f"invalid region name {schema!r}: reserved" in line
    assert _sentinel_rows(proj.info, schema) == before


@pytest.mark.parametrize("name", ["someapp", "test_li_south"])
def test_ingest_refuses_a_schema_loc2vec_did_not_create(small_pbf: Path, proj: Project, name: str) -> None:
    """Any other schema of that name (a user's, an application's) is refused before anything is imported,
    even where an import of that name is on record (test_li_south: test_publish imports it) but the schema
    now there is not the one loc2vec created."""
    _drop(proj.info, name + "__staging")
    _drop(proj.info, name)
    _sentinel(proj.info, name)
    try:
        before, record = _sentinel_rows(proj.info, name), get_import(name, proj.info)
        line = _one_line_error(_cli("ingest", "--region", name, "--pbf", str(small_pbf)))
        assert f"schema {name!r}" in line and "was not created by loc2vec" in line
        assert _sentinel_rows(proj.info, name) == before, "the schema and its data survive"
        assert get_import(name, proj.info) == record
        with cursor(proj.info) as cur:
            cur.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (name + "__staging",))
            assert cur.fetchone()[0] == 0, "nothing was imported"
    finally:
        _drop(proj.info, name)


def test_a_schema_recreated_under_an_imported_name_is_not_loc2vecs(small_pbf: Path, proj: Project) -> None:
    """Ownership is the schema's identity (its oid), not its name: dropped and re-created by someone else,
    a region's schema is refused even though an import of that name is recorded."""
    region = "test_owned"
    ingest_region(region, small_pbf, project=proj)
    _drop(proj.info, region)
    _sentinel(proj.info, region)
    with cursor(proj.info) as cur:  # as if the recreated schema held an import's tables (adoption must not apply)
        cur.execute(
            sql.SQL("CREATE FUNCTION {}.f() RETURNS int LANGUAGE sql AS 'SELECT 1'").format(sql.Identifier(region))
        )
    try:
        with pytest.raises(SchemaNotOwnedError, match="was not created by loc2vec"):
            ingest_region(region, small_pbf, project=proj, force=True)
        assert _sentinel_rows(proj.info, region) == [("mine",)]
    finally:
        _drop(proj.info, region)


def test_an_import_made_before_ownership_markers_is_adopted(region: str, small_pbf: Path, proj: Project) -> None:
    """An import of an older loc2vec (no marker; only osm2pgsql's and ingest's tables) is recognised."""
    from loc2vec.osm.ownership import OWNED_TABLE

    meta = sql.Identifier(proj.info.meta_schema)
    with cursor(proj.info) as cur:
        cur.execute(sql.SQL("DELETE FROM {}.{} WHERE name = %s").format(meta, sql.Identifier(OWNED_TABLE)), (region,))
    result = ingest_region(region, small_pbf, project=proj, force=True)
    assert result.changed
    with cursor(proj.info) as cur:
        cur.execute(
            sql.SQL(
                "SELECT n.oid = o.schema_id FROM {}.{} o JOIN pg_namespace n ON n.nspname = o.name WHERE o.name = %s"
            ).format(meta, sql.Identifier(OWNED_TABLE)),
            (region,),
        )
        assert cur.fetchone() == (True,), "the new import is marked as loc2vec's"


# ---------------------------------------------------------------- one ingest per region; registration with the import


def test_two_concurrent_ingests_of_a_region_one_waits(small_pbf: Path, proj: Project) -> None:
    """The second waits on the region's lock, then finds the import up to date (no osm2pgsql clash)."""
    region = "test_concurrent"
    _drop(proj.info, region)
    cmd = [sys.executable, "-m", "loc2vec.cli", "ingest", "--region", region, "--pbf", str(small_pbf)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    messages = sorted(o[0].strip().splitlines()[-1] for o in outs)
    assert messages[0].startswith("imported ") and "up to date" in messages[1], messages
    assert any("waiting for it" in o[1] for o in outs), "one of them waited for the other's lock"
    with cursor(proj.info) as cur:
        cur.execute(sql.SQL("SELECT count(*) FROM {}.planet_osm_point").format(sql.Identifier(region)))
        assert cur.fetchone()[0] > 0
    from loc2vec.osm.ownership import drop_owned_schema

    with cursor(proj.info) as cur:
        drop_owned_schema(cur, proj.info.meta_schema, region, "test")


def test_an_unwritable_region_registry_rolls_the_import_back(project: Path, small_pbf: Path, proj: Project) -> None:
    """data/ read-only (here: the ad-hoc registry's directory cannot be created): ingest fails with one line
    naming the file, nothing is imported (so the next ingest is not "up to date" for an unknown region),
    and once the registry is writable the same command imports and registers the region."""
    from .fixtures.project import load_project
    from .fixtures.trained import patched_params

    region = "test_unregistered"
    _drop(proj.info, region)
    unwritable = "/proc/loc2vec-read-only/regions.yaml"
    with patched_params(project, {"regions": {"adhoc_registry": unwritable}}):
        line = _one_line_error(_cli("ingest", "--region", region, "--pbf", str(small_pbf)))
        assert unwritable in line and "rolled back" in line
        assert get_import(region, proj.info) is None
        with cursor(proj.info) as cur:
            cur.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE %s", (f"{region}%",))
            assert cur.fetchone()[0] == 0, "neither the region nor its staging schema exists"
    proc = _cli("ingest", "--region", region, "--pbf", str(small_pbf))
    assert proc.returncode == 0 and proc.stdout.startswith("imported "), proc.stderr
    assert region in load_project().params.regions.registry
    assert get_import(region, proj.info).sha256 == sha256_file(small_pbf)
    from loc2vec.osm.ownership import drop_owned_schema

    with cursor(proj.info) as cur:
        drop_owned_schema(cur, proj.info.meta_schema, region, "test")
