"""Import Feast in about 1.5 s instead of 7 (measured on 2 cores), without torch.

Two things make `import feast` (0.67) slow, neither needed to read or write a store:

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
