"""The champion gate: a new model version becomes `champion` only if it helps the downstream tasks more.

Why a gate: validation triplet accuracy measures the pretext task (is the positive closer than the
negative?), not what the product is for. A run that reaches a higher triplet accuracy can still
serve classifiers worse, e.g. by becoming more invariant to exactly what they need. So training only
registers a version and points the ``candidate`` alias at it (and ``champion`` too when there is
none yet); ``loc2vec promote`` then scores candidate and champion the way ``loc2vec evaluate``
scores published embeddings — the transport and venue classifiers (logistic regression, blocked
spatial K-fold, evaluation/run.py) on the very tile each model would publish for a label's H3 cell
— over the pipeline's regions, and moves ``champion`` only when the candidate's mean macro-F1 beats
the champion's by more than ``promote.min_delta``. With ``promote.score: suite`` (the default) the score is
the added-value suite's instead (evaluation/suite_gate.py): the mean leak-free loc2vec macro-F1 plus
``promote.lift_weight`` × the mean consumer lift, so a model that only wins on leaky tasks is not promoted.

Both versions get the score as the model-version tag ``gate_score``. A candidate that is the champion already
(a registry's first version: training makes it champion) is not scored: there is nothing to compare it with;
nor is one with the champion's very weights (training is deterministic, so a retrain after a change that does not
touch it reproduces them): its lead is 0 by identity.
The decision is written to data/promotion.json: the embed stage's dependency, so embeddings are recomputed
exactly when the champion moves.

The gate and the final evaluation use the same labels and folds; model selection on them makes the
winner's published score slightly optimistic. A cross-region evaluation (``--train-regions``) on a
region the gate never saw is the unbiased number.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loc2vec.core.atomic import write_text
from loc2vec.core.config import EvaluateConfig, PromoteConfig
from loc2vec.core.errors import ConfigError
from loc2vec.core.names import validate_region_name
from loc2vec.evaluation.context import EvaluationContext
from loc2vec.evaluation.featuresets import FeatureFn, Featurizer, encoder_features
from loc2vec.evaluation.labels import TASKS
from loc2vec.evaluation.run import prepare_task, score_task
from loc2vec.training.model import Encoder
from loc2vec.training.registry import CANDIDATE, CHAMPION, ModelRef, load_model, resolve_alias

log = logging.getLogger(__name__)
SCORE_FORMULAS: dict[str, str] = {
    "suite": "mean leak-free loc2vec logreg macro-F1 + {w:g} × mean consumer logreg lift over best_baseline",
    "consumer": "mean logreg macro-F1 of the consumer tasks (transport, venue)",
}


def _encoder_feature(encoder: Encoder, ctx: EvaluationContext, batch_size: int) -> FeatureFn:
    """A featureset: `encoder` on each point's cell tile, as the model would publish it."""
    return lambda points, mode, service: encoder_features(points, encoder, ctx, batch_size)


def gate_scores(
    encoders: dict[str, Encoder], regions: list[str], cfg: EvaluateConfig, ctx: EvaluationContext
) -> dict[str, dict[str, Any]]:
    """{key: {"score": mean macro-F1, "tasks": {region/task: macro-F1}}} for each model, on the same labels and folds."""
    cfg = cfg.model_copy(update={"featuresets": tuple(encoders), "bootstrap": 0})
    featurizer = Featurizer({key: _encoder_feature(enc, ctx, cfg.batch_size) for key, enc in encoders.items()})
    per_task: dict[str, dict[str, float]] = {key: {} for key in encoders}
    for region in regions:
        for task in TASKS:
            data = prepare_task(task, region, None, cfg, featurizer, ctx)
            scored, _ = score_task(data, cfg)
            for key in encoders:
                per_task[key][f"{region}/{task}"] = round(scored[key]["logreg"]["macro_f1"], 4)
    return {key: {"score": round(float(np.mean(list(t.values()))), 4), "tasks": t} for key, t in per_task.items()}


def promote(
    regions: list[str],
    out: Path,
    *,
    model_name: str,
    cfg: PromoteConfig,
    evaluate_cfg: EvaluateConfig,
    ctx: EvaluationContext,
) -> dict[str, Any]:
    """Score candidate vs champion downstream, move `champion` if the candidate wins; write promotion.json.

    Args:
        regions: the regions whose labels score the models (the pipeline's).
        out: the decision's JSON (the train stage's metric, the embed stage's dependency).
        model_name: the registered model.
        cfg: params `promote:` (min_delta).
        evaluate_cfg: params `evaluate:` (labels, folds, classifier settings).
        ctx: the map data and tiles the models are scored on.
    """
    from mlflow import MlflowClient

    regions = [validate_region_name(r) for r in regions]
    if not regions:
        raise ConfigError("promote needs regions: params.yaml pipeline.regions is empty")
    name = model_name
    candidate = resolve_alias(ctx.paths, name, CANDIDATE)
    champion = resolve_alias(ctx.paths, name, CHAMPION)
    if champion.version == candidate.version:  # the first version, or one promoted before: nothing to compare
        return _write_decision(out, _already_champion(name, regions, candidate, cfg))
    refs = {"candidate": candidate, "champion": champion}
    encoders = {key: load_model(ctx.paths, ref, ctx.model) for key, ref in refs.items()}
    if same_weights(encoders["candidate"], encoders["champion"]):
        return _write_decision(out, _same_as_champion(name, regions, candidate, champion, cfg))
    if cfg.score == "suite":
        from loc2vec.evaluation.suite_gate import suite_gate_scores

        scores = suite_gate_scores(encoders, regions, evaluate_cfg, ctx, cfg.lift_weight)
    else:
        scores = gate_scores(encoders, regions, evaluate_cfg, ctx)
    client = MlflowClient()
    for key, ref in refs.items():
        client.set_model_version_tag(name, ref.version, "gate_score", str(scores[key]["score"]))
    lead = scores["candidate"]["score"] - scores["champion"]["score"]
    promoted = lead > cfg.min_delta
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, candidate.version)
    winner = candidate if promoted else champion
    result = {
        "model_name": name,
        "regions": regions,
        "candidate_version": candidate.version,
        "previous_champion_version": champion.version,
        "champion_version": winner.version,
        "promoted": promoted,
        "candidate_score": scores["candidate"]["score"],
        "champion_score": scores["champion"]["score"],
        "candidate_lead": round(lead, 4),
        "min_delta": cfg.min_delta,
        "score_formula": SCORE_FORMULAS[cfg.score].format(w=cfg.lift_weight),
        "candidate_tasks": scores["candidate"]["tasks"],
        "champion_tasks": scores["champion"]["tasks"],
    }
    _write_decision(out, result)
    log.info(
        "%s: candidate v%s scores %.4f, champion v%s %.4f → champion is v%s%s",
        name,
        candidate.version,
        result["candidate_score"],
        champion.version,
        result["champion_score"],
        winner.version,
        " (promoted)" if promoted else "",
    )
    return result


def _already_champion(name: str, regions: list[str], candidate: ModelRef, cfg: PromoteConfig) -> dict[str, Any]:
    """The decision when the candidate is the champion already (a registry's first version, which training makes
    champion, or a re-run after its promotion): scoring it would compare it with itself, ~90 s of a fresh
    `make run` for nothing (`evaluate@R` scores it anyway). Its scores are null, not made up."""
    log.info(
        "%s: candidate v%s is the champion already: nothing to compare it with (not scored)", name, candidate.version
    )
    return _unscored(name, regions, candidate, candidate, cfg, lead=None, promoted=False)


def same_weights(a: Encoder, b: Encoder) -> bool:
    """The same architecture and bit-identical weights (and BatchNorm statistics): the same model."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


def _same_as_champion(
    name: str, regions: list[str], candidate: ModelRef, champion: ModelRef, cfg: PromoteConfig
) -> dict[str, Any]:
    """The decision when the candidate has the champion's very weights (a retrain that reproduced them: training is
    deterministic, so any re-run after a change that does not touch training does it): both would score the same
    (measured: 0.3867 and 0.3867, ~110 s of scoring on 2 cores), so the lead is 0 by identity and the usual rule
    decides. Its scores are null, not made up."""
    promoted = cfg.min_delta < 0.0  # a lead of 0 beats min_delta only when that is negative
    if promoted:
        from mlflow import MlflowClient

        MlflowClient().set_registered_model_alias(name, CHAMPION, candidate.version)
    log.info(
        "%s: candidate v%s has the weights of champion v%s: not scored (lead 0)%s",
        name,
        candidate.version,
        champion.version,
        " → promoted (promote.min_delta < 0)" if promoted else "",
    )
    return {
        **_unscored(name, regions, candidate, champion, cfg, lead=0.0, promoted=promoted),
        "same_weights_as_champion": True,
    }


def _unscored(
    name: str,
    regions: list[str],
    candidate: ModelRef,
    champion: ModelRef,
    cfg: PromoteConfig,
    *,
    lead: float | None,
    promoted: bool,
) -> dict[str, Any]:
    """A decision made without scoring either version: scores null, not made up."""
    return {
        "model_name": name,
        "regions": regions,
        "candidate_version": candidate.version,
        "previous_champion_version": champion.version,
        "champion_version": candidate.version if promoted else champion.version,
        "promoted": promoted,
        "candidate_score": None,
        "champion_score": None,
        "candidate_lead": lead,
        "min_delta": cfg.min_delta,
        "score_formula": SCORE_FORMULAS[cfg.score].format(w=cfg.lift_weight),
        "candidate_tasks": {},
        "champion_tasks": {},
    }


def _write_decision(out: Path, result: dict[str, Any]) -> dict[str, Any]:
    write_text(out, json.dumps(result, indent=1) + "\n")
    return result
