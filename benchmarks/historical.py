"""A point-in-time retrieval as a consumer trains from it: `historical_features` of `n` published cells (default
1,000), with dask's own tokens for Feast's file offline store and with loc2vec's fast path
(serving/dask_tokens.py), each in a fresh process (the registration is per process), alternately, `rounds`
times each (default 2), on the same cells and the same store; both must return the same values.

Needs a published store (`make run`). The cells are drawn with a fixed seed from the region's embeddings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.common import bench_region
from loc2vec.core.errors import Loc2VecError

if TYPE_CHECKING:
    from loc2vec.cli.project import Project

SIDES = ("dask", "fast")
SERVICE = "transport_mode_v1"
CHILD = """
import hashlib, json, sys, time
import numpy as np, pandas as pd
from loc2vec.serving import dask_tokens
side, region, n, service = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if side == "dask":
    dask_tokens._REGISTERED = True  # dask's own normaliser only
from loc2vec.cli.project import Project
from loc2vec.serving import lookup
from loc2vec.serving.store import StoreSettings
project = Project.load()
settings = StoreSettings.from_config(project.params.publish, project.params.embed, project.paths, project.info)
cells = pd.read_parquet(project.paths.embeddings(region), columns=["h3_cell"])["h3_cell"].to_numpy(dtype=str)
cells = np.sort(np.random.default_rng(0).choice(cells, size=min(n, len(cells)), replace=False))
entity = pd.DataFrame({"h3_cell": cells, "event_timestamp": pd.Timestamp.now(tz="UTC")})
lookup.feature_store(settings)  # building the store is not the retrieval
t0 = time.perf_counter()
got = lookup.historical_features(entity, service, settings)
seconds = time.perf_counter() - t0
digest = hashlib.sha256()
for column in sorted(set(got.columns) - {"event_timestamp"}):
    for value in got[column]:
        digest.update(np.asarray(value).tobytes() if isinstance(value, np.ndarray) else repr(value).encode())
print(json.dumps({"seconds": seconds, "rows": len(got), "digest": digest.hexdigest()}))
"""


def _child(side: str, region: str, n: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, side, region, str(n), SERVICE], capture_output=True, text=True, env=os.environ
    )
    if proc.returncode != 0:
        raise Loc2VecError(f"historical retrieval failed ({side}): {proc.stderr.strip()[-400:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(project: Project, *, region: str | None = None, n: int | None = None) -> dict[str, Any]:
    """Seconds of one historical retrieval per side (median of the rounds) and the ratio dask / fast."""
    region = bench_region(project, region)
    if not project.paths.embeddings(region).exists():
        raise Loc2VecError(f"no embeddings of {region!r} to draw cells from: run `make run` first")
    rows = n or 1000
    rounds = int(os.environ.get("LOC2VEC_BENCH_HISTORICAL_ROUNDS", "2"))
    seconds: dict[str, list[float]] = {side: [] for side in SIDES}
    digests = set()
    for _ in range(rounds):
        for side in SIDES:
            out = _child(side, region, rows)
            seconds[side].append(out["seconds"])
            digests.add(out["digest"])
    if len(digests) != 1:
        raise Loc2VecError("the two sides returned different features")
    result: dict[str, Any] = {"region": region, "service": SERVICE, "rows": rows, "rounds": rounds}
    for side, values in seconds.items():
        result[side] = {"seconds_median": round(float(np.median(values)), 2), "seconds": [round(v, 2) for v in values]}
    result["dask_over_fast"] = round(result["dask"]["seconds_median"] / result["fast"]["seconds_median"], 1)
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return result
