"""The added-value suite's classifiers before and after the speed-up, side by side on the same task data.

`loc2vec bench suite --region R --json`: builds one leak-free task's masked-scene featuresets once
(venue_context, every configured baseline but the srai peers), then scores them with `score_added_value` twice,
interleaved on the same data: *before* (BLAS threads unlimited for logistic regression, OpenMP 1 for the
tree model, best_baseline fitted again) and *after* (params `evaluate.suite.fit_threads` for every fit,
best_baseline reusing the chosen baseline's fit). Reports wall and CPU seconds of each and checks that
both give the same table (macro-F1 within 1e-6: the same models).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.common import bench_region
from loc2vec.cli.project import Project
from loc2vec.evaluation import added_value
from loc2vec.evaluation.context import EvaluationContext
from loc2vec.evaluation.peers import PEERS
from loc2vec.evaluation.suite import prepare_leakfree, task_baselines
from loc2vec.training.outputs import load_encoder


def _before_fit_predict(kind, cfg, x_train, y_train, x_test):
    """The fit as it was: only the tree model's OpenMP threads capped (1), BLAS left to its default."""
    with threadpool_limits(1 if kind == "hgb" else None, user_api="openmp"):
        return added_value.suite_classifier(kind, cfg).fit(x_train, y_train).predict(x_test)


def run(
    project: Project, *, region: str | None = None, n: int | None = None, model: str | None = None
) -> dict[str, Any]:
    """Time score_added_value before/after on one task's real data (n: venue labels per class, None = params';
    the model directory: $LOC2VEC_BENCH_MODEL)."""
    region = bench_region(project, region)
    cfg = project.params.evaluate
    if n:
        cfg = cfg.model_copy(update={"labels": cfg.labels.model_copy(update={"venue_per_class": n})})
    ctx = EvaluationContext.from_params(project.params, project.info)
    encoder = load_encoder(Path(model or os.environ["LOC2VEC_BENCH_MODEL"]))  # a model directory
    # the srai peers are left out: fitting Hex2Vec costs minutes and is not what the speed-up changes
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
    }
    tables = {}
    original = added_value._fit_predict
    for side in ("before", "after"):
        added_value._fit_predict = _before_fit_predict if side == "before" else original
        try:
            w, c = time.perf_counter(), time.process_time()
            table, _, lift = added_value.score_added_value(
                data, ["loc2vec", *baselines], baselines, cfg, ctx.radius_m, reuse_fits=side == "after"
            )
            out[f"{side}_wall_s"] = round(time.perf_counter() - w, 1)
            out[f"{side}_cpu_s"] = round(time.process_time() - c, 1)
            tables[side] = table
        finally:
            added_value._fit_predict = original
    diffs = [
        abs(tables["before"][fs][k]["macro_f1"] - tables["after"][fs][k]["macro_f1"])
        for fs in tables["after"]
        for k in tables["after"][fs]
    ]
    out["max_macro_f1_difference"] = float(np.max(diffs))
    out["wall_ratio"] = round(out["before_wall_s"] / max(out["after_wall_s"], 1e-9), 2)
    out["cpu_ratio"] = round(out["before_cpu_s"] / max(out["after_cpu_s"], 1e-9), 2)
    return out
