"""The added-value suite: what the embedding adds over the baselines an engineer would use (`evaluate --suite`).

Suites:

* ``leakfree`` – venue_context, transport_context, building_type, road_surface (evaluation/leakfree.py). Every
  featureset of a label comes from its masked scene (evaluation/scene.py): ``loc2vec`` (the given
  encoder on the masked tile rendered at the point), ``loc2vec_wide`` (the same encoder's 32-D representation
  before its projection, `Encoder.representation`, added to best_baseline like loc2vec: ``best_baseline+loc2vec_wide``
  and ``lift_loc2vec_wide``), ``histogram``, ``tag_counts`` (log1p),
  ``random_encoder`` (the same architecture untrained, seeded), ``random_wide`` (evaluation/tilefeatures.py),
  ``latlon``, for transport_context and road_surface ``nearest_way``, and the srai peers ``srai_contextual_counts`` and
  ``srai_hex2vec`` (evaluation/peers.py: fitted once per run on the training region(s), each label's object
  removed from their inputs).
* ``consumer`` – the consumer tasks transport and venue as `loc2vec evaluate` scores them (loc2vec and the
  histogram from Feast: historical for training rows, online for tested rows), plus ``nearest_way``
  for transport, ``random_wide`` on each point's cell tile (as ``random_encoder``) and the srai peers
  (fitted as for the leak-free tasks, each label's plain scene: these tasks are not masked).
* ``all`` – both.

The model-independent part (labels, masked tiles, every baseline, the peers, the baselines' fits; for the
consumer tasks all but what is read from the feature store, CONSUMER_FEAST) can be built once per region
(evaluation/suite_inputs.py, the ``suite_inputs@R`` stage) and passed as ``inputs``: the scores are the same
(tests/test_suite.py, tests/test_evaluate.py).

Each task is scored by evaluation/added_value.py (every featureset, best_baseline, best_baseline+loc2vec,
the lift and its interval) under blocked spatial CV, or trained on ``train_regions`` and tested on the
region (transfer; ``suite.per_region_standardise`` z-scores each featureset within each region first).

Output JSON: ``tasks.<task>.<featureset>.<classifier>.{accuracy, macro_f1}``,
``tasks.<task>.lift.<classifier> = {best_baseline, lift, ci95, chosen_per_fold}`` (leak-free tasks also
``lift_loc2vec_wide``: the consumer tasks read loc2vec from Feast, which publishes no wide view), and ``meta`` (per task:
counts, folds, block-bootstrap intervals of every macro-F1, seconds; ``leakfree_score`` = mean loc2vec
logreg macro-F1 over the three masked leak-free tasks, MASKED_TASKS: road_surface, which hides nothing, is reported
but not in it; ``consumer_lift`` = mean logreg lift over the consumer tasks).
A PNG chart of macro-F1 per featureset with intervals is written beside it; both go to MLflow.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from loc2vec.core.config import SUITE_BASELINES, EvaluateConfig, ModelConfig, RenderConfig
from loc2vec.core.errors import ConfigError, Loc2VecError
from loc2vec.core.names import validate_region_name
from loc2vec.core.tracking import setup_mlflow
from loc2vec.evaluation.added_value import REFERENCE, WIDE, BaselineFits, lift_key, score_added_value
from loc2vec.evaluation.context import EvaluationContext
from loc2vec.evaluation.cv import Fold, block_bootstrap, spatial_folds
from loc2vec.evaluation.featuresets import Featurizer, cell_tile_features
from loc2vec.evaluation.labels import TASKS, class_counts, make_labels
from loc2vec.evaluation.leakfree import (
    LEAKFREE_TASKS,
    MASKED_TASKS,
    NEAREST_WAY_TASKS,
    building_coverage,
    make_leakfree_labels,
    surface_coverage,
)
from loc2vec.evaluation.peers import PEERS, Peers, check_sources, drop_empty_columns, fit_regions_of, require_srai
from loc2vec.evaluation.provenance import run_info_path, write_result
from loc2vec.evaluation.run import TaskData, prepare_task
from loc2vec.evaluation.scene import histogram, nearest_way, scene_tag_counts, tile_features
from loc2vec.evaluation.tilefeatures import RandomWide, encoder_tiles, untrained_encoder
from loc2vec.osm.db import require_import
from loc2vec.sampling.split import assign_blocks
from loc2vec.training.model import Encoder

log = logging.getLogger(__name__)

SUITES: dict[str, tuple[str, ...]] = {"leakfree": LEAKFREE_TASKS, "consumer": TASKS, "all": (*LEAKFREE_TASKS, *TASKS)}
CONSUMER_BASELINES: tuple[str, ...] = SUITE_BASELINES
CONSUMER_FEAST: tuple[str, ...] = (REFERENCE, "histogram")  # the consumer featuresets read from the feature store
# (the published embedding and the tile histogram published with it); every other consumer baseline is a function of
# the label point alone (PostGIS, the region's metatiles, the peers) and is stored in the suite inputs
# srai_* (evaluation/peers.py): fitted on the training region(s); on the leak-free tasks computed on masked
# scenes, on the consumer tasks (not masked: they are the leaky ones) on each label's plain scene


def task_baselines(task: str, cfg: EvaluateConfig) -> list[str]:
    """The suite's baselines that apply to a task (nearest_way: the transport and road tasks only)."""
    out: list[str] = [b for b in cfg.suite.baselines if b != "nearest_way" or task in NEAREST_WAY_TASKS]
    return [b for b in out if b in CONSUMER_BASELINES] if task in TASKS else out


def scene_featuresets(
    labels: pd.DataFrame,
    task: str,
    cfg: EvaluateConfig,
    ctx: EvaluationContext,
    encoder: Encoder | None,
    peers: Peers | None = None,
    seconds: dict[str, float] | None = None,
    sink: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> dict[str, np.ndarray]:
    """Every featureset of the labels, all from their masked scenes (row-aligned, float).

    Args:
        labels: leak-free labels (with hidden_table, hidden_id).
        task: the leak-free task.
        cfg: params `evaluate` (suite, random_encoder_seed).
        ctx: the database, tile radius and geometry.
        encoder: the model measured (`loc2vec`); None: the baselines only (the suite's inputs stage).
        peers: the srai peers of this run (fitted once; needed when a srai_* baseline is wanted).
        seconds: if given, adds the seconds of each phase (render, each featureset).
        sink: if given, receives each batch of masked tiles with its row indices (scene.tile_features).

    Returns:
        {featureset: (n, d)}.
    """
    s = cfg.suite
    clock = seconds if seconds is not None else {}
    wanted = {REFERENCE, WIDE, *task_baselines(task, cfg)}
    fns: dict[str, Callable[[np.ndarray], np.ndarray]] = {"histogram": histogram}
    if encoder is not None:
        fns[REFERENCE] = encoder_tiles(encoder)
        fns[WIDE] = encoder_tiles(encoder, wide=True)
    if "random_encoder" in wanted:
        fns["random_encoder"] = encoder_tiles(untrained_encoder(cfg_model(encoder, ctx), cfg.random_encoder_seed))
    if "random_wide" in wanted:
        fns["random_wide"] = RandomWide(s.random_wide_features, s.random_wide_seed)
    out = tile_features(labels, fns, ctx.render or RenderConfig(), ctx.info, s.tile_batch, clock, sink)
    t0 = time.perf_counter()
    out["tag_counts"] = np.log1p(scene_tag_counts(labels, ctx.info, ctx.radius_m))
    clock["tag_counts"] = clock.get("tag_counts", 0.0) + time.perf_counter() - t0
    out["latlon"] = labels[["lat", "lon"]].to_numpy(float)
    if "nearest_way" in wanted:
        t0 = time.perf_counter()
        out["nearest_way"] = nearest_way(labels, ctx.info, ctx.radius_m)
        clock["nearest_way"] = clock.get("nearest_way", 0.0) + time.perf_counter() - t0
    for name in PEERS:
        if name in wanted:
            if peers is None:
                raise Loc2VecError(f"{name} needs the srai peers of the run")
            t0 = time.perf_counter()
            x = peers.embed(name, labels)
            out[name] = drop_empty_columns(x) if name == "srai_contextual_counts" else x  # 651 tag values, most absent
            clock[name] = clock.get(name, 0.0) + time.perf_counter() - t0
    return {k: v for k, v in out.items() if k in wanted}


def cfg_model(encoder: Encoder | None, ctx: EvaluationContext) -> ModelConfig:
    """The architecture of `random_encoder`: the measured encoder's, else params' (the inputs stage)."""
    return encoder.cfg if encoder is not None else ctx.model


def _per_region_standardise(features: dict[str, np.ndarray], regions: np.ndarray) -> dict[str, np.ndarray]:
    """Each featureset z-scored within each region (transfer: regions differ in density and mix)."""
    out = {}
    for name, x in features.items():
        z = x.copy()
        for r in np.unique(regions):
            rows = regions == r
            z[rows] = (x[rows] - x[rows].mean(axis=0)) / np.where(x[rows].std(axis=0) > 0, x[rows].std(axis=0), 1.0)
        out[name] = z
    return out


def prepare_leakfree(
    task: str,
    region: str,
    train_regions: Sequence[str],
    cfg: EvaluateConfig,
    ctx: EvaluationContext,
    encoder: Encoder | None,
    peers: Peers | None = None,
    seconds: dict[str, float] | None = None,
    sink: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> TaskData:
    """Labels → masked-scene featuresets → folds (spatial blocks, or train regions → region).

    Args:
        task: a leak-free task.
        region: the evaluated region.
        train_regions: train on these instead (transfer); empty: blocked spatial CV in `region`.
        cfg: params `evaluate`.
        ctx: the database and tile geometry.
        encoder: the model measured; None: every featureset but loc2vec (the suite's inputs stage).
        peers: the srai peers of this run.
        seconds: if given, adds the seconds of each phase (labels, render, each featureset).
        sink: if given, receives each batch of masked tiles with its row indices (before rows are dropped).

    Returns:
        The task's data; features are the same on both paths (no feature store involved).
    """
    clock = seconds if seconds is not None else {}
    source = ctx.labels
    t0 = time.perf_counter()
    frames = [make_leakfree_labels(r, task, cfg.labels, source) for r in (*train_regions, region)]
    labels = pd.concat(frames, ignore_index=True)
    clock["labels"] = clock.get("labels", 0.0) + time.perf_counter() - t0
    start = time.perf_counter()
    feats = scene_featuresets(labels, task, cfg, ctx, encoder, peers, clock, sink)
    return finish_leakfree(task, region, train_regions, cfg, ctx, labels, feats, time.perf_counter() - start)


def finish_leakfree(
    task: str,
    region: str,
    train_regions: Sequence[str],
    cfg: EvaluateConfig,
    ctx: EvaluationContext,
    labels: pd.DataFrame,
    feats: dict[str, np.ndarray],
    seconds_scenes: float | None,
) -> TaskData:
    """Rows lacking a featureset (or, in transfer, of a class never trained on) dropped, then folds and meta."""
    source = ctx.labels
    ok = np.logical_and.reduce([np.isfinite(v).all(axis=1) for v in feats.values()])
    is_eval = (labels["region"] == region).to_numpy()
    if train_regions:  # a class never seen in the training regions cannot be predicted: not scored
        ok &= labels["label"].isin(set(labels.loc[~is_eval & ok, "label"])).to_numpy()
    labels, is_eval = labels[ok].reset_index(drop=True), is_eval[ok]
    feats = {k: v[ok] for k, v in feats.items()}
    if train_regions and cfg.suite.per_region_standardise:
        feats = _per_region_standardise(feats, labels["region"].to_numpy())
    bbox = require_import(region, ctx.info).bbox
    if train_regions:
        folds = [Fold(np.flatnonzero(~is_eval), np.flatnonzero(is_eval))]
    else:
        folds = spatial_folds(labels, cfg.split, bbox, ctx.radius_m)
    blocks, _ = assign_blocks(
        labels["lat"].to_numpy(float), labels["lon"].to_numpy(float), bbox, cfg.split.block_m, cfg.split.seed
    )
    tested = np.unique(np.concatenate([f.test for f in folds]))
    meta: dict[str, Any] = {
        "n_labels": int(len(ok)),
        "n_dropped_missing_features_or_class": int((~ok).sum()),
        "n_tested": int(len(tested)),
        "folds": len(folds),
        "mean_train_per_fold": float(np.mean([len(f.train) for f in folds])),
        "classes": sorted(set(labels["label"].iloc[tested])),
        "class_counts_tested": class_counts(labels.iloc[tested]),
        "class_counts_train_regions": class_counts(labels[~is_eval]) if train_regions else None,
        "feature_dims": {k: int(v.shape[1]) for k, v in feats.items()},
    }
    if seconds_scenes is not None:  # cached inputs whose run info is gone: not known
        meta["seconds_scenes"] = round(seconds_scenes, 1)
    if task == "building_type":
        meta["building_coverage"] = {r: building_coverage(r, source) for r in (*train_regions, region)}
    if task == "road_surface":
        meta["surface_coverage"] = {r: surface_coverage(r, source) for r in (*train_regions, region)}
    return TaskData(labels, folds, feats, feats, np.asarray(blocks), meta)


PeerFeatures = dict[str, dict[str, np.ndarray]]  # peer → {label_id: (d,) vector}


class CachedInputs(Protocol):
    """A region's stored suite inputs (evaluation/suite_inputs.SuiteInputs), as run_suite reads them."""

    region: str
    peers_meta: dict[str, Any] | None

    def leakfree(self, task: str, encoder: Encoder, phases: dict[str, float]) -> tuple[TaskData, BaselineFits]:
        """The task's data with loc2vec encoded from the stored masked tiles, and its baselines' fits."""
        ...

    def consumer(self, task: str, phases: dict[str, float]) -> tuple[TaskData, BaselineFits | None]:
        """The consumer task's data (stored labels and baselines, the published loc2vec and histogram read from
        Feast) and its baselines' fits (None: the rows differ from the stored ones, every baseline is fitted)."""
        ...

    def summary(self) -> dict[str, Any]:
        """What the evaluation's meta records of its inputs."""
        ...

    def require(self, tasks: Sequence[str]) -> None:
        """A ConfigError naming the fix if the inputs lack any of the tasks."""
        ...


def consumer_peer_features(
    task: str,
    region: str,
    train_regions: Sequence[str],
    cfg: EvaluateConfig,
    ctx: EvaluationContext,
    peers: Peers,
    labels: pd.DataFrame | None = None,
) -> PeerFeatures:
    """The srai peers of every consumer label of a task (the regions' labels as prepare_task makes them, unless
    given), by label_id: each label's plain scene (the consumer tasks are not masked), computed once for both
    paths."""
    if labels is None:
        labels = pd.concat(
            [make_labels(r, task, cfg.labels, ctx.labels) for r in (*train_regions, region)], ignore_index=True
        )
    out: PeerFeatures = {}
    for name in PEERS:
        if name in task_baselines(task, cfg):
            x = peers.embed(name, labels)
            x = drop_empty_columns(x) if name == "srai_contextual_counts" else x
            out[name] = dict(zip(labels["label_id"].astype(str), x, strict=True))
    return out


def _peer_lookup(table: dict[str, np.ndarray]) -> Callable[[pd.DataFrame, Any, str], np.ndarray]:
    def fn(points: pd.DataFrame, mode: Any, service: str) -> np.ndarray:
        missing = [i for i in points["label_id"].astype(str) if i not in table]
        if missing:
            raise Loc2VecError(f"no srai peer features for labels {missing[:3]}: build the suite inputs again")
        return np.stack([table[i] for i in points["label_id"].astype(str)])

    return fn


def consumer_featurizer(cfg: EvaluateConfig, ctx: EvaluationContext, peer_features: PeerFeatures | None) -> Featurizer:
    """The consumer tasks' featuresets: `loc2vec evaluate`'s (Feast), nearest_way, random_wide on the cell tile,
    and the srai peers looked up by label_id (`consumer_peer_features`) when given."""
    featurizer = Featurizer.default(cfg, ctx)
    featurizer.base["nearest_way"] = lambda points, mode, service: nearest_way(points, ctx.info, ctx.radius_m)
    wide = RandomWide(cfg.suite.random_wide_features, cfg.suite.random_wide_seed)
    featurizer.base["random_wide"] = lambda points, mode, service: cell_tile_features(
        points, lambda tiles: wide(tiles.numpy()), wide.n_features, ctx, cfg.batch_size
    )  # on the cell's tile, as random_encoder (the consumer tasks' loc2vec is the cell's published embedding)
    for name, table in (peer_features or {}).items():
        featurizer.base[name] = _peer_lookup(table)
    return featurizer


def consumer_cfg(task: str, cfg: EvaluateConfig) -> EvaluateConfig:
    """params `evaluate` with the suite's featuresets of a consumer task (loc2vec and its baselines)."""
    return cfg.model_copy(update={"featuresets": (REFERENCE, *task_baselines(task, cfg))})


def prepare_consumer(
    task: str,
    region: str,
    train_regions: Sequence[str],
    cfg: EvaluateConfig,
    ctx: EvaluationContext,
    peer_features: PeerFeatures | None = None,
    labels: pd.DataFrame | None = None,
    fixed: dict[str, np.ndarray] | None = None,
) -> TaskData:
    """A consumer task as `loc2vec evaluate` prepares it (Feast), with nearest_way added for transport, random_wide
    on the cell tile, and the srai peers (`consumer_peer_features`) when they are baselines.

    With `labels` and `fixed` (the suite inputs: the labels and every baseline that is a function of the point
    alone, stored), only the featuresets read from the feature store (CONSUMER_FEAST) are computed here."""
    featurizer = consumer_featurizer(cfg, ctx, peer_features)
    for name in PEERS:
        if name in task_baselines(task, cfg) and name not in featurizer.base and name not in (fixed or {}):
            raise Loc2VecError(f"{name} needs the srai peers of the run")
    return prepare_task(
        task, region, list(train_regions) or None, consumer_cfg(task, cfg), featurizer, ctx, labels, fixed
    )


def run_suite(
    suite: str,
    region: str,
    out: Path,
    cfg: EvaluateConfig,
    ctx: EvaluationContext,
    *,
    encoder: Encoder | None,
    train_regions: Sequence[str] = (),
    model: dict[str, str] | None = None,
    track: bool = True,
    inputs: CachedInputs | None = None,
) -> dict[str, Any]:
    """Run a suite on a region; write the JSON and its chart (same stem, .png); log both to MLflow.

    Args:
        suite: "leakfree", "consumer" or "all".
        region: the evaluated region.
        out: the JSON to write (atomically).
        cfg: params `evaluate`.
        ctx: the evaluation context.
        encoder: the model measured on masked tiles (leak-free tasks; the consumer tasks read Feast).
        train_regions: train on these regions instead (transfer).
        model: what `encoder` is ({name, version} or {path}), recorded in meta.
        track: log to MLflow.
        inputs: the region's suite inputs (evaluation/suite_inputs.SuiteInputs, opened for these params: labels,
            masked tiles, baselines, their fits, the peers): only what depends on the model (and, for the consumer
            tasks, what is read from the feature store: loc2vec and the histogram) is computed here.

    Returns:
        The JSON written.
    """
    if suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; suites are {', '.join(SUITES)}")
    validate_region_name(region)
    train_regions = [validate_region_name(r) for r in train_regions if r]
    if region in train_regions:
        raise ConfigError(f"--train-regions must not include the evaluated region {region!r}")
    cached = inputs
    if cached is not None and cached.region != region:
        raise ConfigError(f"the suite inputs are {cached.region!r}'s, not {region!r}'s")
    if cached is not None and train_regions:
        raise ConfigError("--inputs are in-region suite inputs: not for a transfer run (--train-regions)")
    if cached is not None:
        cached.require(SUITES[suite])
    tasks: dict[str, Any] = {}
    metas: dict[str, Any] = {}
    peers = None
    if cached is None and any(p in cfg.suite.baselines for p in PEERS):
        require_srai()
        peers = Peers(cfg.suite, ctx.info, fit_regions_of(region, train_regions))
    for task in SUITES[suite]:
        start = time.perf_counter()
        phases: dict[str, float] = {}
        fits = None
        if task in LEAKFREE_TASKS and encoder is None:
            raise Loc2VecError("the leak-free suite needs an encoder (--model DIR, or a registered champion)")
        if cached is not None and task in LEAKFREE_TASKS:
            data, fits = cached.leakfree(task, encoder, phases)  # type: ignore[arg-type]
        elif cached is not None:
            data, fits = cached.consumer(task, phases)
        elif task in LEAKFREE_TASKS:
            data = prepare_leakfree(task, region, train_regions, cfg, ctx, encoder, peers, phases)
        else:
            peer_features = consumer_peer_features(task, region, train_regions, cfg, ctx, peers) if peers else None
            data = prepare_consumer(task, region, train_regions, cfg, ctx, peer_features)
        phases["prepare"] = time.perf_counter() - start
        baselines = task_baselines(task, cfg)
        added = [a for a in (REFERENCE, WIDE) if a in data.historical]  # loc2vec_wide: the leak-free tasks
        table, preds, lifts = score_added_value(
            data, [*added, *baselines], baselines, cfg, ctx.radius_m, fits=fits, seconds=phases, added=added
        )
        tasks[task] = {**table, **lifts}
        lift = lifts[lift_key(REFERENCE)]
        meta = dict(data.meta)
        t0 = time.perf_counter()
        if cfg.bootstrap:
            tested = np.concatenate([f.test for f in data.folds])
            y = data.labels["label"].to_numpy()[tested]
            meta["bootstrap"] = block_bootstrap(y, preds, data.blocks[tested], cfg.bootstrap, cfg.split.seed)
        phases["bootstrap"] = time.perf_counter() - t0
        meta["seconds"] = round(time.perf_counter() - start, 1)
        meta["seconds_phases"] = {k: round(v, 2) for k, v in phases.items()}
        metas[task] = meta
        log.info(
            "%s %s: loc2vec %.3f, best baseline %s, lift %+.3f %s (%.0f s)",
            region,
            task,
            table[REFERENCE]["logreg"]["macro_f1"] if "logreg" in table[REFERENCE] else float("nan"),
            lift[next(iter(lift))]["best_baseline"],
            lift[next(iter(lift))]["lift"],
            lift[next(iter(lift))]["ci95"],
            meta["seconds"],
        )
    result: dict[str, Any] = {"tasks": tasks}
    result["meta"] = {
        "suite": suite,
        "region": region,
        "train_regions": train_regions or None,
        "split": "regions" if train_regions else "spatial_blocks",
        "model": model or {},
        "leakfree_score": suite_score(tasks, MASKED_TASKS),
        "consumer_lift": mean_lift(tasks, TASKS),
        "tasks": metas,
    }
    if peers is not None:
        result["meta"]["peers"] = {
            "fitted_on": list(peers.fit_regions),
            "sources": check_sources([*train_regions, region], ctx.info),
            "seconds": peers.seconds,
            "config": {k: v for k, v in cfg.suite.model_dump(mode="json").items() if k.startswith(("peer", "hex2vec"))},
        }
    if cached is not None:
        result["meta"]["inputs"] = cached.summary()
        if cached.peers_meta:
            result["meta"]["peers"] = cached.peers_meta
    path = Path(out)
    write_result(path, result)  # the seconds to R.run.json beside it: the metric holds no wall-clock time
    from loc2vec.evaluation.chart import suite_chart

    chart = suite_chart(result, path.with_suffix(".png"))
    if track:
        log_suite(result, [path, run_info_path(path), chart], cfg, ctx)
    return result


def suite_score(tasks: dict[str, Any], names: Sequence[str], classifier: str = "logreg") -> float | None:
    """Mean loc2vec macro-F1 of a classifier over the named tasks present (None if none is)."""
    values = [tasks[t][REFERENCE][classifier]["macro_f1"] for t in names if t in tasks]
    return float(np.mean(values)) if values else None


def mean_lift(tasks: dict[str, Any], names: Sequence[str], classifier: str = "logreg") -> float | None:
    """Mean lift of best_baseline+loc2vec over best_baseline over the named tasks present (None if none is)."""
    values = [tasks[t]["lift"][classifier]["lift"] for t in names if t in tasks and classifier in tasks[t]["lift"]]
    return float(np.mean(values)) if values else None


def metrics_of(result: dict[str, Any]) -> dict[str, float]:
    """Flat numeric metrics of a suite result (MLflow names: `+` spelled `_plus_`)."""
    out: dict[str, float] = {}
    for task, table in result["tasks"].items():
        for fs, by_kind in table.items():
            for kind, v in by_kind.items():
                if fs.startswith("lift"):  # lift (loc2vec's), lift_loc2vec_wide
                    out[f"{task}.{fs}.{kind}"] = float(v["lift"])
                    out[f"{task}.{fs}.{kind}.ci95_low"], out[f"{task}.{fs}.{kind}.ci95_high"] = map(float, v["ci95"])
                else:
                    out[f"{task}.{fs.replace('+', '_plus_')}.{kind}.macro_f1"] = float(v["macro_f1"])
    for key in ("leakfree_score", "consumer_lift"):
        if result["meta"][key] is not None:
            out[key] = float(result["meta"][key])
    return out


def log_suite(result: dict[str, Any], files: Sequence[Path], cfg: EvaluateConfig, ctx: EvaluationContext) -> str:
    """One MLflow run in the evaluation experiment: params, flat metrics, the JSON and the chart."""
    mlflow = setup_mlflow(cfg.experiment, ctx.paths)
    meta = result["meta"]
    with mlflow.start_run(run_name=f"suite-{meta['suite']}-{meta['region']}") as run:
        mlflow.log_params(
            {
                "suite": meta["suite"],
                "region": meta["region"],
                "train_regions": ",".join(meta["train_regions"] or []) or "-",
                "model": json.dumps(meta["model"])[:500],
                "suite_config": json.dumps(cfg.suite.model_dump(mode="json"))[:500],
            }
        )
        mlflow.log_metrics(metrics_of(result))
        for f in files:
            mlflow.log_artifact(str(f))
        return str(run.info.run_id)
