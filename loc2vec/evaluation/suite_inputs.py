"""The suite's model-independent inputs of a region, built once (the `suite_inputs@R` stage).

Most of what the added-value suite (evaluation/suite.py) computes does not depend on the model measured:
the leak-free labels, their masked tiles, every baseline (histogram, tag_counts, latlon, nearest_way,
random_encoder, random_wide), the srai peers, and even the baselines' classifier fits and the choice of
best_baseline on each fold (the folds are made from the labels alone). `build_suite_inputs` computes all of
it for the in-region suite and stores it in a directory; `evaluate --suite … --inputs DIR` (the `evaluate@R`
stage) then only encodes the stored masked tiles with the model and fits loc2vec and best_baseline+loc2vec.
The scores are the same as the suite's without inputs on the same model (tests/test_suite.py checks it).

Directory (written whole, then swapped in):

* ``manifest.json`` – what the inputs were built from (``fingerprint``: params, the import's sha256, this
  format's version; evaluate refuses inputs of other params), per-task meta and timings, the peers' meta;
* ``<task>.labels.parquet`` (without the labels' observation time, a wall-clock stamp: every build of the same
  inputs gives the same bytes; evaluation stamps them as `make_labels` does), ``<task>.features.npz`` (the
  baselines, rows aligned with the labels), ``<task>.tiles.npz`` (the masked uint8 tiles, compressed),
  ``<task>.fits.json`` (`added_value.BaselineFits`) for each leak-free task;
* for each consumer task (transport, venue): ``<task>.labels.parquet`` (every label as `make_labels` makes it),
  ``<task>.features.npz`` (every baseline that is a function of the label point alone: latlon, tag_counts,
  random_encoder and random_wide on the cell's tile from the region's metatiles, nearest_way, the srai peers;
  NaN rows kept; ``_fitted_rows``: the rows fitted on) and ``<task>.fits.json`` (those baselines' fits and inner-CV
  scores on the folds of the rows that have them all and whose cell embed covers, by embed's own rule: the rows
  evaluate keeps). What the consumer tasks read from the feature store (CONSUMER_FEAST: loc2vec, the published embedding,
  and the tile histogram published with it) is read at evaluation, as without inputs; the histogram's fits are
  made there and best_baseline chosen among all baselines from the stored inner-CV scores and the histogram's. If
  the store serves other rows (embedded with other settings: the rows, hence the folds, differ from the stored
  ones), every baseline is fitted again at evaluation from the stored features (a warning, and the JSON's meta says
  so); the scores stay those of the run without inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loc2vec.core.atomic import swap_dir, write_text
from loc2vec.core.config import EvaluateConfig, RenderConfig
from loc2vec.core.errors import ConfigError, Loc2VecError
from loc2vec.core.names import validate_region_name
from loc2vec.embedding.cells import embedded_mask
from loc2vec.evaluation.added_value import REFERENCE, WIDE, BaselineFits, baseline_fits
from loc2vec.evaluation.classifiers import SERVICES
from loc2vec.evaluation.context import EvaluationContext
from loc2vec.evaluation.labels import LABEL_COLUMNS, make_labels
from loc2vec.evaluation.leakfree import LEAKFREE_TASKS, make_leakfree_labels
from loc2vec.evaluation.peers import PEERS, Peers, check_sources, require_srai
from loc2vec.evaluation.provenance import run_info_path, split_run_info
from loc2vec.evaluation.run import TaskData, prepare_task
from loc2vec.evaluation.suite import (
    CONSUMER_FEAST,
    SUITES,
    consumer_featurizer,
    consumer_peer_features,
    finish_leakfree,
    prepare_consumer,
    scene_featuresets,
    task_baselines,
)
from loc2vec.evaluation.tilefeatures import encoder_tiles_both
from loc2vec.osm.db import require_import
from loc2vec.training.model import Encoder

log = logging.getLogger(__name__)

INPUTS_VERSION = 2  # bump when what is stored, or how it is computed, changes
MANIFEST = "manifest.json"
SERVED = "_served"  # the inputs stage's stand-in for the feature store's rows: NaN where embed covers no cell
EVENT_TIME = "event_timestamp"  # the labels' column that is not stored (see _write_labels)
FITTED_ROWS = "_fitted_rows"  # in a consumer task's features.npz: the rows its stored fits were made on


def fingerprint(region: str, cfg: EvaluateConfig, ctx: EvaluationContext) -> dict[str, Any]:
    """Everything the stored inputs depend on: the params that shape labels, scenes, folds and baseline fits,
    the tile geometry, the architecture of random_encoder, and the imported extract."""
    return {
        "version": INPUTS_VERSION,
        "region": region,
        "import_sha256": require_import(region, ctx.info).sha256,
        "labels": cfg.labels.model_dump(mode="json", exclude={"label_time"}),
        "split": cfg.split.model_dump(mode="json"),
        "suite": cfg.suite.model_dump(mode="json"),
        "logreg_c": cfg.logreg_c,
        "random_encoder_seed": cfg.random_encoder_seed,
        "render": (ctx.render or RenderConfig()).model_dump(mode="json"),
        "model": ctx.model.model_dump(mode="json"),
        "radius_m": ctx.radius_m,
        "h3_resolution": ctx.store.h3_resolution,  # the labels' cells (consumer: their cell tiles)
        "metatiles": dataclasses.asdict(ctx.spec.grid),  # the consumer baselines' cell tiles
        "batch_size": cfg.batch_size,  # random_encoder's batches on the cell tiles
    }


def _digest(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def build_suite_inputs(
    region: str, out: Path, cfg: EvaluateConfig, ctx: EvaluationContext, suite: str = "all"
) -> dict[str, Any]:
    """Build and store a region's suite inputs (in-region: blocked spatial CV); returns the manifest.

    Args:
        region: an ingested region.
        out: the directory to write (replaced whole when finished).
        cfg: params `evaluate` (labels, split, suite, logreg_c, random_encoder_seed, batch_size).
        ctx: the database, tile geometry and metatiles (ctx.model: random_encoder's architecture).
        suite: the tasks to build ("leakfree", "consumer" or "all"; evaluate refuses a suite whose tasks are missing).

    Returns:
        The manifest written.
    """
    from tqdm import tqdm

    validate_region_name(region)
    if suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; suites are {', '.join(SUITES)}")
    start = time.perf_counter()
    fp = fingerprint(region, cfg, ctx)
    peers = None
    if any(p in cfg.suite.baselines for p in PEERS):
        require_srai()
        peers = Peers(cfg.suite, ctx.info, (region,))
    out = Path(out)
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tasks: dict[str, Any] = {}
    for task in tqdm(SUITES[suite], desc=f"suite inputs {region}", unit="task"):
        t0 = time.perf_counter()
        phases: dict[str, float] = {}
        if task in LEAKFREE_TASKS:
            tasks[task] = _leakfree_inputs(task, region, cfg, ctx, peers, tmp, phases)
        else:
            tasks[task] = _consumer_inputs(task, region, cfg, ctx, peers, tmp, phases)
        tasks[task]["seconds"] = round(time.perf_counter() - t0, 1)
        tasks[task]["seconds_phases"] = {k: round(v, 2) for k, v in phases.items()}
        log.info("%s %s inputs: %.0f s %s", region, task, tasks[task]["seconds"], tasks[task]["seconds_phases"])
    manifest: dict[str, Any] = {
        "fingerprint": fp,
        "digest": _digest(fp),
        "suite": suite,
        "tasks": tasks,
        "peers": None,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if peers is not None:
        manifest["peers"] = {
            "fitted_on": list(peers.fit_regions),
            "sources": check_sources([region], ctx.info),
            "seconds": peers.seconds,
            "config": {k: v for k, v in cfg.suite.model_dump(mode="json").items() if k.startswith(("peer", "hex2vec"))},
        }
    # the seconds go beside the directory (R.run.json): the DVC output holds no wall-clock time
    kept, run = split_run_info(manifest)
    (tmp / MANIFEST).write_text(json.dumps(kept, indent=2) + "\n")
    swap_dir(tmp, out)
    write_text(run_info_path(out), json.dumps(run or {}, indent=2) + "\n")
    return manifest


def _leakfree_inputs(
    task: str,
    region: str,
    cfg: EvaluateConfig,
    ctx: EvaluationContext,
    peers: Peers | None,
    tmp: Path,
    phases: dict[str, float],
) -> dict[str, Any]:
    """One leak-free task's labels, masked tiles, baselines and baseline fits, written into `tmp`."""
    t0 = time.perf_counter()
    labels = make_leakfree_labels(region, task, cfg.labels, ctx.labels)
    phases["labels"] = time.perf_counter() - t0
    tiles: list[np.ndarray | None] = [None]

    def keep(rows: np.ndarray, batch: np.ndarray) -> None:
        buffer = tiles[0]
        if buffer is None:
            buffer = tiles[0] = np.zeros((len(labels), *batch.shape[1:]), dtype=np.uint8)
        buffer[rows] = batch

    start = time.perf_counter()
    feats = scene_featuresets(labels, task, cfg, ctx, None, peers, phases, keep)
    ok = np.logical_and.reduce([np.isfinite(v).all(axis=1) for v in feats.values()])
    data = finish_leakfree(task, region, [], cfg, ctx, labels, feats, time.perf_counter() - start)
    fits = baseline_fits(data, task_baselines(task, cfg), cfg, ctx.radius_m, phases)
    t0 = time.perf_counter()
    _write_labels(data.labels, tmp / f"{task}.labels.parquet")
    historical: dict[str, Any] = dict(data.historical)  # (numpy's stubs read ** as its allow_pickle flag)
    np.savez(tmp / f"{task}.features.npz", **historical)
    assert tiles[0] is not None
    np.savez_compressed(tmp / f"{task}.tiles.npz", tiles=tiles[0][ok])
    (tmp / f"{task}.fits.json").write_text(json.dumps(fits.to_json()) + "\n")
    phases["write"] = time.perf_counter() - t0
    return {"meta": data.meta, "tiles_bytes": (tmp / f"{task}.tiles.npz").stat().st_size}


def stored_baselines(task: str, cfg: EvaluateConfig) -> list[str]:
    """The consumer task's baselines stored in the inputs: all but those read from the feature store."""
    return [b for b in task_baselines(task, cfg) if b not in CONSUMER_FEAST]


def _consumer_inputs(
    task: str,
    region: str,
    cfg: EvaluateConfig,
    ctx: EvaluationContext,
    peers: Peers | None,
    tmp: Path,
    phases: dict[str, float],
) -> dict[str, Any]:
    """A consumer task's labels, stored baselines (the peers among them) and their fits, written into `tmp`.

    The fits are made on the rows that have every stored baseline and whose cell embed covers (asked of embed's own
    rule: the store serves loc2vec and the histogram there only); evaluation checks that the store serves exactly
    those rows and refits every baseline if not.
    """
    t0 = time.perf_counter()
    labels = make_labels(region, task, cfg.labels, ctx.labels)
    phases["labels"] = time.perf_counter() - t0
    names = stored_baselines(task, cfg)
    peer_features = None
    if any(p in names for p in PEERS):
        if peers is None:
            raise Loc2VecError("the srai peers are baselines but were not fitted")
        t0 = time.perf_counter()
        peer_features = consumer_peer_features(task, region, [], cfg, ctx, peers, labels)
        phases["srai_peers"] = time.perf_counter() - t0
    featurizer = consumer_featurizer(cfg, ctx, peer_features)
    feats: dict[str, np.ndarray] = {}
    for name in names:
        t0 = time.perf_counter()
        feats.update(featurizer.compute(labels, [name], "historical", SERVICES[task]))
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
    # the rows evaluate will keep: those with every stored baseline whose cell embed covers (its own rule, asked of
    # the labels' cells: the store serves loc2vec and the histogram there and nowhere else)
    t0 = time.perf_counter()
    cells = labels["h3_cell"].astype(str).tolist()
    served = embedded_mask(region, cells, ctx.store.h3_resolution, ctx.radius_m, ctx.info)
    phases["embedded_cells"] = time.perf_counter() - t0
    data = prepare_task(
        task,
        region,
        None,
        cfg.model_copy(update={"featuresets": (*names, SERVED)}),
        featurizer,
        ctx,
        labels,
        {**feats, SERVED: np.where(served, 0.0, np.nan)[:, None]},
    )
    fits = baseline_fits(data, names, cfg, ctx.radius_m, phases)
    t0 = time.perf_counter()
    _write_labels(labels, tmp / f"{task}.labels.parquet")
    fitted = labels["label_id"].isin(set(data.labels["label_id"])).to_numpy()
    arrays: dict[str, Any] = {**feats, FITTED_ROWS: fitted}  # (numpy's stubs read ** as its allow_pickle flag)
    np.savez(tmp / f"{task}.features.npz", **arrays)
    (tmp / f"{task}.fits.json").write_text(json.dumps(fits.to_json()) + "\n")
    phases["write"] = time.perf_counter() - t0
    meta = {"n_labels": len(labels), "n_rows_fitted": int(fitted.sum()), "n_cells_not_embedded": int((~served).sum())}
    return {"meta": {**meta, "stored": names}}


def _write_labels(labels: pd.DataFrame, path: Path) -> None:
    """The labels without their observation time: stamped with the wall clock when made (labels.label_time: now),
    it made the directory, a DVC output, other bytes at every build of the same inputs (evaluate@R stale for
    nothing). `_read_labels` stamps them as `make_labels` would at evaluation."""
    labels.drop(columns=[EVENT_TIME], errors="ignore").to_parquet(path, index=False)


def _read_labels(path: Path, cfg: EvaluateConfig) -> pd.DataFrame:
    """Stored labels, observed now (or at params' labels.label_time), in `make_labels`' column order."""
    labels = pd.read_parquet(path)
    stamp = pd.Timestamp(cfg.labels.event_time())
    if EVENT_TIME in labels:  # inputs stored with it by an older loc2vec
        labels[EVENT_TIME] = stamp
    else:
        labels.insert(LABEL_COLUMNS.index(EVENT_TIME), EVENT_TIME, stamp)
    return labels


@dataclass
class SuiteInputs:
    """A region's stored suite inputs, opened for an evaluation with matching params."""

    path: Path
    region: str
    manifest: dict[str, Any]
    cfg: EvaluateConfig
    ctx: EvaluationContext

    @classmethod
    def open(cls, path: Path, region: str, cfg: EvaluateConfig, ctx: EvaluationContext) -> SuiteInputs:
        """Open `path`; a ConfigError if it is missing or was built for another region or other params."""
        try:
            manifest = json.loads((Path(path) / MANIFEST).read_text())
        except (OSError, ValueError):
            raise ConfigError(
                f"no suite inputs at {path}: build them with `loc2vec suite-inputs --region {region}`"
                f" (`dvc repro suite_inputs@{region}`)"
            ) from None
        want, have = fingerprint(region, cfg, ctx), manifest.get("fingerprint", {})
        differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if differ:
            raise ConfigError(
                f"the suite inputs at {path} were built with other {', '.join(differ)}: build them again"
                f" (`loc2vec suite-inputs --region {region}`)"
            )
        return cls(Path(path), region, manifest, cfg, ctx)

    @property
    def peers_meta(self) -> dict[str, Any] | None:
        """The peers' meta as the suite reports it (fitted_on, sources, seconds, config)."""
        return self.manifest.get("peers")

    def _scene_seconds(self, task: str) -> float | None:
        """The seconds the task's scenes took when the inputs were built (their run info, beside them), if kept."""
        try:
            run = json.loads(run_info_path(self.path).read_text())
            return float(run["tasks"][task]["meta"]["seconds_scenes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def summary(self) -> dict[str, Any]:
        """What the evaluation's meta records of its inputs."""
        return {
            "path": str(self.path),
            "digest": self.manifest["digest"],
            "tasks": {t: {k: v for k, v in m.items() if k != "meta"} for t, m in self.manifest["tasks"].items()},
        }

    def leakfree(self, task: str, encoder: Encoder, phases: dict[str, float]) -> tuple[TaskData, BaselineFits]:
        """A leak-free task's data with loc2vec encoded from the stored masked tiles, and its baselines' fits."""
        if encoder.cfg.model_dump(mode="json") != self.manifest["fingerprint"]["model"]:
            raise ConfigError(
                "the model's architecture differs from params.model, which random_encoder in the suite inputs was"
                " built with: run the suite without --inputs, or build them with this architecture"
            )
        t0 = time.perf_counter()
        labels = _read_labels(self.path / f"{task}.labels.parquet", self.cfg)
        with np.load(self.path / f"{task}.features.npz") as npz:
            feats = {k: npz[k] for k in npz.files}
        with np.load(self.path / f"{task}.tiles.npz") as npz:
            tiles = npz["tiles"]
        fits = BaselineFits.from_json(json.loads((self.path / f"{task}.fits.json").read_text()))
        phases["load_inputs"] = time.perf_counter() - t0
        batch = self.cfg.suite.tile_batch
        t0 = time.perf_counter()
        encode = encoder_tiles_both(encoder)  # loc2vec and loc2vec_wide from one pass of the trunk
        chunks = [encode(tiles[i : i + batch]) for i in range(0, len(tiles), batch)]
        for j, name in enumerate((REFERENCE, WIDE)):
            feats[name] = np.concatenate([c[j] for c in chunks]).astype(float) if chunks else np.zeros((0, 1))
        phases[REFERENCE] = time.perf_counter() - t0
        stored = self.manifest["tasks"][task]["meta"]
        scenes = self._scene_seconds(task)
        data = finish_leakfree(task, self.region, [], self.cfg, self.ctx, labels, feats, scenes)
        if data.meta["n_dropped_missing_features_or_class"]:
            raise Loc2VecError(f"the model gives non-finite embeddings on {task} tiles")
        dims = {name: int(feats[name].shape[1]) for name in (REFERENCE, WIDE)}
        data.meta = {**stored, "feature_dims": {**stored["feature_dims"], **dims}}
        if scenes is not None:
            data.meta["seconds_scenes"] = round(scenes, 1)
        return data, fits

    def require(self, tasks: Sequence[str]) -> None:
        """A ConfigError naming the fix if the inputs lack any of the tasks (built for another --suite)."""
        missing = [t for t in tasks if t not in self.manifest["tasks"]]
        if missing:
            raise ConfigError(
                f"the suite inputs at {self.path} hold no {', '.join(missing)} (built with --suite"
                f" {self.manifest.get('suite', 'all')}): build them with `loc2vec suite-inputs --region {self.region}"
                " --suite all`"
            )

    def consumer(self, task: str, phases: dict[str, float]) -> tuple[TaskData, BaselineFits | None]:
        """A consumer task's data: the stored labels (observed now, as `make_labels` stamps them) and baselines,
        loc2vec and the histogram read from the feature store; and the baselines' fits (None if the store lacks
        some labels' cells: every baseline is then fitted in `score_added_value`)."""
        t0 = time.perf_counter()
        labels = _read_labels(self.path / f"{task}.labels.parquet", self.cfg)
        with np.load(self.path / f"{task}.features.npz") as npz:
            feats = {k: npz[k] for k in npz.files if k != FITTED_ROWS}
            fitted = npz[FITTED_ROWS]
        stored = BaselineFits.from_json(json.loads((self.path / f"{task}.fits.json").read_text()))
        phases["load_inputs"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        data = prepare_consumer(task, self.region, [], self.cfg, self.ctx, labels=labels, fixed=feats)
        phases["feature_store"] = time.perf_counter() - t0
        expected = labels["label_id"].to_numpy()[fitted]
        if not np.array_equal(data.labels["label_id"].to_numpy(), expected):
            log.warning(
                "%s %s: the feature store serves %d of the labels, the suite inputs expected %d: every baseline is"
                " fitted again (embedded with other settings than these params'?)",
                self.region,
                task,
                len(data.labels),
                len(expected),
            )
            data.meta["baseline_fits"] = "fitted at evaluation (the feature store serves other rows than expected)"
            return data, None
        fits = baseline_fits(data, task_baselines(task, self.cfg), self.cfg, self.ctx.radius_m, phases, start=stored)
        data.meta["baseline_fits"] = "stored (the feature store's featuresets fitted at evaluation)"
        return data, fits
