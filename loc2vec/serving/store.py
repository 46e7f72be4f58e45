"""The Feast store of a project: which feature_store.yaml, filled in, and the FeatureStore object.

Which store: ``feature_repo/feature_store.yaml`` (SQLite online store; the directory is
$LOC2VEC_FEATURE_REPO when set) or, when LOC2VEC_ONLINE_STORE=postgres
(or params ``publish.online_store: postgres``), ``feature_repo/feature_store.postgres.yaml`` filled in from
the database connection (osm.db.conninfo). Relative paths resolve against ``<project root>/feature_repo``,
so the data is in ``<project root>/data/feast`` for a checkout and a test project alike (core.paths).

Feast is imported lazily, the fast way (serving/feast_import.py: 1.5 s instead of 7–8 s, without torch).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loc2vec.core.config import EmbedConfig, PublishConfig
from loc2vec.core.errors import ConfigError, Loc2VecError
from loc2vec.core.paths import ProjectPaths
from loc2vec.osm.db import ConnInfo

if TYPE_CHECKING:
    from feast import FeatureStore

FEATURE_REPO_ENV = "LOC2VEC_FEATURE_REPO"
# The definitions and store templates: the checkout's feature_repo/, or where $LOC2VEC_FEATURE_REPO says (an
# installed client has no checkout: it needs only the feature_store*.yaml templates, e.g. a copy).
SOURCE_REPO = Path(os.environ.get(FEATURE_REPO_ENV) or Path(__file__).resolve().parents[2] / "feature_repo").resolve()
ONLINE_STORE_ENV = "LOC2VEC_ONLINE_STORE"
STORE_FILES = {
    "sqlite": "feature_store.yaml",
    "postgres": "feature_store.postgres.yaml",
    "redis": "feature_store.redis.yaml",
}
REDIS_ENV = "LOC2VEC_REDIS"
DEFINITION_MODULES = ("entities", "sources", "features", "services")
EMBEDDING_FEATURES = ("embedding", "model_name", "model_version")
_VAR = re.compile(r"\$\{(\w+)\}")


class FeatureStoreError(Loc2VecError, RuntimeError):
    """The feature store is not configured or not published yet."""


@dataclass(frozen=True)
class StoreSettings:
    """Which Feast store a project serves from, and how lookups map locations to its entities.

    Attributes:
        kind: the online store, "sqlite" or "postgres".
        paths: the project's paths (feature_repo resolves relative paths; data/feast holds the data).
        info: the database (the PostgreSQL online store lives there).
        postgres_schema: the schema of Feast's online tables in that database.
        h3_resolution: the resolution of the published cells (lookups use the same).
        reader: the read-only role consumers' lookups connect as (None: `info`'s role); publishing
            always writes as `info`'s.
        retain_versions: a model version keeps its own view and pinned services until this many newer
            versions are published (serving/versions.py).
        redis: the Redis online store's connection string (host:port[,password=…]).
        registry_schema: the schema of Feast's SQL registry in that database (the postgres store's registry).
        align_to: "previous": publish also writes each new version rotated into the previous one's space
            (serving/aligned.py); "none": not.
    """

    kind: str
    paths: ProjectPaths
    info: ConnInfo
    postgres_schema: str = "feast"
    h3_resolution: int = 11
    reader: ConnInfo | None = None
    retain_versions: int = 3
    redis: str = "127.0.0.1:6380"
    registry_schema: str = "feast_registry"
    align_to: str = "none"

    @classmethod
    def from_config(
        cls,
        publish: PublishConfig,
        embed: EmbedConfig,
        paths: ProjectPaths,
        info: ConnInfo,
        kind: str | None = None,
        *,
        reader: ConnInfo | None = None,
    ) -> StoreSettings:
        """The store params describe; `kind` (e.g. a --online-store option), else $LOC2VEC_ONLINE_STORE, wins
        ($LOC2VEC_REDIS over publish.redis).

        Raises:
            ConfigError: the store kind is not one of sqlite, postgres, redis.
        """
        chosen = kind or os.environ.get(ONLINE_STORE_ENV) or publish.online_store
        if chosen not in STORE_FILES:
            raise ConfigError(
                f"online store must be one of {sorted(STORE_FILES)} (${ONLINE_STORE_ENV}), got {chosen!r}"
            )
        redis = os.environ.get(REDIS_ENV) or publish.redis
        return cls(
            chosen,
            paths,
            info,
            publish.postgres_schema,
            embed.h3_resolution,
            reader,
            publish.retain_versions,
            redis,
            publish.registry_schema,
            publish.align_to,
        )

    @property
    def feast_dir(self) -> Path:
        """Where the registry, SQLite online store and offline Parquet live."""
        return self.paths.feast


def _template_vars(settings: StoreSettings, info: ConnInfo, *, password: bool = True) -> dict[str, str]:
    return {
        "LOC2VEC_PG_HOST": info.host,
        "LOC2VEC_PG_PORT": str(info.port),
        "LOC2VEC_PG_DATABASE": info.dbname,
        "LOC2VEC_PG_USER": info.user,
        "LOC2VEC_PG_PASSWORD": (info.password or "") if password else "",
        "LOC2VEC_FEAST_SCHEMA": settings.postgres_schema,
        "LOC2VEC_FEAST_REGISTRY_SCHEMA": settings.registry_schema,
        "LOC2VEC_REDIS": settings.redis if password else redact_redis(settings.redis),
    }


def redact_redis(connection: str) -> str:
    """A Redis connection string without its password (what identifies the store, and what logs show)."""
    return ",".join("password=***" if part.startswith("password=") else part for part in connection.split(","))


def store_yaml(settings: StoreSettings, *, consumer: bool = False, password: bool = True) -> str:
    """The effective feature_store.yaml text of a store (variables filled in): as the publisher writes it,
    or, `consumer`, as consumers read it (the read-only role, when settings name one); without the
    password when `password` is false (what identifies the store: publish records its digest)."""
    name = STORE_FILES[settings.kind]
    text = (SOURCE_REPO / name).read_text()
    info = settings.reader if consumer and settings.reader is not None else settings.info
    values = _template_vars(settings, info, password=password) if "${" in text else {}

    def fill(m: re.Match[str]) -> str:
        if m.group(1) not in values:
            raise ConfigError(f"{name}: unknown variable ${{{m.group(1)}}}")
        return values[m.group(1)]

    return _VAR.sub(fill, text)


_STORES: dict[tuple[str, str], FeatureStore] = {}
_LOCK = threading.Lock()


def _config_data(settings: StoreSettings, *, consumer: bool = False) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(store_yaml(settings, consumer=consumer))
    if not isinstance(data, dict):
        raise ConfigError(f"{STORE_FILES[settings.kind]}: expected a mapping")
    return data


def _resolve(settings: StoreSettings, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (settings.paths.feature_repo / p).resolve()


def is_sql_registry(settings: StoreSettings) -> bool:
    """Whether the store's registry is Feast's SQL registry (in the database) rather than a file."""
    registry = _config_data(settings)["registry"]
    return isinstance(registry, dict) and registry.get("registry_type") == "sql"


def registry_path(settings: StoreSettings) -> Path:
    """The store's (file) registry, which consumers read."""
    registry = _config_data(settings)["registry"]
    return _resolve(settings, registry["path"] if isinstance(registry, dict) else registry)


def online_db_path(settings: StoreSettings) -> Path | None:
    """The SQLite online store's file, or None for another online store."""
    online = _config_data(settings).get("online_store") or {}
    if online.get("type") != "sqlite":
        return None
    return _resolve(settings, online.get("path", "data/online.db"))


@dataclass(frozen=True)
class DirectStore:
    """The default store's files, which lookups read without importing Feast (serving/online_read.py): its Feast
    project, registry file and SQLite online store file."""

    project: str
    registry: Path
    online_db: Path

    def table(self, view: str) -> str:
        """The view's online table, as Feast names it (`compute_table_id` without view versioning)."""
        return f"{self.project}_{view}"


def direct_store(settings: StoreSettings) -> DirectStore | None:
    """The default store's files, or None when the store is another kind (read it through Feast): not SQLite,
    a SQL registry, SQLite's optional vector columns, or Feast's online view versioning."""
    if settings.kind != "sqlite":
        return None
    data = _config_data(settings, consumer=True)
    registry, online = data.get("registry"), data.get("online_store") or {}
    if isinstance(registry, dict):
        if registry.get("registry_type", "file") != "file" or registry.get("enable_online_feature_view_versioning"):
            return None
        registry = registry.get("path")
    if not isinstance(registry, str) or "://" in registry or not isinstance(online, dict):
        return None  # a registry in object storage: Feast reads it
    if online.get("type") != "sqlite":
        return None
    if online.get("vector_enabled") or online.get("enable_openai_compatible_store"):
        return None
    online_db = _resolve(settings, online.get("path", "data/online.db"))
    return DirectStore(str(data["project"]), _resolve(settings, registry), online_db)


def _build(settings: StoreSettings, registry: Path | None = None, *, consumer: bool = False) -> FeatureStore:
    from loc2vec.serving.feast_import import import_feast

    import_feast()
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    data = _config_data(settings, consumer=consumer)
    if registry is not None:  # a staged file registry (a copy of the live one, file or SQL)
        data["registry"] = {"registry_type": "file", "path": str(registry)}
    elif consumer and isinstance(data["registry"], dict) and data["registry"].get("registry_type") == "sql":
        # consumers (the read-only role) never run DDL: a missing table is "not published yet"
        data["registry"] = {**data["registry"], "schema_mode": "verify"}
    repo = settings.paths.feature_repo  # relative paths in the yaml resolve against it
    repo.mkdir(exist_ok=True)
    settings.feast_dir.mkdir(parents=True, exist_ok=True)
    offline = data.get("offline_store")
    if isinstance(offline, dict) and set(offline) == {"type"}:
        # Given as a mapping, Feast validates it when the config is built, importing the file offline store
        # and with it dask.dataframe (1.7 s) even for an online lookup; given by name, it resolves on first use.
        data["offline_store"] = offline["type"]
    config = RepoConfig(**data)
    config.repo_path = repo
    return FeatureStore(repo_path=str(repo), config=config)


def _key(settings: StoreSettings) -> tuple[str, str]:
    return (str(settings.paths.root), hashlib.sha256(store_yaml(settings, consumer=True).encode()).hexdigest())


def feature_store(settings: StoreSettings) -> FeatureStore:
    """The project's FeatureStore (cached per project root and effective config), as consumers read it
    (connected as the read-only role, when the settings name one).

    Args:
        settings: which store (StoreSettings.from_config).

    Returns:
        A feast.FeatureStore whose relative paths resolve against the project's feature_repo.
    """
    key = _key(settings)
    with _LOCK:
        store = _STORES.get(key)
        if store is None:
            store = _STORES[key] = _build(settings, consumer=True)
    return store


def staged_store(settings: StoreSettings, registry: Path) -> FeatureStore:
    """A FeatureStore like `feature_store(settings)` but with its registry at `registry` (not cached).

    Publishing applies and materializes against a staged copy of the registry and swaps it in when
    done (serving/publish.py), so consumers never read a registry that a killed publish left behind.
    """
    return _build(settings, registry)


def refresh_cached(settings: StoreSettings) -> None:
    """Make this process's cached store re-read its registry (after a publish swapped a new one in)."""
    with _LOCK:
        store = _STORES.get(_key(settings))
    if store is not None:
        store.refresh_registry()


def forget_stores() -> None:
    """Drop cached stores (their connections go with them): after switching projects in one process."""
    with _LOCK:
        _STORES.clear()


def describe(settings: StoreSettings) -> dict[str, Any]:
    """Where the store is (for logs and the CLI), without the password."""
    out: dict[str, Any] = {"online_store": settings.kind, "feast_dir": str(settings.feast_dir)}
    if settings.kind == "postgres":
        out["postgres"] = settings.info.redacted() + f" schema {settings.postgres_schema}"
    if settings.kind == "redis":
        out["redis"] = redact_redis(settings.redis)
    return out


def publisher_store(settings: StoreSettings) -> FeatureStore:
    """A FeatureStore connected as the publishing role (not cached): what writes a SQL registry."""
    return _build(settings)
