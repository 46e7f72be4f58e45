"""OSM extracts → PostGIS: fetch, verify, and import atomically with osm2pgsql.

A region lives in its own PostgreSQL schema. An import goes to a staging schema first
and is swapped in within one transaction, so a corrupt or truncated extract can never
destroy the previous import; the metadata table records what was imported and when.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml
from psycopg2 import sql
from tqdm import tqdm

from loc2vec.atomic import atomic_path, write_text
from loc2vec.config import ConfigError, Params, RegionSpec, load_params, validate_region_name
from loc2vec.db import ConnInfo, conninfo, cursor, ensure_meta, get_import, meta_schema
from loc2vec.errors import Loc2VecError

log = logging.getLogger(__name__)
STAGING_SUFFIX = "__staging"
RESERVED = {"public", "information_schema", "topology"}


class IngestError(Loc2VecError, RuntimeError):
    """An extract could not be fetched, verified or imported; the previous import is untouched."""


@dataclass(frozen=True)
class ExtractInfo:
    path: Path
    sha256: str
    osm_timestamp: datetime | None
    bbox: tuple[float, float, float, float]  # west, south, east, north


@dataclass(frozen=True)
class IngestResult:
    region: str
    changed: bool
    sha256: str
    seconds: float
    message: str


def check_region_name(name: str) -> str:
    """A region name must be a safe schema name that cannot clash with internal schemas."""
    validate_region_name(name)
    if name in RESERVED or name.startswith("pg_") or "__" in name or name == load_params().db.meta_schema:
        raise ConfigError(
            f"invalid region name {name!r}: reserved (pg_*, '__', public, {load_params().db.meta_schema})"
        )
    return name


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch_extract(spec: RegionSpec, params: Params | None = None) -> Path:
    """Return a local, checksum-verified path for a region's extract (downloading URLs once)."""
    params = params or load_params()
    if not spec.is_url:
        path = spec.local_path(params.root)
        if not path.is_file():
            raise IngestError(f"extract for region {spec.name!r} not found: {path}")
        if spec.sha256:
            _verify(path, spec.sha256, spec.name)
        return path
    if not spec.sha256:
        raise IngestError(
            f"region {spec.name!r} comes from a URL without a sha256 in params.yaml; "
            "download it once, run `sha256sum` on it and add the checksum"
        )
    target = params.root / params.regions.download_dir / f"{spec.name}.osm.pbf"
    if target.is_file() and sha256_file(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(spec.source, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {spec.name}") as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        _verify(Path(tmp_name), spec.sha256, spec.name)
        os.replace(tmp_name, target)
    except Exception as exc:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, IngestError):
            raise
        raise IngestError(f"download of {spec.source} failed: {exc}") from exc
    return target


def _verify(path: Path, expected: str, region: str) -> None:
    actual = sha256_file(path)
    if actual != expected.lower():
        raise IngestError(f"checksum mismatch for region {region!r} ({path}): expected sha256 {expected}, got {actual}")


def inspect_extract(path: Path) -> ExtractInfo:
    """Read the extract fully with osmium: checksum, data timestamp and bounding box.

    Reading every block also catches truncated or corrupt files before the database is touched.
    """
    if not shutil.which("osmium"):
        raise IngestError("osmium (osmium-tool) not found: run `make setup`")
    proc = subprocess.run(["osmium", "fileinfo", "-e", "-j", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise IngestError(f"{path} is not a readable OSM extract: {proc.stderr.strip() or 'osmium failed'}")
    info = json.loads(proc.stdout)
    header = info.get("header", {})
    options = header.get("option", {})
    stamp = options.get("osmosis_replication_timestamp") or options.get("timestamp")
    stamp = stamp or info.get("data", {}).get("timestamp", {}).get("last")
    # The header bbox is the extract's cut (Geofabrik, `osmium extract --set-bounds`); without one,
    # fall back to the data bbox, which is wider (complete ways and relations reach outside the cut).
    boxes = header.get("boxes") or [info.get("data", {}).get("bbox")]
    if not boxes or not boxes[0]:
        raise IngestError(f"{path} holds no data (empty bounding box)")
    west, south, east, north = (float(v) for v in boxes[0])
    return ExtractInfo(
        path=path,
        sha256=sha256_file(path),
        osm_timestamp=datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else None,
        bbox=(west, south, east, north),
    )


def register_adhoc_region(name: str, pbf: Path, sha256: str, params: Params | None = None) -> None:
    """Remember a region brought with --pbf, so later commands know its source."""
    params = params or load_params()
    registry_file = params.root / params.regions.adhoc_registry
    registry_file.parent.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(registry_file.read_text()) if registry_file.is_file() else {}
    data = data or {}
    data[name] = {"source": str(pbf.resolve()), "sha256": sha256}
    write_text(registry_file, yaml.safe_dump(data, sort_keys=True))


def _run_osm2pgsql(pbf: Path, schema: str, info: ConnInfo, params: Params) -> None:
    if not shutil.which("osm2pgsql"):
        raise IngestError("osm2pgsql not found: run `make setup`")
    cfg = params.ingest
    cmd = [
        "osm2pgsql", "--create", "--slim", "--drop", "--hstore",
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


def ingest(region: str, pbf: Path | str | None = None, *, force: bool = False) -> IngestResult:
    """Import a region's extract into schema `region`; a no-op when the extract is unchanged."""
    params = load_params()
    check_region_name(region)
    if pbf is not None:
        pbf = Path(pbf).expanduser().resolve()
        if not pbf.is_file():
            raise IngestError(f"--pbf file not found: {pbf}")
        path = pbf
    elif region in params.regions.registry:
        path = fetch_extract(params.regions.registry[region], params)
    else:
        known = ", ".join(sorted(params.regions.registry))
        raise IngestError(f"unknown region {region!r} (known: {known}); pass --pbf PATH to register a new one")

    info = conninfo(params.db)
    digest = sha256_file(path)
    current = get_import(region, info)
    if current is not None and current.sha256 == digest and not force:
        msg = f"region {region!r} is up to date (sha256 {digest[:12]}…, imported {current.imported_at:%Y-%m-%d %H:%M})"
        log.info(msg)
        return IngestResult(region, False, digest, 0.0, msg)

    extract = inspect_extract(path)
    staging = region + STAGING_SUFFIX
    started = time.monotonic()
    with cursor(info) as cur:
        ensure_meta(cur)
        cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(staging)))
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(staging)))
    try:
        _run_osm2pgsql(path, staging, info, params)
        _swap_in(region, staging, extract, path, time.monotonic() - started, info)
    except Exception:
        with cursor(info) as cur:
            cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(staging)))
        raise
    seconds = time.monotonic() - started
    if pbf is not None and region not in params.regions.registry:
        register_adhoc_region(region, path, digest, params)
    msg = f"imported {path.name} into schema {region!r} in {seconds:.1f}s (OSM data of {extract.osm_timestamp})"
    log.info(msg)
    return IngestResult(region, True, digest, seconds, msg)


def _swap_in(region: str, staging: str, extract: ExtractInfo, path: Path, seconds: float, info: ConnInfo) -> None:
    """Replace the live schema by the staging one and record the import, in one transaction."""
    with cursor(info) as cur:
        for table in ("planet_osm_point", "planet_osm_line", "planet_osm_polygon", "planet_osm_roads"):
            cur.execute(sql.SQL("ANALYZE {}.{}").format(sql.Identifier(staging), sql.Identifier(table)))
        cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(region)))
        cur.execute(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(sql.Identifier(staging), sql.Identifier(region)))
        cur.execute(
            sql.SQL(
                """INSERT INTO {}.imports (region, source, sha256, osm_timestamp, imported_at, import_seconds,
                                           west, south, east, north)
                   VALUES (%s, %s, %s, %s, now(), %s, %s, %s, %s, %s)
                   ON CONFLICT (region) DO UPDATE SET
                     source = EXCLUDED.source, sha256 = EXCLUDED.sha256,
                     osm_timestamp = EXCLUDED.osm_timestamp, imported_at = EXCLUDED.imported_at,
                     import_seconds = EXCLUDED.import_seconds, west = EXCLUDED.west,
                     south = EXCLUDED.south, east = EXCLUDED.east, north = EXCLUDED.north"""
            ).format(sql.Identifier(meta_schema())),
            (region, str(path), extract.sha256, extract.osm_timestamp, seconds, *extract.bbox),
        )


def fetch_to(region: str, out: Path) -> Path:
    """Put the region's verified extract at `out` (atomically), so DVC can version it."""
    params = load_params()
    check_region_name(region)
    if region not in params.regions.registry:
        raise IngestError(f"unknown region {region!r}; add it to params.yaml regions.registry")
    src = fetch_extract(params.regions.registry[region], params)
    with atomic_path(out) as tmp:
        shutil.copyfile(src, tmp)
    return out


def write_record(region: str, out: Path) -> Path:
    """The import's metadata as JSON: what downstream stages depend on (no wall-clock fields)."""
    record = get_import(region)
    if record is None:
        raise IngestError(f"region {region!r} is not ingested")
    data = {
        "region": region,
        "sha256": record.sha256,
        "osm_timestamp": record.osm_timestamp.isoformat() if record.osm_timestamp else None,
        "bbox": list(record.bbox),
    }
    return write_text(out, json.dumps(data, indent=1) + "\n")
