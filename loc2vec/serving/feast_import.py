"""Import Feast in about 1.5 s instead of 7 (measured on 2 cores), without torch.

Two things make `import feast` (0.67) slow, neither needed to read or write a store (and a third makes
its first online read slow: see `_versioned_read_supported`):

* `feast.torch_wrapper` imports torch at import time when it is installed, only so that
  `to_tensor()` can return tensors. A stand-in module imports torch on that first call instead.
* ~40 Feast classes carry typeguard's `@typechecked`, which re-parses and recompiles their source at
  import (≈5 s). Those are run-time checks of arguments' annotations; loc2vec's definitions are fixed
  and tested. Feast is imported with the decorator as a pass-through (restored right after), unless
  LOC2VEC_FEAST_TYPECHECKS=1 (for editing feature_repo/: Feast then checks every argument).

Call `import_feast()` before anything from `feast` is imported (`feast.protos` imports `feast` too); when
Feast was imported already, it does nothing.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any

TYPECHECKS_ENV = "LOC2VEC_FEAST_TYPECHECKS"


def _lazy_torch_wrapper() -> types.ModuleType:
    module = types.ModuleType("feast.torch_wrapper", "loc2vec: torch imported on first use (serving/feast_import.py)")

    def get_torch() -> Any:
        try:
            import torch
        except Exception as exc:  # like Feast's: a missing or broken torch is an ImportError when used
            raise ImportError(f"torch is not available: {exc}") from exc
        return torch

    module.get_torch = get_torch  # type: ignore[attr-defined]
    module.TORCH_AVAILABLE = True  # type: ignore[attr-defined]  # only read through get_torch()
    return module


def _passthrough(target: Any = None, **_: Any) -> Any:
    return target if target is not None else (lambda t: t)


def import_feast() -> None:
    """Import Feast the fast way (see the module docstring); a no-op once Feast is imported."""
    if "feast" in sys.modules:
        return
    sys.modules.setdefault("feast.torch_wrapper", _lazy_torch_wrapper())
    if os.environ.get(TYPECHECKS_ENV) == "1":
        import feast  # noqa: F401

        return
    import typeguard

    original = typeguard.typechecked
    typeguard.typechecked = _passthrough
    try:
        import feast  # noqa: F401
        import feast.infra.online_stores.sqlite  # noqa: F401  # the default online store's classes too
    finally:
        typeguard.typechecked = original
    from feast.infra.online_stores.online_store import OnlineStore

    global feast_versioned_read_check
    feast_versioned_read_check = OnlineStore._is_versioned_read_supported
    OnlineStore._is_versioned_read_supported = _versioned_read_supported  # type: ignore[method-assign]


feast_versioned_read_check: Any = None  # Feast's own check, kept for the test that compares the two


# The online stores Feast 0.67's OnlineStore._is_versioned_read_supported accepts, by qualified class name.
VERSIONED_READ_STORES = frozenset(
    {
        "feast.infra.online_stores.sqlite.SqliteOnlineStore",
        "feast.infra.online_stores.mysql_online_store.mysql.MySQLOnlineStore",
        "feast.infra.online_stores.postgres_online_store.postgres.PostgreSQLOnlineStore",
        "feast.infra.online_stores.faiss_online_store.FaissOnlineStore",
        "feast.infra.online_stores.redis.RedisOnlineStore",
        "feast.infra.online_stores.dynamodb.DynamoDBOnlineStore",
        "feast.infra.online_stores.milvus_online_store.milvus.MilvusOnlineStore",
    }
)


def _versioned_read_supported(self: Any) -> bool:
    """Feast's answer without its imports: Feast imports all seven stores' modules to ask isinstance (faiss,
    boto3, pymilvus, …: ~0.4 s of a lookup's 2 s, and faiss's loader lines on stderr); the same classes by
    name over the store's MRO give the same answer (tests/test_consumers.py compares the two)."""
    return any(f"{cls.__module__}.{cls.__qualname__}" in VERSIONED_READ_STORES for cls in type(self).__mro__)
