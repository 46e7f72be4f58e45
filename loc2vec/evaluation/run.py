"""Downstream evaluation: do loc2vec embeddings help predict transport mode and venue type? (the `evaluate` stage)

The labels come from OSM itself (evaluation/labels.py); each labelled point gets every featureset of
evaluation/featuresets.py; the classifiers (evaluation/classifiers.py) are scored with spatial
cross-validation (evaluation/cv.py). A row missing any featureset (its cell was never embedded) is
dropped for all of them, so every featureset is scored on the same points. With ``train_regions`` the
classifiers train on all labels of those regions and test on all labels of the evaluated one (transfer:
no buffer needed); classes never seen in training are not scored.

Uncertainty: ``meta.tasks.<task>.bootstrap`` holds 95% block-bootstrap intervals (whole spatial blocks
resampled, ``bootstrap`` times) of every macro-F1 and of loc2vec's lead over each other featureset.

Output: JSON ``{"tasks": {task: {featureset: {classifier: {"accuracy", "macro_f1"}}}}, "meta": …}``
written atomically, logged to MLflow (experiment ``evaluate.experiment``) with flattened metrics,
and ``eval_score`` = mean macro-F1 of loc2vec/logreg over the tasks, set as a tag of the evaluated
model version (the one that made the embeddings; the champion gate, evaluation/gate.py, tags
``gate_score`` computed the same way before publishing). A transfer run tags
``eval_score_transfer`` instead, so champions are compared on in-region scores only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loc2vec.core.atomic import write_text
from loc2vec.core.config import EvaluateConfig
from loc2vec.core.errors import ConfigError, Loc2VecError
from loc2vec.core.names import validate_region_name
from loc2vec.core.tracking import flatten_params, setup_mlflow
from loc2vec.embedding.store import embedding_model
from loc2vec.evaluation.classifiers import CLASSIFIERS, SERVICES, make_classifier, scores
from loc2vec.evaluation.context import EvaluationContext
from loc2vec.evaluation.cv import Fold, Predictions, block_bootstrap, spatial_folds
from loc2vec.evaluation.featuresets import FeastFeature, Featurizer
from loc2vec.evaluation.labels import TASKS, class_counts, make_labels
from loc2vec.osm.db import require_import
from loc2vec.sampling.split import assign_blocks

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    """One task's labels and folds, with each featureset on both paths (historical: train rows, online: test rows)."""

    labels: pd.DataFrame
    folds: list[Fold]
    historical: dict[str, np.ndarray]
    online: dict[str, np.ndarray]  # rows never tested stay NaN
    blocks: np.ndarray  # sampling block of each row (in the evaluated region's frame): the bootstrap's unit
    meta: dict[str, Any]


def prepare_task(
    task: str,
    region: str,
    train_regions: Sequence[str] | None,
    cfg: EvaluateConfig,
    featurizer: Featurizer,
    ctx: EvaluationContext,
    labels: pd.DataFrame | None = None,
    fixed: Mapping[str, np.ndarray] | None = None,
) -> TaskData:
    """Labels → features (rows lacking any featureset are dropped) → folds → online features of test rows.

    Args:
        task: "transport" or "venue".
        region: the evaluated region.
        train_regions: train on these regions instead (transfer).
        cfg: params `evaluate` (labels, split, featuresets).
        featurizer: computes the featuresets.
        ctx: the feature store and map data.
        labels: the labels of the task (default: made here from the regions).
        fixed: featuresets computed beforehand for `labels` (row-aligned), the same on both paths: functions of the
            point alone (the suite inputs' stored baselines); the others are computed here, on both paths.

    Returns:
        The task's labels, folds and features.
    """
    source = ctx.labels
    if labels is None:
        labels = make_labels(region, task, cfg.labels, source)
        if train_regions:
            labels = pd.concat(
                [*(make_labels(r, task, cfg.labels, source) for r in train_regions), labels], ignore_index=True
            )
    fixed = dict(fixed or {})
    service = SERVICES[task]
    names = list(cfg.featuresets)
    computed = [n for n in names if n not in fixed]
    n_labels = len(labels)

    # the historical path tells which rows have every featureset (cells never embedded have none)
    hist = {**featurizer.compute(labels, computed, "historical", service), **fixed}
    hist = {k: hist[k] for k in names}
    ok = np.logical_and.reduce([np.isfinite(v).all(axis=1) for v in hist.values()])
    is_eval = (labels["region"] == region).to_numpy()
    if train_regions:  # a class never seen in the training regions cannot be predicted: not scored
        ok &= labels["label"].isin(set(labels.loc[~is_eval & ok, "label"])).to_numpy()
    labels, hist, is_eval = labels[ok].reset_index(drop=True), {k: v[ok] for k, v in hist.items()}, is_eval[ok]
    bbox = require_import(region, ctx.info).bbox
    if train_regions:
        folds = [Fold(np.flatnonzero(~is_eval), np.flatnonzero(is_eval))]
    else:
        folds = spatial_folds(labels, cfg.split, bbox, ctx.radius_m)
    split = cfg.split
    blocks, _ = assign_blocks(
        labels["lat"].to_numpy(float), labels["lon"].to_numpy(float), bbox, split.block_m, split.seed
    )

    tested = np.unique(np.concatenate([f.test for f in folds]))
    online = {k: np.full_like(v, np.nan) for k, v in hist.items()}
    got = featurizer.compute(labels.iloc[tested], computed, "online", service)
    got.update({k: hist[k][tested] for k in names if k in fixed})
    for k in names:
        online[k][tested] = got[k]
    skew = {k: float(np.max(np.abs(got[k] - hist[k][tested]), initial=0.0)) for k in names}
    meta = {
        "n_labels": int(n_labels),
        "n_dropped_missing_features_or_class": int((~ok).sum()),
        "n_tested": int(len(tested)),
        "folds": len(folds),
        "mean_train_per_fold": float(np.mean([len(f.train) for f in folds])),
        "n_dropped_buffer_per_fold": [f.n_buffer for f in folds],
        "classes": sorted(set(labels["label"].iloc[tested])),
        "class_counts_tested": class_counts(labels.iloc[tested]),
        "class_counts_train_regions": class_counts(labels[~is_eval]) if train_regions else None,
        "online_vs_historical_max_abs_diff": skew,
        "feast_service": service,
    }
    return TaskData(labels, folds, hist, online, blocks, meta)


def score_task(data: TaskData, cfg: EvaluateConfig) -> tuple[dict[str, dict[str, dict[str, float]]], Predictions]:
    """{featureset: {classifier: {accuracy, macro_f1}}} pooled over the folds' test rows, and the predictions."""
    y = data.labels["label"].to_numpy()
    tested = np.concatenate([f.test for f in data.folds])
    out: dict[str, dict[str, dict[str, float]]] = {}
    preds: Predictions = {}
    for name in cfg.featuresets:
        out[name] = {}
        for kind in CLASSIFIERS:
            pred = np.empty(len(y), dtype=object)
            for fold in data.folds:
                if len(set(y[fold.train])) < 2:
                    raise Loc2VecError("a fold trains on fewer than two classes; change evaluate.split")
                model = make_classifier(kind, cfg, len(fold.train)).fit(
                    data.historical[name][fold.train], y[fold.train]
                )
                pred[fold.test] = model.predict(data.online[name][fold.test])
            out[name][kind] = scores(y[tested], pred[tested])
            preds[(name, kind)] = pred[tested]
    return out, preds


def eval_score(tasks: Mapping[str, Mapping[str, Any]]) -> float:
    """Mean macro-F1 of loc2vec with logistic regression over the tasks: the model-selection number."""
    return float(np.mean([t["loc2vec"]["logreg"]["macro_f1"] for t in tasks.values()]))


def evaluate(
    region: str,
    out: Path,
    cfg: EvaluateConfig,
    ctx: EvaluationContext,
    *,
    train_regions: Sequence[str] | None = None,
    featurizer: Featurizer | None = None,
    track: bool = True,
    registered_model: str = "loc2vec-encoder",
) -> dict[str, Any]:
    """Evaluate the published embeddings of `region` on both tasks; write JSON, log to MLflow, tag the model.

    Args:
        region: the region to test on (ingested, embedded and published).
        out: the metrics JSON to write (atomically).
        cfg: params `evaluate:`.
        ctx: the feature store, map data and encoders' tiles (EvaluationContext.from_params).
        train_regions: train the classifiers on these regions instead (cross-region transfer).
        featurizer: the featuresets (default: Featurizer.default).
        track: log to MLflow and tag the evaluated model version.
        registered_model: the model whose version is tagged when the embeddings do not name one.

    Returns:
        The JSON written: ``tasks.<task>.<featureset>.<classifier>.{accuracy, macro_f1}`` and ``meta``.
    """
    validate_region_name(region)
    train_regions = [validate_region_name(r) for r in (train_regions or []) if r]
    if region in train_regions:
        raise ConfigError(f"--train-regions must not include the evaluated region {region!r}")
    featurizer = featurizer or Featurizer.default(cfg, ctx)
    tasks: dict[str, Any] = {}
    metas: dict[str, Any] = {}
    for task in TASKS:
        data = prepare_task(task, region, train_regions, cfg, featurizer, ctx)
        tasks[task], preds = score_task(data, cfg)
        metas[task] = data.meta
        if cfg.bootstrap:
            tested = np.concatenate([f.test for f in data.folds])
            y = data.labels["label"].to_numpy()[tested]
            metas[task]["bootstrap"] = block_bootstrap(y, preds, data.blocks[tested], cfg.bootstrap, cfg.split.seed)
        log.info("%s %s: %d points tested in %d folds", region, task, data.meta["n_tested"], data.meta["folds"])
    result: dict[str, Any] = {"tasks": tasks}
    model = embedding_model(ctx.paths.embeddings(region))
    feast_embedding = featurizer.base.get("loc2vec")
    if isinstance(feast_embedding, FeastFeature):
        served = feast_embedding.served_model()
        if served and model and served != model:
            log.warning("Feast serves %s but %s is %s: publish again?", served, ctx.paths.embeddings(region), model)
        model = served or model
    result["meta"] = {
        "region": region,
        "train_regions": train_regions or None,
        "split": "regions" if train_regions else "spatial_blocks",
        "eval_score": eval_score(tasks) if all("loc2vec" in t for t in tasks.values()) else None,
        "model": model,
        "tasks": metas,
    }
    path = Path(out)
    write_text(path, json.dumps(result, indent=2, sort_keys=False) + "\n")
    if track:
        log_to_mlflow(result, path, cfg, ctx, registered_model)
    return result


def _metric_name(key: str) -> str:
    return key.replace("+", "_plus_")  # MLflow metric names allow [A-Za-z0-9_./ -] only


def log_to_mlflow(
    result: dict[str, Any], path: Path, cfg: EvaluateConfig, ctx: EvaluationContext, registered_model: str
) -> str:
    """One run in the evaluation experiment: params, flattened metrics, the JSON; then tag the model version."""
    mlflow = setup_mlflow(cfg.experiment, ctx.paths)
    meta = result["meta"]
    metrics = flatten_params("", result["tasks"], {})
    with mlflow.start_run(run_name=f"evaluate-{meta['region']}") as run:
        params = flatten_params("evaluate", cfg.model_dump(mode="json"), {})
        params.update(
            {
                "region": meta["region"],
                "train_regions": ",".join(meta["train_regions"] or []) or "-",
                "model_name": meta["model"].get("name", "-"),
                "model_version": meta["model"].get("version", "-"),
            }
        )
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics({_metric_name(k): float(v) for k, v in metrics.items()})
        if meta["eval_score"] is not None:
            mlflow.log_metric("eval_score", meta["eval_score"])
        mlflow.log_artifact(str(path))
        run_id = run.info.run_id
    if meta["eval_score"] is not None:
        tag_model_version(meta, run_id, registered_model)
    return run_id


def tag_model_version(meta: dict[str, Any], run_id: str, registered_model: str) -> str | None:
    """Set eval_score (eval_score_transfer for a cross-region run) on the evaluated model version."""
    from mlflow import MlflowClient

    from loc2vec.training.registry import CHAMPION

    client = MlflowClient()
    name = meta["model"].get("name") or registered_model
    version = meta["model"].get("version")
    try:
        if not version or not str(version).isdigit():
            version = client.get_model_version_by_alias(name, CHAMPION).version
        client.get_model_version(name, str(version))
    except Exception as exc:  # no registry entry: nothing to tag (e.g. embeddings of an unregistered model)
        log.warning("cannot tag model %s version %s with the evaluation score: %s", name, version, exc)
        return None
    key = "eval_score_transfer" if meta["train_regions"] else "eval_score"
    client.set_model_version_tag(name, str(version), key, str(meta["eval_score"]))
    client.set_model_version_tag(name, str(version), f"{key}_run_id", run_id)
    client.set_model_version_tag(name, str(version), f"{key}_region", meta["region"])
    log.info("model %s version %s: %s = %.4f", name, version, key, meta["eval_score"])
    return str(version)
