"""OSM extracts → PostGIS: import atomically with osm2pgsql.

A region lives in its own PostgreSQL schema. An import goes to a staging schema first
(osm2pgsql, then the land and water polygons built from the extract's coastline, osm/coast.py)
and is swapped in within one transaction, so a corrupt or truncated extract, or a failed
coastline step, can never destroy the previous import; the metadata table records what was
imported, when, and with which import format (an import of an older format is re-imported
even when its extract is unchanged: it lacks tables the stages read).

What makes it safe to kill or run twice:

* Only loc2vec's own schemas are ever dropped or replaced (osm/ownership.py): a schema of the region's
  name that loc2vec did not create is refused before anything is imported.
* One ingest per region at a time: a PostgreSQL advisory lock on the region (osm/db.py), held for the
  whole ingest, so a second ingest of the same region waits, then finds it up to date. The lock is the
  database's, so it also holds between checkouts, and dies with a killed holder's session.
* osm2pgsql dies with its ingest (PR_SET_PDEATHSIG): a killed ingest never leaves it writing into a
  staging schema the next ingest is about to drop.
* Registering an ad-hoc region (data/regions.yaml) is part of the swap's transaction: the file is written
  just before the commit, a failure to write it rolls the import back (the error names the file), and a
  failed commit restores the file. So a region is never imported but unknown (which used to make the next
  ingest say "up to date" while every other command said "unknown region").
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import yaml
from psycopg2 import sql

from loc2vec.core.atomic import file_lock, write_text
from loc2vec.core.config import IngestConfig, RegionsConfig, read_yaml
from loc2vec.core.names import check_region_name
from loc2vec.core.paths import ProjectPaths
from loc2vec.osm.coast import LAND_TABLE, WATER_TABLE, build_land_water
from loc2vec.osm.db import IMPORT_FORMAT, ConnInfo, advisory_lock, connect, cursor, ensure_meta, get_import
from loc2vec.osm.extracts import ExtractInfo, IngestError, fetch_extract, inspect_extract, sha256_file
from loc2vec.osm.ownership import STAGING_SUFFIX, check_replaceable, drop_owned_schema, mark_owned, rename_owned_schema

log = logging.getLogger(__name__)
PLANET_TABLES = ("planet_osm_point", "planet_osm_line", "planet_osm_polygon", "planet_osm_roads")
TABLES = (*PLANET_TABLES, LAND_TABLE, WATER_TABLE)  # what an import of IMPORT_FORMAT holds


@dataclass(frozen=True)
class IngestResult:
    region: str
    changed: bool
    sha256: str
    seconds: float
    message: str


def register_adhoc_region(name: str, pbf: Path, sha256: str, registry_file: Path, lock: Path) -> Callable[[], None]:
    """Remember a region brought with --pbf, so later commands know its source; returns how to undo it.

    The registry is read, changed and written under a file lock (ingests of other regions may register
    theirs at the same time), atomically.

    Raises:
        IngestError: the registry cannot be written (the message names the file).
    """
    try:
        with file_lock(lock):
            before = registry_file.read_text() if registry_file.is_file() else None
            data = (read_yaml(registry_file) if before is not None else {}) or {}
            data[name] = {"source": str(pbf.resolve()), "sha256": sha256}
            registry_file.parent.mkdir(parents=True, exist_ok=True)
            write_text(registry_file, yaml.safe_dump(data, sort_keys=True))
    except OSError as exc:
        where = exc.filename or registry_file
        raise IngestError(
            f"cannot register region {name!r} in {registry_file}: {exc.strerror or exc}: {where}"
        ) from exc

    def undo() -> None:
        with file_lock(lock):
            if before is None:
                registry_file.unlink(missing_ok=True)
            else:
                write_text(registry_file, before)

    return undo


def _registered_adhoc(region: str, registry_file: Path) -> bool:
    """Whether the region is in the ad-hoc registry (params.yaml's own entries win over it)."""
    if not registry_file.is_file():
        return False
    data = read_yaml(registry_file) or {}
    return isinstance(data, dict) and region in data


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGKILL when its parent dies, so a killed ingest takes osm2pgsql with it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


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
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=_die_with_parent)
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
    # Brought with --pbf and not one of params.yaml's regions (new, or registered ad hoc before): the
    # registry must name this extract from now on, or a later ingest without --pbf would re-import the old one.
    adhoc = pbf is not None and (region not in regions.registry or _registered_adhoc(region, paths.adhoc_registry))
    where = info.redacted()
    staging = region + STAGING_SUFFIX

    def register() -> Callable[[], None] | None:
        if not adhoc:
            return None
        return register_adhoc_region(region, path, digest, paths.adhoc_registry, paths.lock("regions"))

    with advisory_lock(info, f"ingest:{region}", what=f"ingest of {region!r}"):
        with cursor(info) as cur:  # refuse a schema that is not loc2vec's before anything is imported
            ensure_meta(cur, info.meta_schema)
            check_replaceable(cur, info.meta_schema, region, where)
            check_replaceable(cur, info.meta_schema, staging, where)
        current = get_import(region, info)
        if current is not None and current.sha256 == digest and not force:
            if current.current:
                register()  # imported already (e.g. by another project on this database): this project must know it too
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
        started = time.monotonic()
        with cursor(info) as cur:
            drop_owned_schema(cur, info.meta_schema, staging, where)  # a killed ingest's leftover
            cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(staging)))
            mark_owned(cur, info.meta_schema, staging, "staging")
        try:
            _run_osm2pgsql(path, staging, info, cfg)
            try:
                coast = build_land_water(staging, extract.bbox, info)
            except psycopg2.Error as exc:
                raise IngestError(f"the coastline step (land and water polygons) failed on {path}: {exc}") from exc
            _swap_in(region, staging, extract, path, time.monotonic() - started, info, register)
        except BaseException:
            _drop_staging(staging, info)
            raise
    seconds = time.monotonic() - started
    sea = f"{coast.water_km2:.2f} km² of sea" if coast.has_coastline else "no coastline"
    msg = f"imported {path.name} into schema {region!r} in {seconds:.1f}s (OSM data of {extract.osm_timestamp}; {sea})"
    log.info(msg)
    return IngestResult(region, True, digest, seconds, msg)


def _drop_staging(staging: str, info: ConnInfo) -> None:
    """Remove a failed import's staging schema; a failure here is logged, never hides the import's error."""
    try:
        with cursor(info) as cur:
            drop_owned_schema(cur, info.meta_schema, staging, info.redacted())
    except Exception as exc:  # the next ingest drops it
        log.warning("could not drop the staging schema %r (the next ingest will): %s", staging, exc)


def _swap_in(
    region: str,
    staging: str,
    extract: ExtractInfo,
    path: Path,
    seconds: float,
    info: ConnInfo,
    register: Callable[[], Callable[[], None] | None],
) -> None:
    """Replace the live schema by the staging one, record the import and register the region: one unit.

    The database work is one transaction; `register` (the ad-hoc registry file) runs last inside it,
    so a registry that cannot be written rolls the swap back, and a commit that fails undoes the
    registration.
    """
    conn = connect(info)
    try:
        with conn.cursor() as cur:
            for table in TABLES:
                cur.execute(sql.SQL("ANALYZE {}.{}").format(sql.Identifier(staging), sql.Identifier(table)))
            drop_owned_schema(cur, info.meta_schema, region, info.redacted())
            rename_owned_schema(cur, info.meta_schema, staging, region, "import")
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
        try:
            undo = register()
        except IngestError as exc:
            raise IngestError(f"{exc}; the import was rolled back (the previous one, if any, is intact)") from exc
        try:
            conn.commit()
        except BaseException:
            if undo is not None:
                undo()
            raise
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.close()


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
