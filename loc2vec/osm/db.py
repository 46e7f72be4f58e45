"""PostgreSQL/PostGIS connection and the import metadata table.

One place decides how to reach the database (LOC2VEC_PG_DSN, PG* variables, or the
project's own cluster from params.yaml), so psycopg2, osm2pgsql and Mapnik all agree. The
command line resolves a `ConnInfo` once and passes it down; it also says where the import
metadata lives (`meta_schema`).

Each import records the *import format* it was made with (`IMPORT_FORMAT`): the tables an
import holds besides osm2pgsql's. An import of an older format lacks tables the stages read
(format 2 added the land and water polygons built from the coastline, osm/coast.py), so the
stages refuse it with a message, and `loc2vec ingest` re-imports it even when the extract is
unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from loc2vec.core.config import DBConfig
from loc2vec.core.errors import Loc2VecError
from loc2vec.core.names import validate_region_name

DSN_ENV = "LOC2VEC_PG_DSN"
# 1: osm2pgsql's tables only. 2: + land_polygons and water_polygons (osm/coast.py).
IMPORT_FORMAT = 2
_PG_ENV = {
    "host": "PGHOST",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "password": "PGPASSWORD",
}


class DatabaseError(Loc2VecError, RuntimeError):
    """The database cannot be reached or is not in the expected state."""


@dataclass(frozen=True)
class ConnInfo:
    """How to reach the database, and the schema of loc2vec's own metadata in it."""

    host: str
    port: int
    dbname: str
    user: str
    password: str | None
    meta_schema: str = "loc2vec_meta"

    def kwargs(self) -> dict[str, str | int]:
        out: dict[str, str | int] = {
            "host": self.host,
            "port": self.port,
            "dbname": self.dbname,
            "user": self.user,
        }
        if self.password:
            out["password"] = self.password
        return out

    def redacted(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"


def conninfo(cfg: DBConfig) -> ConnInfo:
    """Resolve connection settings: LOC2VEC_PG_DSN, else PG* variables over params.yaml's db section."""
    values: dict[str, str | int | None] = {
        "host": cfg.host,
        "port": cfg.port,
        "dbname": cfg.dbname,
        "user": cfg.user,
        "password": cfg.password,
    }
    dsn = os.environ.get(DSN_ENV)
    if dsn:
        try:
            parsed = psycopg2.extensions.parse_dsn(dsn)
        except psycopg2.ProgrammingError as exc:
            raise DatabaseError(f"{DSN_ENV} is not a valid libpq connection string: {exc}") from exc
        values.update({k: v for k, v in parsed.items() if k in values})
    else:
        values.update({k: os.environ[v] for k, v in _PG_ENV.items() if os.environ.get(v)})
    return ConnInfo(
        host=str(values["host"]),
        port=int(values["port"] or 5432),
        dbname=str(values["dbname"]),
        user=str(values["user"]),
        password=str(values["password"]) if values["password"] else None,
        meta_schema=validate_region_name(cfg.meta_schema),
    )


def connect(info: ConnInfo) -> psycopg2.extensions.connection:
    try:
        return psycopg2.connect(**info.kwargs(), connect_timeout=10)
    except psycopg2.OperationalError as exc:
        raise DatabaseError(
            f"cannot connect to PostgreSQL at {info.redacted()}: {str(exc).strip()}\n"
            "Start the project database with `make setup` (or set LOC2VEC_PG_DSN)."
        ) from exc


@contextmanager
def cursor(info: ConnInfo, *, autocommit: bool = False) -> Iterator[psycopg2.extensions.cursor]:
    """A cursor whose transaction commits on success and rolls back on error."""
    conn = connect(info)
    conn.autocommit = autocommit
    try:
        with conn.cursor() as cur:
            yield cur
        if not autocommit:
            conn.commit()
    except Exception:
        if not autocommit:
            conn.rollback()
        raise
    finally:
        conn.close()


def ensure_meta(cur: psycopg2.extensions.cursor, meta_schema: str) -> None:
    """Create the import metadata table (idempotent)."""
    schema = sql.Identifier(meta_schema)
    cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
    cur.execute(
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {}.imports (
                region        text PRIMARY KEY,
                source        text NOT NULL,
                sha256        text NOT NULL,
                osm_timestamp timestamptz,
                imported_at   timestamptz NOT NULL DEFAULT now(),
                import_seconds double precision,
                west double precision, south double precision,
                east double precision, north double precision
            )"""
        ).format(schema)
    )
    # Tables made before import formats existed hold format-1 imports (the default of the new column).
    cur.execute(
        sql.SQL("ALTER TABLE {}.imports ADD COLUMN IF NOT EXISTS import_format integer NOT NULL DEFAULT 1").format(
            schema
        )
    )


@dataclass(frozen=True)
class ImportRecord:
    region: str
    source: str
    sha256: str
    osm_timestamp: datetime | None
    imported_at: datetime
    import_seconds: float | None
    bbox: tuple[float, float, float, float]  # west, south, east, north (WGS84)
    import_format: int = 1  # IMPORT_FORMAT of the code that made the import

    @property
    def current(self) -> bool:
        """Made with this code's import format (it holds every table the stages read)."""
        return self.import_format >= IMPORT_FORMAT

    def contains(self, lat: float, lon: float) -> bool:
        west, south, east, north = self.bbox
        return south <= lat <= north and west <= lon <= east


def get_import(region: str, info: ConnInfo) -> ImportRecord | None:
    """The metadata of a region's current import, or None when it was never ingested."""
    validate_region_name(region)
    with cursor(info) as cur:
        cur.execute("SELECT to_regclass(%s)", (f"{info.meta_schema}.imports",))
        if cur.fetchone()[0] is None:
            return None
        cur.execute(  # a metadata table older than import formats has no such column: format 1
            "SELECT 1 FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = 'imports' AND column_name = 'import_format'",
            (info.meta_schema,),
        )
        fmt = sql.SQL("import_format" if cur.fetchone() else "1")
        cur.execute(
            sql.SQL(
                "SELECT region, source, sha256, osm_timestamp, imported_at, import_seconds,"
                " west, south, east, north, {} FROM {}.imports WHERE region = %s"
            ).format(fmt, sql.Identifier(info.meta_schema)),
            (region,),
        )
        row = cur.fetchone()
        if row is None:
            return None
        cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (region,))
        if cur.fetchone() is None:
            return None
    name, source, sha256, osm_timestamp, imported_at, seconds, west, south, east, north, fmt = row
    return ImportRecord(name, source, sha256, osm_timestamp, imported_at, seconds, (west, south, east, north), int(fmt))


def require_import(region: str, info: ConnInfo) -> ImportRecord:
    """Like get_import, but a missing or outdated import is an error that says what to run."""
    record = get_import(region, info)
    if record is None:
        raise DatabaseError(
            f"region {region!r} has not been ingested into {info.redacted()}; "
            f"run `loc2vec ingest --region {region}` first"
        )
    if not record.current:
        raise DatabaseError(
            f"region {region!r} in {info.redacted()} was imported by an older loc2vec (import format "
            f"{record.import_format}; this one needs {IMPORT_FORMAT}: the land and water polygons); "
            f"run `loc2vec ingest --region {region}` to re-import it"
        )
    return record
