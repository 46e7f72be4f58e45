"""Typed configuration: params.yaml is the single source of every tunable.

Each stage reads its own section into a frozen dataclass, so code never carries
scattered literals and DVC can track exactly the params a stage depends on.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import yaml

from loc2vec.errors import Loc2VecError

REGION_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
PARAMS_ENV = "LOC2VEC_PARAMS"


class ConfigError(Loc2VecError, ValueError):
    """A configuration value is missing or invalid."""


def project_root() -> Path:
    """The directory holding params.yaml: $LOC2VEC_PARAMS's parent, the cwd or the source checkout."""
    env = os.environ.get(PARAMS_ENV)
    if env:
        return Path(env).resolve().parent
    for base in (Path.cwd(), *Path.cwd().parents):
        if (base / "params.yaml").is_file() and (base / "loc2vec").is_dir():
            return base
    return Path(__file__).resolve().parents[1]


def params_path() -> Path:
    env = os.environ.get(PARAMS_ENV)
    return Path(env).resolve() if env else project_root() / "params.yaml"


def validate_region_name(name: str) -> str:
    """Region names become PostgreSQL schema names: only `[a-z][a-z0-9_]*` is accepted."""
    if not isinstance(name, str) or not REGION_NAME_RE.fullmatch(name) or len(name) > 48:
        raise ConfigError(
            f"invalid region name {name!r}: use lower-case letters, digits and '_', "
            "starting with a letter (at most 48 characters)"
        )
    return name


@dataclass(frozen=True)
class RegionSpec:
    """Where a region's extract comes from: a local path or an http(s) URL, with its sha256."""

    name: str
    source: str
    sha256: str | None = None

    @property
    def is_url(self) -> bool:
        return self.source.startswith(("http://", "https://"))

    def local_path(self, root: Path) -> Path:
        if self.is_url:
            raise ConfigError(f"region {self.name!r} comes from a URL; fetch it first")
        path = Path(self.source).expanduser()
        return path if path.is_absolute() else (root / path).resolve()


@dataclass(frozen=True)
class RegionsConfig:
    default: str
    download_dir: str
    adhoc_registry: str
    registry: dict[str, RegionSpec]


@dataclass(frozen=True)
class DBConfig:
    pg_version: int = 15
    cluster: str = "loc2vec"
    host: str = "127.0.0.1"
    port: int = 5433
    dbname: str = "loc2vec"
    user: str = "loc2vec"
    password: str = "loc2vec"
    meta_schema: str = "loc2vec_meta"


@dataclass(frozen=True)
class IngestConfig:
    osm2pgsql_style: str = "/usr/share/osm2pgsql/default.style"
    cache_mb: int = 800
    processes: int = 2


@dataclass(frozen=True)
class RenderConfig:
    radius_m: float = 100.0
    size: int = 128
    buffer_px: int = 16

    @property
    def metres_per_pixel(self) -> float:
        return 2.0 * self.radius_m / self.size


@dataclass(frozen=True)
class AugmentConfig:
    """How positives differ from their anchor (shared by direct shards, metatiles and the fast path)."""

    max_shift_m: float = 80.0  # |shift| ~ U(0, max) on each axis, random sign
    channel_drop_p: float = 0.2  # each channel of a positive is switched off with this probability


T = TypeVar("T")


def _build(cls: type[T], section: dict[str, Any] | None, name: str) -> T:
    """Build a dataclass from a params section, rejecting unknown keys (typos fail loudly)."""
    section = dict(section or {})
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(section) - known
    if unknown:
        raise ConfigError(f"params.yaml section {name!r}: unknown keys {sorted(unknown)}")
    return cls(**section)


@dataclass(frozen=True)
class Params:
    root: Path
    raw: dict[str, Any] = field(repr=False)
    regions: RegionsConfig
    db: DBConfig
    ingest: IngestConfig
    render: RenderConfig
    augment: AugmentConfig

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.raw.get(name) or {})


def _load_regions(raw: dict[str, Any], root: Path) -> RegionsConfig:
    registry: dict[str, RegionSpec] = {}
    for name, spec in (raw.get("registry") or {}).items():
        validate_region_name(name)
        registry[name] = RegionSpec(name=name, source=str(spec["source"]), sha256=spec.get("sha256"))
    adhoc_file = root / raw.get("adhoc_registry", "data/regions.yaml")
    if adhoc_file.is_file():
        for name, spec in (yaml.safe_load(adhoc_file.read_text()) or {}).items():
            if name not in registry:
                registry[name] = RegionSpec(name=name, source=str(spec["source"]), sha256=spec.get("sha256"))
    default = raw.get("default", "liechtenstein")
    if default not in registry:
        raise ConfigError(f"default region {default!r} is not in regions.registry")
    return RegionsConfig(
        default=default,
        download_dir=raw.get("download_dir", "data/osm"),
        adhoc_registry=raw.get("adhoc_registry", "data/regions.yaml"),
        registry=registry,
    )


@lru_cache(maxsize=4)
def _load(path: Path, mtime: float) -> Params:
    raw = yaml.safe_load(path.read_text()) or {}
    root = path.parent
    return Params(
        root=root,
        raw=raw,
        regions=_load_regions(raw.get("regions") or {}, root),
        db=_build(DBConfig, raw.get("db"), "db"),
        ingest=_build(IngestConfig, raw.get("ingest"), "ingest"),
        render=_build(RenderConfig, raw.get("render"), "render"),
        augment=_build(AugmentConfig, raw.get("augment"), "augment"),
    )


def load_params(path: Path | str | None = None) -> Params:
    """Load params.yaml (cached until the file or the ad-hoc registry changes)."""
    p = Path(path).resolve() if path else params_path()
    if not p.is_file():
        raise ConfigError(f"params file not found: {p}")
    adhoc = p.parent / "data" / "regions.yaml"
    stamp = p.stat().st_mtime + (adhoc.stat().st_mtime if adhoc.exists() else 0.0)
    return _load(p, stamp)


def section_config(cls: type[T], name: str, params: Params | None = None) -> T:
    """Typed config for any params.yaml section (e.g. `section_config(ModelConfig, "model")`).

    Modules own their config dataclass; this keeps params.yaml → dataclass in one place.
    """
    params = params or load_params()
    return _build(cls, params.raw.get(name), name)
