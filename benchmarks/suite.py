"""The added-value suite's classifier fits: before the speed-ups, after them in one process, and spread over
worker processes, side by side on the same task data.

`loc2vec bench suite --region R --json`: builds one leak-free task's masked-scene featuresets once
(venue_context, every configured baseline but the srai peers), then scores them with `score_added_value`
on the same data, one side after the other:

* *before*: BLAS threads unlimited for logistic regression, OpenMP 1 for the tree model, best_baseline
  fitted again, every fit in this process;
* *after*: params `evaluate.suite.fit_threads` for every fit, best_baseline reusing the chosen baseline's fit,
  every fit in this process (`suite.fit_workers: 1`);
* *workers*: as *after*, the fits spread over `suite.fit_workers: 0` processes (one per core).

Reports wall and CPU seconds of each (CPU: this process and every child process, the fit workers included)
and checks that all sides give the same table (macro-F1 within 1e-6: the same models).
`LOC2VEC_BENCH_SUITE_SIDES` (comma-separated) measures a subset.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psutil
from threadpoolctl import threadpool_limits

from benchmarks.common import bench_region
from loc2vec.cli.project import Project
from loc2vec.core.errors import ConfigError
from loc2vec.evaluation import added_value
from loc2vec.evaluation.context import EvaluationContext
from loc2vec.evaluation.peers import PEERS
from loc2vec.evaluation.suite import prepare_leakfree, task_baselines
from loc2vec.training.outputs import load_encoder

SIDES = ("before", "after", "workers")


def _before_fit_predict(kind, cfg, x_train, y_train, x_test):
    """The fit as it was: only the tree model's OpenMP threads capped (1), BLAS left to its default."""
    with threadpool_limits(1 if kind == "hgb" else None, user_api="openmp"):
        return added_value.suite_classifier(kind, cfg).fit(x_train, y_train).predict(x_test)


def _cpu_seconds(seen: dict[int, float]) -> float:
    """This process's CPU seconds plus its live children's (recursive), remembering each child's last reading
    in `seen` so that children which exit between readings still count."""
    me = psutil.Process()
    for child in me.children(recursive=True):
        try:
            t = child.cpu_times()
            seen[child.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    t = me.cpu_times()
    return t.user + t.system + sum(seen.values())


def _sides() -> tuple[str, ...]:
    raw = os.environ.get("LOC2VEC_BENCH_SUITE_SIDES")
    if not raw:
        return SIDES
    sides = tuple(s.strip() for s in raw.split(",") if s.strip())
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        raise ConfigError(f"LOC2VEC_BENCH_SUITE_SIDES: unknown {unknown}; sides are {', '.join(SIDES)}")
    return sides


def run(
    project: Project, *, region: str | None = None, n: int | None = None, model: str | None = None
) -> dict[str, Any]:
    """Time score_added_value on each side on one task's real data (n: venue labels per class, None = params';
    the model directory: $LOC2VEC_BENCH_MODEL)."""
    region = bench_region(project, region)
    sides = _sides()
    cfg = project.params.evaluate
    if n:
        cfg = cfg.model_copy(update={"labels": cfg.labels.model_copy(update={"venue_per_class": n})})
    ctx = EvaluationContext.from_params(project.params, project.info)
    encoder = load_encoder(Path(model or os.environ["LOC2VEC_BENCH_MODEL"]))  # a model directory
    # the srai peers are left out: fitting Hex2Vec costs minutes and is not what the speed-ups change
    suite = cfg.suite.model_copy(update={"baselines": tuple(b for b in cfg.suite.baselines if b not in PEERS)})
    cfg = cfg.model_copy(update={"suite": suite})
    t0 = time.perf_counter()
    data = prepare_leakfree("venue_context", region, (), cfg, ctx, encoder)
    scenes_s = time.perf_counter() - t0
    baselines = task_baselines("venue_context", cfg)
    out: dict[str, Any] = {
        "region": region,
        "task": "venue_context",
        "n_labels": len(data.labels),
        "scenes_s": round(scenes_s, 1),
        "cores": len(os.sched_getaffinity(0)),
    }
    tables = {}
    original = added_value._fit_predict
    for side in sides:
        workers = 0 if side == "workers" else 1
        side_cfg = cfg.model_copy(update={"suite": cfg.suite.model_copy(update={"fit_workers": workers})})
        added_value._fit_predict = _before_fit_predict if side == "before" else original
        seen: dict[int, float] = {}
        try:
            w, c = time.perf_counter(), _cpu_seconds(seen)
            table, _, _ = added_value.score_added_value(
                data, ["loc2vec", *baselines], baselines, side_cfg, ctx.radius_m, reuse_fits=side != "before"
            )
            out[f"{side}_wall_s"] = round(time.perf_counter() - w, 1)
            out[f"{side}_cpu_s"] = round(_cpu_seconds(seen) - c, 1)
            tables[side] = table
        finally:
            added_value._fit_predict = original
    first = tables[sides[0]]
    out["max_macro_f1_difference"] = float(
        max(
            (abs(t[fs][k]["macro_f1"] - first[fs][k]["macro_f1"]) for t in tables.values() for fs in t for k in t[fs]),
            default=0.0,
        )
    )
    for a, b in (("before", "after"), ("after", "workers"), ("before", "workers")):
        if a in tables and b in tables:
            out[f"wall_ratio_{a}_{b}"] = round(out[f"{a}_wall_s"] / max(out[f"{b}_wall_s"], 1e-9), 2)
            out[f"cpu_ratio_{a}_{b}"] = round(out[f"{a}_cpu_s"] / max(out[f"{b}_cpu_s"], 1e-9), 2)
    return out
