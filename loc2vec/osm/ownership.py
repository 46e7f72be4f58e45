"""Which schemas loc2vec owns: only those may ever be dropped or replaced.

A region is a schema, and a schema name is just a name: `loc2vec ingest --region feast` once dropped the
Feast online store, and any schema that happened to share a region's name would have gone the same way.
So a name is never enough. When ingest creates a schema (the staging schema of an import) it records the
schema in the metadata schema's `schemas` table with its object id (`pg_namespace.oid`), in the same
transaction; renaming the staging schema to the region keeps the id and updates the name. A schema is
loc2vec's when a row names it *and* its id matches: a schema someone dropped and re-created under the same
name is someone else's. Every DROP goes through `drop_owned_schema`, which refuses anything else.

Imports made before the marker existed are adopted once, by a narrow rule (`_adoptable`): the metadata
table records an import of that region (or the name is a region's staging schema), and the schema holds
nothing but tables osm2pgsql and ingest create. Anything else — a user's tables, a function, a view — is
refused with a message that says what to do.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import psycopg2.extensions
from psycopg2 import sql

from loc2vec.core.errors import Loc2VecError
from loc2vec.core.names import validate_region_name

log = logging.getLogger(__name__)
OWNED_TABLE = "schemas"
# What osm2pgsql (--slim --drop leaves only its output tables; the middle tables exist while it runs) and
# ingest's coastline step create in a region's schema: the only contents an unmarked schema may have to
# be adopted as an import made before the marker existed.
KNOWN_TABLES = frozenset(
    {
        "planet_osm_point",
        "planet_osm_line",
        "planet_osm_polygon",
        "planet_osm_roads",
        "planet_osm_nodes",
        "planet_osm_ways",
        "planet_osm_rels",
        "planet_osm_properties",
        "land_polygons",
        "water_polygons",
    }
)
STAGING_SUFFIX = "__staging"


class SchemaNotOwnedError(Loc2VecError, RuntimeError):
    """A schema of that name exists and was not created by loc2vec: it is never dropped or replaced."""


Cursor = psycopg2.extensions.cursor


def ensure_owned_table(cur: Cursor, meta_schema: str) -> None:
    """Create the table of owned schemas (idempotent; the metadata schema exists)."""
    cur.execute(
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {}.{} (
                name      text PRIMARY KEY,
                schema_id oid  NOT NULL,
                purpose   text NOT NULL
            )"""
        ).format(sql.Identifier(meta_schema), sql.Identifier(OWNED_TABLE))
    )


def _schema_id(cur: Cursor, name: str) -> int | None:
    cur.execute("SELECT oid FROM pg_namespace WHERE nspname = %s", (name,))
    row = cur.fetchone()
    return None if row is None else int(row[0])


def _marker(cur: Cursor, meta_schema: str, name: str) -> int | None:
    cur.execute("SELECT to_regclass(%s)", (f"{meta_schema}.{OWNED_TABLE}",))
    if cur.fetchone()[0] is None:
        return None
    cur.execute(
        sql.SQL("SELECT schema_id FROM {}.{} WHERE name = %s").format(
            sql.Identifier(meta_schema), sql.Identifier(OWNED_TABLE)
        ),
        (name,),
    )
    row = cur.fetchone()
    return None if row is None else int(row[0])


def mark_owned(cur: Cursor, meta_schema: str, name: str, purpose: str) -> None:
    """Record that loc2vec created schema `name` (it exists), within the caller's transaction."""
    schema_id = _schema_id(cur, validate_region_name(name))
    if schema_id is None:
        raise SchemaNotOwnedError(f"schema {name!r} does not exist: nothing to mark")
    cur.execute(
        sql.SQL(
            """INSERT INTO {}.{} (name, schema_id, purpose) VALUES (%s, %s, %s)
               ON CONFLICT (name) DO UPDATE SET schema_id = EXCLUDED.schema_id, purpose = EXCLUDED.purpose"""
        ).format(sql.Identifier(meta_schema), sql.Identifier(OWNED_TABLE)),
        (name, schema_id, purpose),
    )


def _forget(cur: Cursor, meta_schema: str, name: str) -> None:
    cur.execute("SELECT to_regclass(%s)", (f"{meta_schema}.{OWNED_TABLE}",))
    if cur.fetchone()[0] is not None:
        cur.execute(
            sql.SQL("DELETE FROM {}.{} WHERE name = %s").format(
                sql.Identifier(meta_schema), sql.Identifier(OWNED_TABLE)
            ),
            (name,),
        )


def _contents(cur: Cursor, schema_id: int) -> tuple[set[str], int]:
    """The schema's tables (plain and partitioned) and how many other objects it holds (views,
    sequences not owned by a column, functions, types that are not a table's row type)."""
    cur.execute("SELECT relname FROM pg_class WHERE relnamespace = %s AND relkind IN ('r', 'p')", (schema_id,))
    tables = {r[0] for r in cur.fetchall()}
    cur.execute(
        """SELECT
             (SELECT count(*) FROM pg_class c WHERE c.relnamespace = %(s)s AND (c.relkind IN ('v', 'm', 'f')
                OR c.relkind = 'S' AND NOT EXISTS (
                  SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype IN ('a', 'i'))))
           + (SELECT count(*) FROM pg_proc p WHERE p.pronamespace = %(s)s)
           + (SELECT count(*) FROM pg_type t WHERE t.typnamespace = %(s)s AND t.typrelid = 0 AND t.typelem = 0)""",
        {"s": schema_id},
    )
    return tables, int(cur.fetchone()[0])


def _adoptable(cur: Cursor, meta_schema: str, name: str, schema_id: int, imported: Collection[str]) -> bool:
    """An import made before ownership was recorded: an import of it is recorded (or it is a region's
    staging schema) and it holds only tables osm2pgsql and ingest create."""
    region = name.removesuffix(STAGING_SUFFIX)
    if region not in imported and not name.endswith(STAGING_SUFFIX):
        return False
    tables, others = _contents(cur, schema_id)
    return others == 0 and tables <= KNOWN_TABLES


def _imported_regions(cur: Cursor, meta_schema: str) -> set[str]:
    cur.execute("SELECT to_regclass(%s)", (f"{meta_schema}.imports",))
    if cur.fetchone()[0] is None:
        return set()
    cur.execute(sql.SQL("SELECT region FROM {}.imports").format(sql.Identifier(meta_schema)))
    return {r[0] for r in cur.fetchall()}


def check_replaceable(cur: Cursor, meta_schema: str, name: str, where: str) -> bool:
    """Whether schema `name` exists; raises SchemaNotOwnedError when it exists and is not loc2vec's.

    An unmarked schema that `_adoptable` recognises as an older loc2vec import is marked (adopted) here.

    Args:
        cur: a cursor (its transaction records an adoption).
        meta_schema: the metadata schema.
        name: the schema that is about to be dropped or replaced.
        where: the database, for the message.
    """
    schema_id = _schema_id(cur, name)
    if schema_id is None:
        return False
    if _marker(cur, meta_schema, name) == schema_id:
        return True
    if _adoptable(cur, meta_schema, name, schema_id, _imported_regions(cur, meta_schema)):
        log.info("schema %r: an import made before ownership was recorded; marking it as loc2vec's", name)
        mark_owned(cur, meta_schema, name, "import" if not name.endswith(STAGING_SUFFIX) else "staging")
        return True
    raise SchemaNotOwnedError(
        f"schema {name!r} in {where} was not created by loc2vec (it is not recorded in "
        f"{meta_schema}.{OWNED_TABLE}): refusing to drop or replace it; choose another region name, "
        "or drop the schema yourself if it really is a leftover"
    )


def drop_owned_schema(cur: Cursor, meta_schema: str, name: str, where: str) -> None:
    """DROP SCHEMA name CASCADE, only if loc2vec owns it (check_replaceable); a missing schema is fine."""
    if check_replaceable(cur, meta_schema, name, where):
        cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))
    _forget(cur, meta_schema, name)


def rename_owned_schema(cur: Cursor, meta_schema: str, old: str, new: str, purpose: str) -> None:
    """ALTER SCHEMA old RENAME TO new (old is loc2vec's; new does not exist) and move the marker with it."""
    check_replaceable(cur, meta_schema, old, "the database")
    cur.execute(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new)))
    _forget(cur, meta_schema, old)
    mark_owned(cur, meta_schema, new, purpose)
