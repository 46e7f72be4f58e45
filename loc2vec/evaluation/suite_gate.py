"""The champion gate's score on the added-value suite: a model that only wins on leaky tasks is not promoted.

    gate_score = mean over regions × leak-free tasks of loc2vec's logreg macro-F1 (masked scenes)
               + promote.lift_weight × mean over regions × consumer tasks of the logreg lift of
                 best_baseline+loc2vec over best_baseline

Both parts are measured for every model on the same labels, scenes and folds. The models are scored
before anything is published, so loc2vec is the model on the tile it would publish for the label's
cell (featuresets.encoder_features) and the consumer baselines are those that need no feature store:
latlon, the cell tile's histogram, tag_counts, random_encoder and (transport) nearest_way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loc2vec.core.config import EvaluateConfig
from loc2vec.evaluation.added_value import REFERENCE, score_added_value
from loc2vec.evaluation.context import EvaluationContext
from loc2vec.evaluation.cv import spatial_folds
from loc2vec.evaluation.featuresets import (
    Featurizer,
    cell_tile_features,
    encoder_features,
    latlon_features,
    random_encoder_features,
    tag_count_features,
)
from loc2vec.evaluation.labels import TASKS, class_counts
from loc2vec.evaluation.leakfree import MASKED_TASKS, NEAREST_WAY_TASKS, make_leakfree_labels
from loc2vec.evaluation.run import TaskData, prepare_task
from loc2vec.evaluation.scene import tile_features
from loc2vec.evaluation.tilefeatures import encoder_tiles
from loc2vec.osm.db import require_import
from loc2vec.training.model import Encoder

GATE_BASELINES: tuple[str, ...] = ("latlon", "histogram", "tag_counts", "random_encoder", "nearest_way")


def _logreg_f1(data: TaskData, name: str, cfg: EvaluateConfig, radius_m: float) -> float:
    """Pooled logreg macro-F1 of one featureset over the task's folds."""
    table, _, _ = score_added_value(data, [name], [], cfg, radius_m, lift=False)
    return float(table[name]["logreg"]["macro_f1"])


def leakfree_scores(
    encoders: dict[str, Encoder], region: str, task: str, cfg: EvaluateConfig, ctx: EvaluationContext
) -> dict[str, float]:
    """{model: logreg macro-F1} of each model on a leak-free task (one masked render per label for all)."""
    from loc2vec.core.config import RenderConfig

    labels = make_leakfree_labels(region, task, cfg.labels, ctx.labels)
    feats = tile_features(
        labels,
        {key: encoder_tiles(enc) for key, enc in encoders.items()},
        ctx.render or RenderConfig(),
        ctx.info,
        cfg.suite.tile_batch,
    )
    folds = spatial_folds(labels, cfg.split, require_import(region, ctx.info).bbox, ctx.radius_m)
    data = TaskData(labels, folds, feats, feats, np.zeros(len(labels)), {"class_counts": class_counts(labels)})
    return {key: _logreg_f1(data, key, cfg, ctx.radius_m) for key in encoders}


def consumer_lifts(
    encoders: dict[str, Encoder], region: str, task: str, cfg: EvaluateConfig, ctx: EvaluationContext
) -> dict[str, float]:
    """{model: logreg lift of best_baseline+model over best_baseline} on a consumer task (no feature store)."""
    import torch

    from loc2vec.evaluation.scene import nearest_way
    from loc2vec.training.model import channel_coverage

    def enc_fn(enc: Encoder):
        return lambda p, m, s: encoder_features(p, enc, ctx, cfg.batch_size)

    def hist(tiles: torch.Tensor) -> np.ndarray:
        return channel_coverage(tiles).numpy()

    base = {key: enc_fn(enc) for key, enc in encoders.items()}
    base.update(
        {
            "latlon": lambda p, m, s: latlon_features(p, m),
            "histogram": lambda p, m, s: cell_tile_features(p, hist, 12, ctx, cfg.batch_size),
            "tag_counts": lambda p, m, s: tag_count_features(p, m, ctx),
            "random_encoder": lambda p, m, s: random_encoder_features(
                p, m, ctx, cfg.random_encoder_seed, cfg.batch_size
            ),
            "nearest_way": lambda p, m, s: nearest_way(p, ctx.info, ctx.radius_m),
        }
    )
    baselines = [b for b in GATE_BASELINES if b != "nearest_way" or task in NEAREST_WAY_TASKS]
    names = (*encoders, *baselines)
    data = prepare_task(task, region, None, cfg.model_copy(update={"featuresets": names}), Featurizer(base), ctx)
    out = {}
    for key in encoders:
        view = TaskData(
            data.labels,
            data.folds,
            {**data.historical, REFERENCE: data.historical[key]},
            {**data.online, REFERENCE: data.online[key]},
            data.blocks,
            data.meta,
        )
        _, _, lift = score_added_value(view, [], baselines, cfg, ctx.radius_m)
        out[key] = float(lift["lift"]["logreg"]["lift"])
    return out


def suite_gate_scores(
    encoders: dict[str, Encoder], regions: list[str], cfg: EvaluateConfig, ctx: EvaluationContext, lift_weight: float
) -> dict[str, dict[str, Any]]:
    """{model: {"score", "leakfree", "consumer_lift", "tasks": {region/task: value}}} (formula: module docstring).

    Args:
        encoders: the models compared (e.g. candidate, champion).
        regions: the regions whose labels score them.
        cfg: params `evaluate` (labels, split, suite).
        ctx: the map data and tiles.
        lift_weight: params `promote.lift_weight`.

    Returns:
        Each model's gate score and its parts, rounded to 4 decimals.
    """
    cfg = cfg.model_copy(
        update={"bootstrap": 1, "suite": cfg.suite.model_copy(update={"classifiers": ("logreg",)})}
    )  # the gate compares point scores with logreg; intervals are `evaluate --suite`'s job
    f1: dict[str, dict[str, float]] = {key: {} for key in encoders}
    lift: dict[str, dict[str, float]] = {key: {} for key in encoders}
    for region in regions:
        for task in MASKED_TASKS:
            for key, value in leakfree_scores(encoders, region, task, cfg, ctx).items():
                f1[key][f"{region}/{task}"] = round(value, 4)
        for task in TASKS:
            for key, value in consumer_lifts(encoders, region, task, cfg, ctx).items():
                lift[key][f"{region}/{task}"] = round(value, 4)
    out = {}
    for key in encoders:
        leakfree = float(np.mean(list(f1[key].values())))
        consumer = float(np.mean(list(lift[key].values())))
        out[key] = {
            "score": round(leakfree + lift_weight * consumer, 4),
            "leakfree": round(leakfree, 4),
            "consumer_lift": round(consumer, 4),
            "tasks": {**f1[key], **{f"{k}.lift": v for k, v in lift[key].items()}},
        }
    return out
