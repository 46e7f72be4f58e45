"""Aligned retrains (serving/procrustes.py): does a classifier trained on the old version's features survive a
new version, unaligned, Procrustes-aligned, or only retrained?

Two embeddings Parquets of one region (the same cells, two model versions):
``$LOC2VEC_BENCH_OLD_EMBEDDINGS`` and ``$LOC2VEC_BENCH_NEW_EMBEDDINGS`` (default: the two newest model
versions of the region in the published offline store, data/feast/embeddings.parquet). The rotation is fitted
on every cell the two share (no labels: what publish does), then, on the transport and venue tasks' labels
and blocked spatial folds as `loc2vec evaluate` builds them (evaluation/run.py; labels whose cell either
version lacks are dropped), logistic-regression macro-F1 pooled over the folds:

* ``old_on_old``: trained on the old version's features, applied to the old version's (the reference);
* ``old_on_new``: the same classifiers applied to the new version's features, unaligned;
* ``old_on_aligned``: the same classifiers applied to the new version's features rotated into the old space;
* ``retrained_on_new``: classifiers trained and applied on the new version's features.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.common import bench_region
from loc2vec.cli.project import Project

OLD_ENV, NEW_ENV = "LOC2VEC_BENCH_OLD_EMBEDDINGS", "LOC2VEC_BENCH_NEW_EMBEDDINGS"


def _tables(project: Project, region: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    cols = ["h3_cell", "embedding", "model_name", "model_version", "region"]
    if os.environ.get(OLD_ENV) and os.environ.get(NEW_ENV):
        return tuple(pd.read_parquet(Path(os.environ[k]), columns=cols) for k in (OLD_ENV, NEW_ENV))  # type: ignore[return-value]
    offline = pd.read_parquet(project.paths.offline_store, columns=cols)
    offline = offline[offline["region"] == region]
    versions = sorted(offline["model_version"].unique(), key=int)
    if len(versions) < 2:
        raise SystemExit(
            f"need two model versions of {region} in {project.paths.offline_store}, or ${OLD_ENV}/${NEW_ENV}"
        )
    return offline[offline["model_version"] == versions[-2]], offline[offline["model_version"] == versions[-1]]


def run(project: Project, *, region: str | None = None, n: int | None = None) -> dict[str, Any]:
    from loc2vec.evaluation.classifiers import make_classifier, scores
    from loc2vec.evaluation.context import EvaluationContext
    from loc2vec.evaluation.featuresets import Featurizer
    from loc2vec.evaluation.labels import TASKS
    from loc2vec.evaluation.run import prepare_task
    from loc2vec.serving.procrustes import fit_alignment

    region = bench_region(project, region)
    old, new = _tables(project, region)
    old, new = old.set_index("h3_cell"), new.set_index("h3_cell")
    shared = old.index.intersection(new.index).sort_values()
    x_old = np.stack(old.loc[shared, "embedding"].to_numpy()).astype(np.float32)
    x_new = np.stack(new.loc[shared, "embedding"].to_numpy()).astype(np.float32)
    alignment = fit_alignment(x_new, x_old)
    features = {"old": x_old, "new": x_new, "aligned": alignment.apply(x_new)}
    row = {c: i for i, c in enumerate(shared)}

    def lookup(name: str):
        def fn(points, mode, service) -> np.ndarray:
            at = np.array([row.get(c, -1) for c in points["h3_cell"]], dtype=np.int64)
            out = np.full((len(points), x_old.shape[1]), np.nan)
            out[at >= 0] = features[name][at[at >= 0]]
            return out

        return fn

    cfg = project.params.evaluate.model_copy(update={"featuresets": tuple(features), "bootstrap": 0})
    ctx = EvaluationContext.from_params(project.params, project.info)
    featurizer = Featurizer({k: lookup(k) for k in features})
    tasks: dict[str, Any] = {}
    for task in TASKS:
        data = prepare_task(task, region, None, cfg, featurizer, ctx)
        y = data.labels["label"].to_numpy()
        tested = np.concatenate([f.test for f in data.folds])
        pred = {
            k: np.empty(len(y), dtype=object)
            for k in ("old_on_old", "old_on_new", "old_on_aligned", "retrained_on_new")
        }
        for fold in data.folds:
            old_model = make_classifier("logreg", cfg, len(fold.train)).fit(
                data.historical["old"][fold.train], y[fold.train]
            )
            for key, name in (("old_on_old", "old"), ("old_on_new", "new"), ("old_on_aligned", "aligned")):
                pred[key][fold.test] = old_model.predict(data.online[name][fold.test])
            new_model = make_classifier("logreg", cfg, len(fold.train)).fit(
                data.historical["new"][fold.train], y[fold.train]
            )
            pred["retrained_on_new"][fold.test] = new_model.predict(data.online["new"][fold.test])
        tasks[task] = {
            **{k: round(scores(y[tested], p[tested])["macro_f1"], 4) for k, p in pred.items()},
            "n_tested": len(tested),
            "folds": len(data.folds),
        }
    return {
        "region": region,
        "old_version": str(old["model_version"].iloc[0]),
        "new_version": str(new["model_version"].iloc[0]),
        "shared_cells": len(shared),
        "residual": round(alignment.residual, 4),
        "residual_unaligned": round(alignment.residual_unaligned, 4),
        "macro_f1": tasks,
    }
