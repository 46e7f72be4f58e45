"""OSM extracts → PostGIS: import atomically with osm2pgsql.

A region lives in its own PostgreSQL schema. An import goes to a staging schema first
(osm2pgsql, then the land and water polygons built from the extract's coastline, osm/coast.py)
and is swapped in within one transaction, so a corrupt or truncated extract, or a failed
coastline step, can never destroy the previous import; the metadata table records what was
imported, when, and with which import format (an import of an older format is re-imported
even when its extract is unchanged: it lacks tables the stages read).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import yaml
from psycopg2 import sql

from loc2vec.core.atomic import write_text
from loc2vec.core.config import IngestConfig, RegionsConfig, read_yaml
from loc2vec.core.names import check_region_name
from loc2vec.core.paths import ProjectPaths
from loc2vec.osm.coast import LAND_TABLE, WATER_TABLE, build_land_water
from loc2vec.osm.db import IMPORT_FORMAT, ConnInfo, cursor, ensure_meta, get_import
from loc2vec.osm.extracts import ExtractInfo, IngestError, fetch_extract, inspect_extract, sha256_file

log = logging.getLogger(__name__)
STAGING_SUFFIX = "__staging"
PLANET_TABLES = ("planet_osm_point", "planet_osm_line", "planet_osm_polygon", "planet_osm_roads")
TABLES = (*PLANET_TABLES, LAND_TABLE, WATER_TABLE)  # what an import of IMPORT_FORMAT holds


@dataclass(frozen=True)
class IngestResult:
    region: str
    changed: bool
    sha256: str
    seconds: float
    message: str


def register_adhoc_region(name: str, pbf: Path, sha256: str, registry_file: Path) -> None:
    """Remember a region brought with --pbf, so later commands know its source."""
    registry_file.parent.mkdir(parents=True, exist_ok=True)
    data = (read_yaml(registry_file) if registry_file.is_file() else {}) or {}
    data[name] = {"source": str(pbf.resolve()), "sha256": sha256}
    write_text(registry_file, yaml.safe_dump(data, sort_keys=True))


def _run_osm2pgsql(pbf: Path, schema: str, info: ConnInfo, cfg: IngestConfig) -> None:
    if not shutil.which("osm2pgsql"):
        raise IngestError("osm2pgsql not found: run `make setup`")
    cmd = [
        "osm2pgsql", "--create", "--slim", "--drop", "--hstore",
        "--keep-coastlines",  # natural=coastline ways, which the default style drops: the sea is built from them
        "--style", cfg.osm2pgsql_style,
        "--cache", str(cfg.cache_mb),
        "--number-processes", str(cfg.processes),
        "--middle-schema", schema, "--output-pgsql-schema", schema,
        "--host", info.host, "--port", str(info.port),
        "--username", info.user, "--database", info.dbname,
        str(pbf),
    ]  # fmt: skip
    env = dict(os.environ)
    if info.password:
        env["PGPASSWORD"] = info.password
    log.info("osm2pgsql: %s → schema %s", pbf.name, schema)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise IngestError(f"osm2pgsql failed on {pbf} (exit {proc.returncode}):\n{tail}")


def ingest(
    region: str,
    pbf: Path | str | None = None,
    *,
    info: ConnInfo,
    cfg: IngestConfig,
    regions: RegionsConfig,
    paths: ProjectPaths,
    reserved: Collection[str] = (),
    force: bool = False,
) -> IngestResult:
    """Import a region's extract into schema `region`; a no-op when the extract is unchanged.

    Args:
        region: the region (a schema name, not one of `reserved`).
        pbf: an extract to import instead of the registered one (registers an ad-hoc region).
        info: the database.
        cfg: osm2pgsql settings.
        regions: the region registry (where registered extracts come from).
        paths: the project's paths (download directory, ad-hoc registry).
        reserved: schema names the configuration gives to something else.
        force: re-import even if the extract is unchanged.
    """
    check_region_name(region, reserved)
    if pbf is not None:
        pbf = Path(pbf).expanduser().resolve()
        if not pbf.is_file():
            raise IngestError(f"--pbf file not found: {pbf}")
        path = pbf
    elif region in regions.registry:
        path = fetch_extract(regions.registry[region], paths.root, paths.download_dir)
    else:
        known = ", ".join(sorted(regions.registry))
        raise IngestError(f"unknown region {region!r} (known: {known}); pass --pbf PATH to register a new one")

    digest = sha256_file(path)
    adhoc = pbf is not None and region not in regions.registry
    current = get_import(region, info)
    if current is not None and current.sha256 == digest and not force:
        if current.current:
            if adhoc:  # imported already (e.g. by another project on this database): this project must know it too
                register_adhoc_region(region, path, digest, paths.adhoc_registry)
            msg = f"region {region!r} is up to date (sha256 {digest[:12]}…, imported {current.imported_at:%Y-%m-%d %H:%M})"
            log.info(msg)
            return IngestResult(region, False, digest, 0.0, msg)
        log.info(
            "region %r was imported with import format %d: re-importing it with format %d (land and water polygons)",
            region,
            current.import_format,
            IMPORT_FORMAT,
        )

    extract = inspect_extract(path)
    staging = region + STAGING_SUFFIX
    started = time.monotonic()
    with cursor(info) as cur:
        ensure_meta(cur, info.meta_schema)
        cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(staging)))
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(staging)))
    try:
        _run_osm2pgsql(path, staging, info, cfg)
        try:
            coast = build_land_water(staging, extract.bbox, info)
        except psycopg2.Error as exc:
            raise IngestError(f"the coastline step (land and water polygons) failed on {path}: {exc}") from exc
        _swap_in(region, staging, extract, path, time.monotonic() - started, info)
    except Exception:
        with cursor(info) as cur:
            cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(staging)))
        raise
    seconds = time.monotonic() - started
    if adhoc:
        register_adhoc_region(region, path, digest, paths.adhoc_registry)
    sea = f"{coast.water_km2:.2f} km² of sea" if coast.has_coastline else "no coastline"
    msg = f"imported {path.name} into schema {region!r} in {seconds:.1f}s (OSM data of {extract.osm_timestamp}; {sea})"
    log.info(msg)
    return IngestResult(region, True, digest, seconds, msg)


def _swap_in(region: str, staging: str, extract: ExtractInfo, path: Path, seconds: float, info: ConnInfo) -> None:
    """Replace the live schema by the staging one and record the import, in one transaction."""
    with cursor(info) as cur:
        for table in TABLES:
            cur.execute(sql.SQL("ANALYZE {}.{}").format(sql.Identifier(staging), sql.Identifier(table)))
        cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(region)))
        cur.execute(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(sql.Identifier(staging), sql.Identifier(region)))
        cur.execute(
            sql.SQL(
                """INSERT INTO {}.imports (region, source, sha256, osm_timestamp, imported_at, import_seconds,
                                           west, south, east, north, import_format)
                   VALUES (%s, %s, %s, %s, now(), %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (region) DO UPDATE SET
                     source = EXCLUDED.source, sha256 = EXCLUDED.sha256,
                     osm_timestamp = EXCLUDED.osm_timestamp, imported_at = EXCLUDED.imported_at,
                     import_seconds = EXCLUDED.import_seconds, west = EXCLUDED.west,
                     south = EXCLUDED.south, east = EXCLUDED.east, north = EXCLUDED.north,
                     import_format = EXCLUDED.import_format"""
            ).format(sql.Identifier(info.meta_schema)),
            (region, str(path), extract.sha256, extract.osm_timestamp, seconds, *extract.bbox, IMPORT_FORMAT),
        )


def write_record(region: str, out: Path, info: ConnInfo) -> Path:
    """The import's metadata as JSON: what downstream stages depend on (no wall-clock fields)."""
    record = get_import(region, info)
    if record is None:
        raise IngestError(f"region {region!r} is not ingested")
    data = {
        "region": region,
        "sha256": record.sha256,
        "osm_timestamp": record.osm_timestamp.isoformat() if record.osm_timestamp else None,
        "bbox": list(record.bbox),
        "import_format": record.import_format,
    }
    return write_text(out, json.dumps(data, indent=1) + "\n")
