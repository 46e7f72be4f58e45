"""`loc2vec bench NAME`: run benchmarks/NAME.py from the source checkout and print its JSON.

Benchmarks live in the top-level benchmarks/ folder (one module per target, each with
`run(project, *, region, n) -> dict`); speed targets are checked there, never by timed test asserts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from loc2vec.cli.project import Project
from loc2vec.core.errors import Loc2VecError

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def available() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_") and p.stem != "common")


def run(name: str, project: Project, *, region: str | None = None, n: int | None = None) -> dict[str, Any]:
    """Run one benchmark; returns its dict with the benchmark's name, wall time and the machine."""
    path = BENCH_DIR / f"{name}.py"
    if not path.is_file():
        raise Loc2VecError(f"unknown benchmark {name!r}; available: {', '.join(available())}")
    if str(BENCH_DIR.parent) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR.parent))
    module = importlib.import_module(f"benchmarks.{name}")
    started = time.perf_counter()
    result = module.run(project, region=region, n=n)
    result.setdefault("benchmark", name)
    result.setdefault("wall_s", round(time.perf_counter() - started, 2))
    result.setdefault(
        "machine", {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    )
    return result


def cmd_bench(args: argparse.Namespace, project: Project) -> int:
    result = run(args.what, project, region=args.region, n=args.n)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("bench", help="benchmarks (JSON)")
    s.add_argument(
        "what", help="render | tiles | metatiles | train | embed | publish | serve | features | similar | align | suite"
    )
    s.add_argument("--region", default=None)
    s.add_argument("--n", type=int, default=None, help="number of tiles/items")
    s.add_argument("--json", action="store_true", help="compact JSON on one line")
    s.set_defaults(func=cmd_bench)
