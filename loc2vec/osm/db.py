"""PostgreSQL/PostGIS connection and the import metadata table.

One place decides how to reach the database (LOC2VEC_PG_DSN, PG* variables, or the
project's own cluster from params.yaml), so psycopg2, osm2pgsql, Mapnik and Feast all agree. The
command line resolves a `ConnInfo` once and passes it down; it also says where the import
metadata lives (`meta_schema`).

Two roles (osm/cluster.py creates both): the pipeline's (`db.user`, owner of its schemas, no superuser)
and consumers' read-only one (`db.reader`, `reader_conninfo`). No password is in a committed file: when
neither LOC2VEC_PG_DSN, PGPASSWORD nor params give one, it is looked up in the pgpass-format file that
`make setup` generated (`db.passfile`, or $PGPASSFILE).

Each import records the *import format* it was made with (`IMPORT_FORMAT`): the tables an
import holds besides osm2pgsql's. An import of an older format lacks tables the stages read
(format 2 added the land and water polygons built from the coastline, osm/coast.py), so the
stages refuse it with a message, and `loc2vec ingest` re-imports it even when the extract is
unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from loc2vec.core.config import DBConfig
from loc2vec.core.errors import Loc2VecError
from loc2vec.core.names import validate_region_name
from loc2vec.osm.ownership import ensure_owned_table

log = logging.getLogger(__name__)
DSN_ENV = "LOC2VEC_PG_DSN"
READER_DSN_ENV = "LOC2VEC_PG_READER_DSN"  # the read-only role's connection, when not db.reader on the same database
# The first key of loc2vec's advisory locks (pg_advisory_lock(int, int)): other applications on the same
# database use other keys.
ADVISORY_LOCK_CLASS = 0x6C32
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


def passfile_path(cfg: DBConfig) -> Path:
    """Where the roles' passwords are: $PGPASSFILE, else params db.passfile (~ expanded)."""
    return Path(os.environ.get("PGPASSFILE") or cfg.passfile).expanduser()


def _pgpass_fields(line: str) -> list[str]:
    """A pgpass line's five fields (`\\:` and `\\\\` are an escaped colon and backslash)."""
    fields, current, chars = [], [], iter(line)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, ""))
        elif ch == ":" and len(fields) < 4:
            fields.append("".join(current))
            current = []
        else:
            current.append(ch)
    fields.append("".join(current))
    return fields


def pgpass_lookup(path: Path, host: str, port: int | str, dbname: str, user: str) -> str | None:
    """The password of the first matching line of a pgpass file (`*` matches anything), or None."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DatabaseError(f"cannot read the password file {path}: {exc.strerror or exc}") from exc
    want = (host, str(port), dbname, user)
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = _pgpass_fields(line)
        if len(fields) == 5 and all(f == "*" or f == w for f, w in zip(fields[:4], want, strict=True)):
            return fields[4]
    return None


def _password(cfg: DBConfig, host: str, port: int, dbname: str, user: str) -> str | None:
    return pgpass_lookup(passfile_path(cfg), host, port, dbname, user)


def reader_conninfo(cfg: DBConfig, owner: ConnInfo) -> ConnInfo:
    """The read-only role on the same database as `owner` (consumers' online lookups use it)."""
    if os.environ.get(READER_DSN_ENV):
        return _from_dsn(os.environ[READER_DSN_ENV], READER_DSN_ENV, cfg)
    return ConnInfo(
        host=owner.host,
        port=owner.port,
        dbname=owner.dbname,
        user=cfg.reader,
        password=_password(cfg, owner.host, owner.port, owner.dbname, cfg.reader),
        meta_schema=owner.meta_schema,
    )


def _from_dsn(dsn: str, env: str, cfg: DBConfig) -> ConnInfo:
    try:
        parsed = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as exc:
        raise DatabaseError(f"{env} is not a valid libpq connection string: {exc}") from exc
    values = {"host": cfg.host, "port": cfg.port, "dbname": cfg.dbname, "user": cfg.user, **parsed}
    return _conninfo(values, cfg)


def _conninfo(values: dict, cfg: DBConfig) -> ConnInfo:
    host, port, dbname, user = (
        str(values["host"]),
        int(values["port"] or 5432),
        str(values["dbname"]),
        str(values["user"]),
    )
    password = values.get("password") or _password(cfg, host, port, dbname, user)
    return ConnInfo(
        host=host,
        port=port,
        dbname=dbname,
        user=user,
        password=str(password) if password else None,
        meta_schema=validate_region_name(cfg.meta_schema),
    )


def conninfo(cfg: DBConfig) -> ConnInfo:
    """Resolve connection settings: LOC2VEC_PG_DSN, else PG* variables over params.yaml's db section.

    The password: the DSN's or PGPASSWORD, else params db.password (optional, best left out), else the
    password file `make setup` wrote (passfile_path).
    """
    dsn = os.environ.get(DSN_ENV)
    if dsn:
        return _from_dsn(dsn, DSN_ENV, cfg)
    values: dict[str, str | int | None] = {
        "host": cfg.host,
        "port": cfg.port,
        "dbname": cfg.dbname,
        "user": cfg.user,
        "password": cfg.password,
    }
    values.update({k: os.environ[v] for k, v in _PG_ENV.items() if os.environ.get(v)})
    return _conninfo(values, cfg)


# PostgreSQL's JIT compiles a query whose estimated cost is high: loc2vec's are many index probes (a lateral
# lookup per point), estimated dear and run cheap, and paid ~1.4 s of compilation each (EXPLAIN ANALYZE of
# embedding's mapped-land test: JIT 1.4 s of 3.8 s for 20,000 points). Off for loc2vec's own connections only.
SESSION_OPTIONS = "-c jit=off"


def connect(info: ConnInfo) -> psycopg2.extensions.connection:
    try:
        return psycopg2.connect(**info.kwargs(), connect_timeout=10, options=SESSION_OPTIONS)
    except psycopg2.OperationalError as exc:
        raise DatabaseError(
            f"cannot connect to PostgreSQL at {info.redacted()}: {str(exc).strip()}\n"
            "Start the project database and create its roles with `make setup` (or set LOC2VEC_PG_DSN)."
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


@contextmanager
def advisory_lock(info: ConnInfo, name: str, *, what: str) -> Iterator[None]:
    """Hold a PostgreSQL session advisory lock named `name` for the block; wait while another holds it.

    The lock lives in the database, so it serialises every client of that database (other checkouts,
    other machines), and it goes away with the session: a killed holder never leaves it behind.

    Args:
        info: the database.
        name: what is locked (e.g. "ingest:liechtenstein"); hashed into the lock's second key.
        what: how to describe the wait in the log.
    """
    conn = connect(info)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (ADVISORY_LOCK_CLASS, name))
            if not cur.fetchone()[0]:
                log.info("%s: another process holds the lock %r; waiting for it", what, name)
                cur.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (ADVISORY_LOCK_CLASS, name))
        yield
    finally:
        conn.close()  # ends the session, which releases the lock


def ensure_meta(cur: psycopg2.extensions.cursor, meta_schema: str) -> None:
    """Create the import metadata and schema ownership tables (idempotent)."""
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
    ensure_owned_table(cur, meta_schema)


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
