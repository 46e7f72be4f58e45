"""Feast's SQL registry in the project database (the postgres store): staged publishes, one-transaction swaps.

Why: with a file registry, a second host cannot use the PostgreSQL online store (the registry is a file on
the publisher's disk). Feast's SQL registry keeps it in tables of the project database (schema
``publish.registry_schema``), which any host with the connection settings reads.

What the SQL registry changes for the "never half-updated" guarantee. Feast's SqlRegistry writes every object
eagerly in its own transaction (``commit()`` is a no-op), and ``materialize()`` first flips each view to
MATERIALIZING, committed, before writing rows: applied directly, a consumer would see a publish object by
object, lookups of every view being materialized would fail ("cannot serve features") for the whole run,
and a killed publish would leave them failing. So publishing never applies to the live SQL registry:

1. the live registry's proto is copied to a staged *file* registry (data/feast/registry_sql.staging),
2. apply, retire and materialize run against that file (as with the file registry),
3. after the spot checks pass, ``swap_in`` replaces the project's rows in the registry tables (entities, data
   sources, feature views, services, the project, infra, last-updated metadata) with the staged ones in ONE
   database transaction: what the file registry did with os.replace.

A reader (the SqlRegistry's cache refresh) sees each table all-old or all-new. It reads the tables one after
the other in separate transactions, so a refresh that straddles the swap's commit can see the old views with the
new services (views are read before services); then only services new in this publish fail, until the next
refresh (cache_ttl_seconds); existing pinned services, the latest view and their rows are unaffected. Never a
view in MATERIALIZING, and a killed publish leaves the live registry as it was (only a stale staging file).

Publishers on several hosts are serialised by a PostgreSQL advisory lock held for the whole staged publish
(the file lock of publish.py only serialises one host's).

Privileges: the pipeline role creates the schema and, through Feast (schema_mode auto), the tables; it grants the
read-only role USAGE on the schema and SELECT on its tables, nothing else. Consumers' stores use
schema_mode verify (no DDL) and the read-only role's default_transaction_read_only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from loc2vec.core.atomic import atomic_path
from loc2vec.osm.db import cursor
from loc2vec.serving.feast_import import import_feast
from loc2vec.serving.store import StoreSettings, publisher_store, refresh_cached, staged_store

log = logging.getLogger(__name__)
LOCK_KEY = "loc2vec-feast-registry"  # pg_advisory_lock(hashtext(...)): one publisher per database


def ensure_schema(settings: StoreSettings) -> None:
    """Create the registry schema (as the pipeline role) and let the read-only role read it (idempotent).

    Runs before Feast creates its tables in it, and again after (tables created by this publish need the grant).
    """
    from psycopg2 import sql

    schema = sql.Identifier(settings.registry_schema)
    with cursor(settings.info) as cur:
        cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
        reader = settings.reader
        if reader is not None and reader.user != settings.info.user:
            role = sql.Identifier(reader.user)
            cur.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, role))
            cur.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(schema, role))


@contextlib.contextmanager
def advisory_lock(settings: StoreSettings) -> Iterator[None]:
    """Hold the database-wide publish lock (session-level advisory lock) while the block runs."""
    with cursor(settings.info, autocommit=True) as cur:
        cur.execute("SELECT pg_advisory_lock(hashtext(%s))", (LOCK_KEY,))
        try:
            yield
        finally:
            cur.execute("SELECT pg_advisory_unlock(hashtext(%s))", (LOCK_KEY,))


def _tables() -> list[tuple[Any, str, str, str]]:
    """(table, name column, proto column, RegistryProto field) of each kind of object a project holds."""
    from feast.infra.registry import sql as fsql

    return [
        (fsql.entities, "entity_name", "entity_proto", "entities"),
        (fsql.data_sources, "data_source_name", "data_source_proto", "data_sources"),
        (fsql.feature_views, "feature_view_name", "feature_view_proto", "feature_views"),
        (fsql.on_demand_feature_views, "feature_view_name", "feature_view_proto", "on_demand_feature_views"),
        (fsql.stream_feature_views, "feature_view_name", "feature_view_proto", "stream_feature_views"),
        (fsql.feature_services, "feature_service_name", "feature_service_proto", "feature_services"),
        (fsql.saved_datasets, "saved_dataset_name", "saved_dataset_proto", "saved_datasets"),
        (
            fsql.validation_references,
            "validation_reference_name",
            "validation_reference_proto",
            "validation_references",
        ),
        (fsql.permissions, "permission_name", "permission_proto", "permissions"),
    ]


def _name_project(obj: Any) -> tuple[str, str]:
    holder = obj.spec if "spec" in obj.DESCRIPTOR.fields_by_name else obj
    return holder.name, holder.project


def replace_project(engine: Any, project: str, proto: Any) -> dict[str, int]:
    """Make the SQL registry's rows of `project` exactly those of `proto` (a RegistryProto), in one transaction.

    Returns the number of rows written per table.
    """
    from feast.infra.registry import sql as fsql
    from sqlalchemy import delete, insert

    now = datetime.now(UTC)
    stamp = int(now.timestamp())
    counts: dict[str, int] = {}
    with engine.begin() as conn:
        for table, name_col, proto_col, field in _tables():
            conn.execute(delete(table).where(table.c.project_id == project))
            rows = []
            for obj in getattr(proto, field):
                name, owner = _name_project(obj)
                if owner == project:
                    rows.append(
                        {
                            name_col: name,
                            "project_id": project,
                            "last_updated_timestamp": stamp,
                            proto_col: obj.SerializeToString(),
                        }
                    )
            if rows:
                conn.execute(insert(table), rows)
            counts[table.name] = len(rows)
        projects = [p for p in proto.projects if p.spec.name == project]
        conn.execute(delete(fsql.projects).where(fsql.projects.c.project_id == project))
        if projects:
            conn.execute(
                insert(fsql.projects).values(
                    project_id=project,
                    project_name=project,
                    last_updated_timestamp=stamp,
                    project_proto=projects[0].SerializeToString(),
                )
            )
        conn.execute(delete(fsql.managed_infra).where(fsql.managed_infra.c.project_id == project))
        conn.execute(
            insert(fsql.managed_infra).values(
                infra_name="infra_obj",
                project_id=project,
                last_updated_timestamp=stamp,
                infra_proto=proto.infra.SerializeToString(),
            )
        )
        key = fsql.FeastMetadataKeys.LAST_UPDATED_TIMESTAMP.value
        meta = fsql.feast_metadata
        conn.execute(delete(meta).where(meta.c.project_id == project, meta.c.metadata_key == key))
        conn.execute(
            insert(meta).values(
                project_id=project, metadata_key=key, metadata_value=str(stamp), last_updated_timestamp=stamp
            )
        )
    return counts


@contextlib.contextmanager
def staged_sql_registry(settings: StoreSettings) -> Iterator[tuple[Any, Any]]:
    """Like publish.staged_registry for the SQL registry: a FeatureStore on a staged file copy of the live
    registry, and a function that writes the copy back into the database in one transaction."""
    import_feast()
    from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto

    staged = settings.feast_dir / "registry_sql.staging"
    with advisory_lock(settings):
        ensure_schema(settings)
        live: Any = publisher_store(settings)  # creates Feast's tables on the first publish (schema_mode auto)
        ensure_schema(settings)  # grants on the tables just created
        staged.unlink(missing_ok=True)  # a killed publish's
        current = live.registry.proto()
        if any(p.spec.name == live.project for p in current.projects):
            with atomic_path(staged) as tmp:
                tmp.write_bytes(current.SerializeToString())
        store = staged_store(settings, staged)

        def swap_in() -> None:
            proto = RegistryProto()
            proto.ParseFromString(staged.read_bytes())
            counts = replace_project(live.registry.write_engine, live.project, proto)
            log.info(
                "SQL registry %s: project %s replaced in one transaction %s",
                settings.registry_schema,
                live.project,
                counts,
            )
            refresh_cached(settings)

        try:
            yield store, swap_in
        finally:
            staged.unlink(missing_ok=True)
            live.registry.write_engine.dispose()
