"""Create, start and stop the project's own PostgreSQL cluster (Debian's pg_createcluster).

PostgreSQL refuses to run as root, so the cluster is owned by the `postgres` user and
administered through Debian's wrappers; the project connects over TCP with its own role.
Everything here is idempotent: `make setup` may run it any number of times.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time

from loc2vec.core.config import DBConfig
from loc2vec.core.errors import Loc2VecError

log = logging.getLogger(__name__)

_BOOTSTRAP_SQL = r"""
SELECT format('CREATE ROLE %I LOGIN SUPERUSER PASSWORD %L', :'role', :'pw')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I PASSWORD %L', :'role', :'pw') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
"""

_EXTENSIONS_SQL = "CREATE EXTENSION IF NOT EXISTS postgis;\nCREATE EXTENSION IF NOT EXISTS hstore;\n"


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


def _psql(cfg: DBConfig, dbname: str, script: str, variables: dict[str, str] | None = None) -> None:
    args = [
        "psql",
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "/var/run/postgresql",
        "-p",
        str(cfg.port),
        "-d",
        dbname,
    ]
    for key, value in (variables or {}).items():
        args += ["-v", f"{key}={value}"]
    try:
        _as_postgres(args, input=script)
    except subprocess.CalledProcessError as exc:
        raise ClusterError(f"psql failed on {dbname}: {exc.stderr.strip()}") from exc


def setup_cluster(cfg: DBConfig, extra_databases: tuple[str, ...] = ()) -> None:
    """Create (once) and start the cluster; create the role, database(s) and extensions."""
    for tool in ("pg_createcluster", "pg_ctlcluster", "pg_lsclusters"):
        if not shutil.which(tool):
            raise ClusterError(f"{tool} not found: install postgresql-{cfg.pg_version} (make setup does)")
    status = _cluster_status(cfg)
    if status is None:
        log.info("creating cluster %s/%s on port %s", cfg.pg_version, cfg.cluster, cfg.port)
        subprocess.run(
            [
                "pg_createcluster",
                str(cfg.pg_version),
                cfg.cluster,
                "-p",
                str(cfg.port),
                "--start-conf",
                "manual",
            ],
            check=True,
            capture_output=True,
        )
        status = "down"
    if status != "online":
        log.info("starting cluster %s/%s", cfg.pg_version, cfg.cluster)
        subprocess.run(["pg_ctlcluster", str(cfg.pg_version), cfg.cluster, "start"], check=True)
    _wait_ready(cfg)
    for db in (cfg.dbname, *extra_databases):
        _psql(cfg, "postgres", _BOOTSTRAP_SQL, {"role": cfg.user, "pw": cfg.password, "db": db})
        _psql(cfg, db, _EXTENSIONS_SQL)
    log.info("database ready: postgresql://%s@%s:%s/%s", cfg.user, cfg.host, cfg.port, cfg.dbname)


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
