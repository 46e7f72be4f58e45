"""One `loc2vec features` call, as a user runs it: a fresh process, wall and CPU seconds, on the project's store.

The default store is read without Feast (serving/online_read.py); $LOC2VEC_LOOKUP=feast reads the same store
through Feast's get_online_features. Both are run alternately, `n` calls each (default 5), same point, same
store, so the ratio is measured side by side; each call's stdout must be the same JSON. The first call of
each kind is a warm-up (page cache), not counted.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from loc2vec.core.errors import Loc2VecError

if TYPE_CHECKING:
    from loc2vec.cli.project import Project

VADUZ = (47.1410, 9.5209)
MODES = {"direct": "direct", "feast": "feast"}  # $LOC2VEC_LOOKUP per mode


def _call(mode: str, args: list[str]) -> tuple[float, float, str]:
    env = {**os.environ, "LOC2VEC_LOOKUP": MODES[mode]}
    env.pop("LD_PRELOAD", None)  # as a user's shell: the command decides on its allocator itself
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "loc2vec.cli", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise Loc2VecError(f"loc2vec features failed ({mode}): {proc.stderr.strip()[-300:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def run(project: Project, *, region: str | None = None, n: int | None = None) -> dict[str, Any]:
    """Wall/CPU seconds of `loc2vec features --lat --lon` (Vaduz) per mode, alternating; the ratio feast/direct."""
    del region  # one point of the default region's store
    n = n or 5
    del project  # the child reads the same params ($LOC2VEC_PARAMS, which --params sets, or the root's)
    args = ["features", "--lat", str(VADUZ[0]), "--lon", str(VADUZ[1])]
    times: dict[str, dict[str, list[float]]] = {m: {"wall_s": [], "cpu_s": []} for m in MODES}
    outputs = set()
    for i in range(n + 1):
        for mode in MODES:
            wall, cpu, out = _call(mode, args)
            outputs.add(out)
            if i:  # the first round warms the page cache
                times[mode]["wall_s"].append(wall)
                times[mode]["cpu_s"].append(cpu)
    if len(outputs) != 1:
        raise Loc2VecError("the direct and the Feast lookups printed different results")
    result: dict[str, Any] = {"calls_per_mode": n, "load_avg_1m": round(os.getloadavg()[0], 2)}
    for mode, t in times.items():
        result[mode] = {k: {"median": round(float(np.median(v)), 3), "max": round(max(v), 3)} for k, v in t.items()}
    ratio = result["feast"]["wall_s"]["median"] / result["direct"]["wall_s"]["median"]
    result["feast_over_direct_wall"] = round(ratio, 2)
    return result
