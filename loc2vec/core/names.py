"""Region names: they become PostgreSQL schema names and directory names, so only a safe subset is accepted."""

from __future__ import annotations

import re
from collections.abc import Collection

from loc2vec.core.errors import ConfigError

REGION_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
MAX_REGION_NAME = 48
SYSTEM_SCHEMAS = frozenset({"public", "information_schema", "topology"})


def validate_region_name(name: str) -> str:
    """Check the syntax of a region name: `[a-z][a-z0-9_]*`, at most 48 characters.

    Args:
        name: the candidate name.

    Returns:
        The name, unchanged.

    Raises:
        ConfigError: the name is not a safe identifier.
    """
    if not isinstance(name, str) or not REGION_NAME_RE.fullmatch(name) or len(name) > MAX_REGION_NAME:
        raise ConfigError(
            f"invalid region name {name!r}: use lower-case letters, digits and '_', "
            f"starting with a letter (at most {MAX_REGION_NAME} characters)"
        )
    return name


def check_region_name(name: str, reserved: Collection[str] = ()) -> str:
    """A region name that is safe and cannot clash with a schema the project or PostgreSQL owns.

    Args:
        name: the candidate name.
        reserved: schema names the configuration uses for other things (metadata, Feast tables).

    Returns:
        The name, unchanged.

    Raises:
        ConfigError: the name is invalid or reserved (pg_*, names with '__', system and configured schemas).
    """
    validate_region_name(name)
    taken = SYSTEM_SCHEMAS | set(reserved)
    if name in taken or name.startswith("pg_") or "__" in name:
        raise ConfigError(f"invalid region name {name!r}: reserved (pg_*, '__', {', '.join(sorted(taken))})")
    return name


# MLflow's version N, or NaM: version N's vectors rotated into version M's space (serving/aligned.py)
MODEL_VERSION_RE = re.compile(r"^[0-9]{1,9}(a[0-9]{1,9})?$")


def validate_model_version(version: str) -> str:
    """A registered model version as it names Feast objects and files (`location_embedding_v7`): MLflow's
    versions are positive integers, an aligned version is `NaM` (version N rotated into version M's space);
    anything else would make names that cannot be told apart or parsed.

    Raises:
        ValueError: not a decimal integer.
    """
    if not isinstance(version, str) or not MODEL_VERSION_RE.match(version):
        raise ValueError(f"invalid model version {version!r}: expected MLflow's decimal version number (or NaM)")
    return version
