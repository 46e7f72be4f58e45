"""`loc2vec bench NAME`: run benchmarks/NAME.py from the source checkout and print its JSON.

Benchmarks live in the top-level benchmarks/ folder (one module per target, each with
`run(project, *, region, n) -> dict`); speed targets are checked there, never by timed test asserts.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
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


def run(
    name: str, project: Project, *, region: str | None = None, n: int | None = None, **options: Any
) -> dict[str, Any]:
    """Run one benchmark; returns its dict with the benchmark's name, wall time and the machine.

    `options` (None: not given) go to benchmarks whose `run` takes them (bench scale: out, sizes, max_km2, keep).
    """
    path = BENCH_DIR / f"{name}.py"
    if not path.is_file():
        raise Loc2VecError(f"unknown benchmark {name!r}; available: {', '.join(available())}")
    if str(BENCH_DIR.parent) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR.parent))
    module = importlib.import_module(f"benchmarks.{name}")
    given = {k: v for k, v in options.items() if v not in (None, False)}
    accepted = inspect.signature(module.run).parameters
    unknown = [k for k in given if k not in accepted]
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise Loc2VecError(f"bench {name} does not take {flags}")
    started = time.perf_counter()
    result = module.run(project, region=region, n=n, **given)
    result.setdefault("benchmark", name)
    result.setdefault("wall_s", round(time.perf_counter() - started, 2))
    result.setdefault(
        "machine", {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    )
    return result


def cmd_bench(args: argparse.Namespace, project: Project) -> int:
    result = run(
        args.what,
        project,
        region=args.region,
        n=args.n,
        out=args.out,
        sizes=args.sizes,
        max_km2=args.max_km2,
        keep=args.keep,
    )
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("bench", help="benchmarks (JSON)")
    s.add_argument(
        "what",
        help="render | tiles | metatiles | train | embed | publish | serve | features | similar | align | suite | scale",
    )
    s.add_argument("--region", default=None)
    s.add_argument("--n", type=int, default=None, help="number of tiles/items")
    s.add_argument("--json", action="store_true", help="compact JSON on one line")
    s.add_argument("--out", help="scale: where scale.json and scale.png go (default: a temporary directory)")
    s.add_argument("--sizes", help="scale: comma-separated sizes (li10, li40, liechtenstein, andorra, andorra_x2, …)")
    s.add_argument("--max-km2", type=float, help="scale: only sizes up to this nominal area (default 1000)")
    s.add_argument("--keep", action="store_true", help="scale: keep the bench regions' schemas and files")
    s.set_defaults(func=cmd_bench)
