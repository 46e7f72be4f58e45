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
