"""Least privilege, on the real server: the pipeline's role is no superuser, consumers' role only reads,
and no password is in a committed file.

The suite runs with its own pair of roles (`<test db>_owner`, `<test db>_reader`, conftest.py), created by
the same admin step `make setup` runs (osm/cluster.py), so what holds here holds for the project's roles.
"""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import psycopg2
import psycopg2.errors
import pytest
import yaml
from psycopg2 import sql

from loc2vec.cli.project import Project
from loc2vec.osm.db import ConnInfo, connect, cursor

from .conftest import REPO


def _refused(info: ConnInfo, statement: str, *, read_write: bool = False) -> type[Exception]:
    """Run one statement as `info`'s role; returns the error class PostgreSQL refused it with."""
    conn = connect(info)
    conn.autocommit = True  # each statement its own transaction (a SET then applies to the next one)
    try:
        with conn.cursor() as cur:
            if read_write:  # a role may switch its own default off: the privileges must hold anyway
                cur.execute("SET default_transaction_read_only = off")
            with pytest.raises(psycopg2.Error) as caught:
                cur.execute(statement)
        return type(caught.value)
    finally:
        conn.close()


SERVER_FILES = [
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT pg_ls_dir('/')",
    "SELECT lo_import('/etc/passwd')",
    "COPY (SELECT 1) TO PROGRAM 'true'",
    "CREATE TEMP TABLE leak (line text); COPY leak FROM '/etc/passwd'",
]


@pytest.mark.parametrize("statement", SERVER_FILES)
def test_pipeline_role_cannot_read_server_files(proj: Project, region: str, statement: str) -> None:
    assert _refused(proj.info, statement) is psycopg2.errors.InsufficientPrivilege


def test_pipeline_role_is_an_owner_not_a_superuser(proj: Project, region: str) -> None:
    with cursor(proj.info) as cur:
        cur.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls FROM pg_roles "
            "WHERE rolname = current_user"
        )
        assert cur.fetchone() == (False, False, False, False, False)
        cur.execute("SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = %s", (region,))
        assert cur.fetchone()[0] == proj.info.user, "the pipeline's role owns its schemas"
    for statement in ("ALTER ROLE CURRENT_USER SUPERUSER", "CREATE ROLE intruder", "CREATE DATABASE intruder"):
        assert _refused(proj.info, statement) is psycopg2.errors.InsufficientPrivilege


def test_read_only_role_reads_but_cannot_write(proj: Project, region: str) -> None:
    reader, table = proj.reader, sql.Identifier(region, "planet_osm_point")
    assert reader.user == proj.params.db.reader != proj.info.user
    with cursor(reader) as cur:
        cur.execute(sql.SQL("SELECT count(*) FROM {}").format(table))
        assert cur.fetchone()[0] > 0
        cur.execute(sql.SQL("SELECT count(*) FROM {}.imports").format(sql.Identifier(proj.info.meta_schema)))
        assert cur.fetchone()[0] > 0
    conn = connect(reader)
    insert = sql.SQL("INSERT INTO {} (osm_id) VALUES (1)").format(table).as_string(conn)
    delete = sql.SQL("DELETE FROM {}").format(table).as_string(conn)
    conn.close()
    assert _refused(reader, insert) is psycopg2.errors.ReadOnlySqlTransaction, "read-only by default"
    writes = [
        insert,
        delete,
        f"CREATE TABLE {region}.intruder (x int)",
        "CREATE TABLE public.intruder (x int)",
        "CREATE SCHEMA intruder",
        f"DROP SCHEMA {region} CASCADE",
        f"ALTER TABLE {region}.planet_osm_point ADD COLUMN x int",
        "SELECT pg_read_file('/etc/passwd')",
    ]
    for statement in writes:
        assert _refused(reader, statement, read_write=True) is psycopg2.errors.InsufficientPrivilege, statement


def test_consumers_read_the_postgres_online_store_as_the_read_only_role(proj: Project) -> None:
    from loc2vec.serving.store import StoreSettings, feature_store, staged_store

    settings = StoreSettings.from_config(
        proj.params.publish, proj.params.embed, proj.paths, proj.info, "postgres", reader=proj.reader
    )
    assert feature_store(settings).config.online_store.user == proj.params.db.reader
    staged = proj.paths.feast / "registry_postgres.db.test-staging"
    assert staged_store(settings, staged).config.online_store.user == proj.info.user, "publishing writes as owner"


def test_no_password_in_committed_files(proj: Project) -> None:
    db = yaml.safe_load((REPO / "params.yaml").read_text())["db"]
    assert "password" not in db, "params.yaml names roles, never their passwords"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    passfile = Path(db["passfile"]).expanduser()
    assert not passfile.resolve().is_relative_to(REPO.resolve()), "the generated secrets live outside the checkout"
    assert not any(name.endswith("pgpass") for name in tracked)
    hits = subprocess.run(
        [
            "git",
            "grep",
            "-n",
            "-I",
            "-E",
            r"password\s*[:=]\s*['\"]?[A-Za-z0-9]",
            "--",
            "params.yaml",
            "*.yaml",
            "Makefile",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout
    assert hits == "", f"a literal password in a committed file: {hits}"


def test_generated_passwords_are_private_and_stable(proj: Project) -> None:
    from loc2vec.osm.cluster import ensure_passwords
    from loc2vec.osm.db import passfile_path

    path = passfile_path(proj.params.db)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = ensure_passwords(path, proj.params.db)
    assert ensure_passwords(path, proj.params.db) == first, "setup reuses the passwords it generated"
    assert first[proj.info.user] == proj.info.password and first[proj.params.db.reader] == proj.reader.password
