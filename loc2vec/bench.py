"""`loc2vec bench NAME`: run benchmarks/NAME.py from the source checkout and return its JSON dict.

Benchmarks live in the top-level benchmarks/ folder (one module per target, each with
`run(*, region, n) -> dict`); speed targets are checked there, never by timed test asserts.
"""

from __future__ import annotations

import importlib
import platform
import sys
import time
from pathlib import Path
from typing import Any

from loc2vec.errors import Loc2VecError

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def available() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_") and p.stem != "common")


def run(name: str, *, region: str | None = None, n: int | None = None) -> dict[str, Any]:
    path = BENCH_DIR / f"{name}.py"
    if not path.is_file():
        raise Loc2VecError(f"unknown benchmark {name!r}; available: {', '.join(available())}")
    if str(BENCH_DIR.parent) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR.parent))
    module = importlib.import_module(f"benchmarks.{name}")
    started = time.perf_counter()
    result = module.run(region=region, n=n)
    result.setdefault("benchmark", name)
    result.setdefault("wall_s", round(time.perf_counter() - started, 2))
    result.setdefault(
        "machine", {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    )
    return result
