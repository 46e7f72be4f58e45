"""Create, start and stop the project's own PostgreSQL cluster (Debian's pg_createcluster); its roles.

PostgreSQL refuses to run as root, so the cluster is owned by the `postgres` user and
administered through Debian's wrappers; the project connects over TCP with its own roles.
Everything here is idempotent: `make setup` may run it any number of times.

Least privilege. This admin step (run as `postgres` over the local socket) is the only one with
superuser rights; it creates the extensions (PostGIS, hstore) once per database, and two roles:

* the pipeline's role (`db.user`): LOGIN, NOSUPERUSER, NOCREATEDB, NOCREATEROLE; it owns the database,
  so it creates and owns its schemas (regions, metadata, Feast's online tables) and nothing else. It
  cannot read server files (`pg_read_file`), run programs (`COPY … FROM PROGRAM`) or change roles.
  (It used to be a SUPERUSER whose password was committed in params.yaml: any local user could read
  /etc/passwd through it.)
* the read-only role (`db.reader`) of consumers: CONNECT, USAGE on the owner's schemas and SELECT on
  their tables (default privileges, so tables created later are readable too), and
  default_transaction_read_only.

Passwords are generated (`secrets`) on the first setup and kept in a pgpass-format file outside git
(`db.passfile`, default ~/.config/loc2vec/pgpass, mode 0600); osm/db.py reads them from there. Setup sets
each role's password to the file's, so the file is the one source. Passwords travel to psql on stdin,
never on a command line.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

from loc2vec.core.config import DBConfig
from loc2vec.core.errors import Loc2VecError
from loc2vec.osm.db import passfile_path, pgpass_lookup

log = logging.getLogger(__name__)

_ROLES_SQL = r"""
SELECT format('CREATE ROLE %I LOGIN', :'owner') WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'owner') \gexec
SELECT format('CREATE ROLE %I LOGIN', :'reader') WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'reader') \gexec
SELECT format('ALTER ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD %L',
              :'owner', :'owner_pw') \gexec
SELECT format('ALTER ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD %L',
              :'reader', :'reader_pw') \gexec
SELECT format('ALTER ROLE %I SET default_transaction_read_only = on', :'reader') \gexec
"""

_DATABASE_SQL = r"""
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'owner')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', :'db', :'owner') \gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', :'db') \gexec
SELECT format('GRANT CONNECT ON DATABASE %I TO %I', :'db', :'reader') \gexec
"""

# Run in the database, as the admin: extensions once, and what the read-only role may read.
_GRANTS_SQL = r"""
CREATE EXTENSION IF NOT EXISTS postgis;
CREATE EXTENSION IF NOT EXISTS hstore;
SELECT format('ALTER DEFAULT PRIVILEGES FOR ROLE %I GRANT USAGE ON SCHEMAS TO %I', :'owner', :'reader') \gexec
SELECT format('ALTER DEFAULT PRIVILEGES FOR ROLE %I GRANT SELECT ON TABLES TO %I', :'owner', :'reader') \gexec
SELECT format('GRANT USAGE ON SCHEMA %I TO %I', n.nspname, :'reader'),
       format('GRANT SELECT ON ALL TABLES IN SCHEMA %I TO %I', n.nspname, :'reader')
  FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner WHERE r.rolname = :'owner' \gexec
"""


class ClusterError(Loc2VecError, RuntimeError):
    """The project cluster could not be created or started."""


def _as_postgres(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    elif shutil.which("sudo"):
        cmd = ["sudo", "-u", "postgres", *cmd]
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def _cluster_status(cfg: DBConfig) -> str | None:
    """'online', 'down', or None when the cluster does not exist."""
    out = subprocess.run(["pg_lsclusters", "--no-header"], check=True, text=True, capture_output=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == str(cfg.pg_version) and parts[1] == cfg.cluster:
            if int(parts[2]) != cfg.port:
                raise ClusterError(
                    f"cluster {cfg.pg_version}/{cfg.cluster} exists on port {parts[2]}, params.yaml says {cfg.port}"
                )
            return parts[3]
    return None


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _psql(cfg: DBConfig, dbname: str, script: str, variables: dict[str, str] | None = None) -> None:
    """Run a script as the admin; variables are `\\set` on stdin (passwords never appear in argv)."""
    args = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "/var/run/postgresql", "-p", str(cfg.port), "-d", dbname]
    head = "".join(f"\\set {key} {_quote(value)}\n" for key, value in (variables or {}).items())
    try:
        _as_postgres(args, input=head + script)
    except subprocess.CalledProcessError as exc:
        raise ClusterError(f"psql failed on {dbname}: {exc.stderr.strip()}") from exc


def ensure_passwords(passfile: Path, cfg: DBConfig) -> dict[str, str]:
    """The roles' passwords from `passfile`, generating (and appending) those it lacks; the file is 0600.

    Entries are `*:PORT:*:ROLE:PASSWORD` (pgpass format: `PGPASSFILE=FILE psql -h 127.0.0.1 -p PORT -U ROLE`
    works too).
    """
    passfile.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    out: dict[str, str] = {}
    generated = []
    for role in (cfg.user, cfg.reader):
        found = pgpass_lookup(passfile, "*", cfg.port, "*", role) if passfile.is_file() else None
        if found is None:
            found = secrets.token_urlsafe(24)  # [A-Za-z0-9_-]: nothing pgpass would need to escape
            generated.append(role)
        out[role] = found
    fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as fh:
        fh.writelines(f"*:{cfg.port}:*:{role}:{out[role]}\n" for role in generated)
    os.chmod(passfile, 0o600)
    if generated:
        log.info("generated passwords for %s in %s", ", ".join(generated), passfile)
    return out


def start_cluster(cfg: DBConfig) -> None:
    """Create the cluster (once) and start it; returns when it accepts connections."""
    for tool in ("pg_createcluster", "pg_ctlcluster", "pg_lsclusters"):
        if not shutil.which(tool):
            raise ClusterError(f"{tool} not found: install postgresql-{cfg.pg_version} (make setup does)")
    status = _cluster_status(cfg)
    if status is None:
        log.info("creating cluster %s/%s on port %s", cfg.pg_version, cfg.cluster, cfg.port)
        subprocess.run(
            ["pg_createcluster", str(cfg.pg_version), cfg.cluster, "-p", str(cfg.port), "--start-conf", "manual"],
            check=True,
            capture_output=True,
        )
        status = "down"
    if status != "online":
        log.info("starting cluster %s/%s", cfg.pg_version, cfg.cluster)
        subprocess.run(["pg_ctlcluster", str(cfg.pg_version), cfg.cluster, "start"], check=True)
    _wait_ready(cfg)


def setup_cluster(cfg: DBConfig, extra_databases: tuple[str, ...] = ()) -> None:
    """Create (once) and start the cluster; create the roles (passwords in db.passfile), database(s),
    extensions and grants."""
    if cfg.user == cfg.reader:
        raise ClusterError(f"db.user and db.reader must be different roles, both are {cfg.user!r}")
    start_cluster(cfg)
    passwords = ensure_passwords(passfile_path(cfg), cfg)
    roles = {"owner": cfg.user, "reader": cfg.reader}
    _psql(cfg, "postgres", _ROLES_SQL, {**roles, "owner_pw": passwords[cfg.user], "reader_pw": passwords[cfg.reader]})
    for db in (cfg.dbname, *extra_databases):
        _psql(cfg, "postgres", _DATABASE_SQL, {**roles, "db": db})
        _psql(cfg, db, _GRANTS_SQL, roles)
    log.info(
        "database ready: postgresql://%s@%s:%s/%s (read-only role %s; passwords in %s)",
        cfg.user,
        cfg.host,
        cfg.port,
        cfg.dbname,
        cfg.reader,
        passfile_path(cfg),
    )


def database_owner(cfg: DBConfig, dbname: str) -> str | None:
    """The owner of a database of the cluster, or None when it does not exist."""
    args = [
        "psql",
        "-X",
        "-qAt",
        "-h",
        "/var/run/postgresql",
        "-p",
        str(cfg.port),
        "-d",
        "postgres",
        "-v",
        "ON_ERROR_STOP=1",
    ]
    script = f"\\set db {_quote(dbname)}\nSELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = :'db';\n"
    out = _as_postgres(args, input=script).stdout.strip()
    return out or None


def drop_database(cfg: DBConfig, dbname: str) -> None:
    """DROP DATABASE (closing its connections): for disposable databases such as the test suite's."""
    _psql(cfg, "postgres", "SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE)', :'db') \\gexec\n", {"db": dbname})


def _wait_ready(cfg: DBConfig, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ok = subprocess.run(["pg_isready", "-q", "-h", "/var/run/postgresql", "-p", str(cfg.port)]).returncode == 0
        if ok:
            return
        time.sleep(0.5)
    raise ClusterError(f"cluster {cfg.cluster} did not accept connections within {timeout_s:.0f}s")


def stop_cluster(cfg: DBConfig) -> None:
    if _cluster_status(cfg) == "online":
        subprocess.run(["pg_ctlcluster", str(cfg.pg_version), cfg.cluster, "stop"], check=True)
