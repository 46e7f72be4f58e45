"""Added value: does `best_baseline + loc2vec` beat `best_baseline`, and by how much for certain?

In practice an embedding is one feature group among others, so the question is not whether loc2vec
beats a baseline alone but whether adding it to the best cheap features helps. For each classifier:

* every featureset alone (loc2vec and each baseline), scored by blocked spatial CV (evaluation/cv.py);
* ``best_baseline``: in each outer fold, the baseline with the best macro-F1 in an inner spatial CV
  over that fold's *training* rows only (``suite.inner_folds`` folds of the same blocks and buffer),
  so the choice never sees the fold's test rows; the JSON names the one chosen most often and lists
  the choice per fold;
* ``best_baseline+loc2vec``: that fold's chosen baseline concatenated with loc2vec;
* ``lift`` = macro-F1(best_baseline+loc2vec) − macro-F1(best_baseline), with a 95% interval from a
  paired spatial block bootstrap (whole blocks resampled, both predictions scored on the same draw);
* the same for any further featureset added to the same fold's best_baseline (``added``; the suite adds
  ``loc2vec_wide``, the encoder's representation before its projection): ``best_baseline+<name>`` and
  ``lift_<name>``.

Classifiers: logistic regression and scikit-learn's HistGradientBoosting, each behind a StandardScaler
fitted on the training rows of the fold only (the tree model does not need it; it is kept so both see
identical inputs). The tree model sees at most ``suite.hgb_max_dims`` columns of a featureset: only
``random_wide`` is wider (its first columns are a smaller random bank); on 2 cores a tree fit on
1,024 columns took ~20 s, and the suite makes ~20 per featureset and task. ``best_baseline`` reuses the chosen
baseline's own fit on each fold (the same model on the same rows) instead of fitting it again.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from loc2vec.core.config import EvaluateConfig
from loc2vec.core.errors import ConfigError, Loc2VecError
from loc2vec.evaluation.classifiers import scores
from loc2vec.evaluation.cv import Fold, Predictions, macro_f1_codes, spatial_folds
from loc2vec.evaluation.run import TaskData

REFERENCE = "loc2vec"
BEST = "best_baseline"
BEST_PLUS = "best_baseline+loc2vec"
WIDE = "loc2vec_wide"  # the same encoder's representation before its projection (Encoder.representation)


def lift_key(added: str) -> str:
    """The result key of the lift of best_baseline+`added`: ``lift`` for loc2vec, ``lift_<added>`` otherwise."""
    return "lift" if added == REFERENCE else f"lift_{added}"


def suite_classifier(kind: str, cfg: EvaluateConfig) -> Pipeline:
    """A fresh classifier of `kind` ("logreg" or "hgb") behind a scaler fitted on its training rows.

    Args:
        kind: "logreg" or "hgb".
        cfg: params `evaluate` (logreg_c, suite.hgb_*; split.seed seeds the tree model).

    Returns:
        An unfitted scikit-learn pipeline.
    """
    s = cfg.suite
    if kind == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(C=cfg.logreg_c, max_iter=5000))
    if kind == "hgb":
        model = HistGradientBoostingClassifier(
            max_iter=s.hgb_max_iter,
            learning_rate=s.hgb_learning_rate,
            max_leaf_nodes=s.hgb_max_leaf_nodes,
            early_stopping=False,
            random_state=cfg.split.seed,
        )
        return make_pipeline(StandardScaler(), model)
    raise ConfigError(f"unknown suite classifier {kind!r}; classifiers are logreg, hgb")


def _fit_predict(kind: str, cfg: EvaluateConfig, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray):
    """Fit on the fold's training rows, predict its test rows, on `suite.fit_threads` BLAS and OpenMP threads:
    on 2 busy cores, 2 threads spin against each other (a tree fit 6.6 s vs 0.7 s; a logistic regression on
    800 × 1,024 random_wide columns 4.4 s vs 0.25 s, the same 33 L-BFGS iterations)."""
    if len(set(y_train)) < 2:
        raise Loc2VecError("a fold trains on fewer than two classes; change evaluate.split")
    with threadpool_limits(cfg.suite.fit_threads):
        return suite_classifier(kind, cfg).fit(x_train, y_train).predict(x_test)


@dataclass(frozen=True)
class FitJob:
    """One fit: `kind` trained on rows `train` of the featuresets `x_train` side by side (labels `y`), predicting
    rows `test` of `x_test`, each featureset cut to its first `width` columns if given. Rows are sliced only when
    the job is dispatched, so a batch of hundreds of jobs holds no copies of its featuresets."""

    kind: str
    x_train: tuple[np.ndarray, ...]
    train: np.ndarray
    y: np.ndarray
    x_test: tuple[np.ndarray, ...]
    test: np.ndarray
    width: int | None = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x_train, y_train, x_test), sliced now."""
        cut = slice(None) if self.width is None else slice(0, self.width)
        x_train = np.hstack([x[self.train][:, cut] for x in self.x_train])
        return x_train, self.y[self.train], np.hstack([x[self.test][:, cut] for x in self.x_test])


def fit_workers(cfg: EvaluateConfig) -> int:
    """Processes for the fits: `suite.fit_workers`, 0 = this process's cores."""
    return cfg.suite.fit_workers or len(os.sched_getaffinity(0))


def fit_predict_all(jobs: Sequence[FitJob], cfg: EvaluateConfig) -> list[np.ndarray]:
    """Each job's test predictions, in order, each exactly as `_fit_predict` makes it in this process.

    A suite run makes hundreds of small fits, each on one thread (`suite.fit_threads`: more threads spin against
    each other on busy cores), so they are spread over `suite.fit_workers` processes (joblib's loky pool, reused
    between calls); every fit is deterministic, so where it runs changes no prediction.
    """
    n = min(fit_workers(cfg), len(jobs))
    if n <= 1:
        return [_fit_predict(j.kind, cfg, *j.arrays()) for j in jobs]
    from joblib import Parallel, delayed

    calls = (delayed(_fit_predict)(j.kind, cfg, *j.arrays()) for j in jobs)
    return list(Parallel(n_jobs=n, backend="loky", pre_dispatch="2*n_jobs")(calls))


def _row_bbox(lat: np.ndarray, lon: np.ndarray) -> tuple[float, float, float, float]:
    return float(lon.min()), float(lat.min()), float(lon.max()), float(lat.max())


def inner_folds(labels: pd.DataFrame, cfg: EvaluateConfig, radius_m: float) -> list[Fold]:
    """The inner spatial folds over an outer fold's training rows (`labels`, re-indexed from 0), as the choice of
    best_baseline uses them: ``suite.inner_folds`` folds of the same blocks and buffer, another seed.

    Args:
        labels: the outer fold's training rows (lat, lon).
        cfg: params `evaluate` (split, suite.inner_folds).
        radius_m: the tile radius (the buffer, as the outer folds').

    Returns:
        Folds whose rows index `labels`.
    """
    lat, lon = labels["lat"].to_numpy(float), labels["lon"].to_numpy(float)
    split = cfg.split.model_copy(update={"folds": cfg.suite.inner_folds, "seed": cfg.split.seed + 1})
    return spatial_folds(labels, split, _row_bbox(lat, lon), radius_m)


def inner_scores(
    data: TaskData, rows: np.ndarray, names: Sequence[str], kind: str, cfg: EvaluateConfig, radius_m: float
) -> dict[str, float]:
    """Each featureset's pooled macro-F1 in an inner spatial CV over `rows` (an outer fold's training rows only).

    Args:
        data: the task's labels and features.
        rows: the outer fold's training rows.
        names: the featuresets scored.
        kind: the classifier.
        cfg: params `evaluate` (split, suite.inner_folds).
        radius_m: the tile radius (the inner folds' buffer, as the outer folds').

    Returns:
        {name: macro-F1}: a function of that featureset and the rows alone, so scores computed at different times
        (the suite inputs' baselines, the published histogram at evaluation) choose as one call would.
    """
    jobs, finish = _inner_plan(data, rows, names, kind, cfg, radius_m)
    return finish(fit_predict_all(jobs, cfg))


def _inner_plan(
    data: TaskData, rows: np.ndarray, names: Sequence[str], kind: str, cfg: EvaluateConfig, radius_m: float
) -> tuple[list[FitJob], Any]:
    """`inner_scores` as fits to make and the function that scores their predictions (so callers can batch)."""
    sub = data.labels.iloc[rows].reset_index(drop=True)
    inner = inner_folds(sub, cfg, radius_m)
    y = sub["label"].to_numpy()
    tested = np.concatenate([f.test for f in inner])
    width = _width(kind, cfg)
    y_all = data.labels["label"].to_numpy()
    jobs = [
        FitJob(kind, (data.historical[name],), rows[f.train], y_all, (data.historical[name],), rows[f.test], width)
        for name in names
        for f in inner
    ]

    def finish(results: Sequence[np.ndarray]) -> dict[str, float]:
        out: dict[str, float] = {}
        it = iter(results)
        for name in names:
            pred = np.empty(len(y), dtype=object)
            for f in inner:
                pred[f.test] = next(it)
            out[name] = float(scores(y[tested], pred[tested])["macro_f1"])
        return out

    return jobs, finish


def pick_baseline(scores_by_name: dict[str, float], baselines: Sequence[str]) -> str:
    """The baseline with the best inner-CV score; ties go to the earlier one in `baselines`."""
    best, best_score = baselines[0], -1.0
    for name in baselines:
        if scores_by_name[name] > best_score + 1e-12:
            best, best_score = name, scores_by_name[name]
    return best


def choose_baseline(
    data: TaskData, rows: np.ndarray, baselines: Sequence[str], kind: str, cfg: EvaluateConfig, radius_m: float
) -> str:
    """The baseline with the best pooled macro-F1 in an inner spatial CV over `rows` (training rows only).

    Args:
        data: the task's labels and features.
        rows: the outer fold's training rows.
        baselines: candidate featuresets (ties go to the earlier one).
        kind: the classifier.
        cfg: params `evaluate` (split, suite.inner_folds).
        radius_m: the tile radius (the inner folds' buffer, as the outer folds').

    Returns:
        The chosen baseline's name.
    """
    return pick_baseline(inner_scores(data, rows, baselines, kind, cfg, radius_m), baselines)


def paired_lift(
    y: np.ndarray, with_: np.ndarray, without: np.ndarray, blocks: np.ndarray, n: int, seed: int
) -> tuple[float, list[float]]:
    """macro-F1(with_) − macro-F1(without) and its 95% paired spatial block-bootstrap interval.

    Args:
        y: true labels of the tested rows.
        with_: predictions of the model with the added features.
        without: predictions of the model without them.
        blocks: spatial block of each row (the resampling unit).
        n: bootstrap resamples.
        seed: the resampling seed.

    Returns:
        (lift, [low, high]).
    """
    classes = {c: i for i, c in enumerate(sorted({str(v) for v in (*y, *with_, *without)}))}
    k = len(classes)
    yc, wc, oc = (np.asarray([classes[str(v)] for v in a]) for a in (y, with_, without))
    point = macro_f1_codes(yc, wc, k) - macro_f1_codes(yc, oc, k)
    _, inverse = np.unique(blocks, return_inverse=True)
    members = [np.flatnonzero(inverse == b) for b in range(inverse.max() + 1)]
    rng = np.random.default_rng([seed, 13])
    diffs = np.empty(n)
    for b in range(n):
        rows = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        diffs[b] = macro_f1_codes(yc[rows], wc[rows], k) - macro_f1_codes(yc[rows], oc[rows], k)
    return float(point), [float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))]


@dataclass
class BaselineFits:
    """What the baselines alone give on a task's folds, whatever the model: each baseline's test predictions per
    (featureset, classifier, fold), its inner-CV score per (classifier, fold), and best_baseline's choice per
    classifier and fold. The suite's inputs stage (evaluation/suite_inputs.py) computes them once per region;
    `score_added_value` then fits only loc2vec and best_baseline+loc2vec. A baseline known only at evaluation (the
    consumer tasks' published histogram) is added by `baseline_fits(..., start=)`, and the choice made again.
    """

    preds: dict[tuple[str, str, int], np.ndarray] = field(default_factory=dict)
    chosen: dict[str, list[str]] = field(default_factory=dict)  # classifier → the chosen baseline of each fold
    tested: list[int] = field(default_factory=list)  # test rows per fold: the fits belong to these folds only
    inner: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # classifier → per fold {baseline: F1}

    def to_json(self) -> dict[str, Any]:
        """JSON form (predictions as lists of class names; scores as floats, which JSON round-trips exactly)."""
        preds: dict[str, dict[str, list[list[str]]]] = {}
        for (name, kind, i), p in sorted(self.preds.items()):
            folds = preds.setdefault(kind, {}).setdefault(name, [])
            assert len(folds) == i, "folds in order"
            folds.append([str(v) for v in p])
        return {"tested": self.tested, "chosen": self.chosen, "inner": self.inner, "preds": preds}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BaselineFits:
        """Inverse of `to_json`."""
        preds = {
            (name, kind, i): np.asarray(p, dtype=object)
            for kind, by_name in data["preds"].items()
            for name, folds in by_name.items()
            for i, p in enumerate(folds)
        }
        inner = {k: [dict(f) for f in v] for k, v in data.get("inner", {}).items()}
        return cls(preds, {k: list(v) for k, v in data["chosen"].items()}, list(data["tested"]), inner)


def _width(kind: str, cfg: EvaluateConfig) -> int | None:
    """The columns a classifier sees of a featureset: the tree model at most suite.hgb_max_dims, logreg all."""
    return cfg.suite.hgb_max_dims if kind == "hgb" else None


def baseline_fits(
    data: TaskData,
    baselines: Sequence[str],
    cfg: EvaluateConfig,
    radius_m: float,
    seconds: dict | None = None,
    start: BaselineFits | None = None,
) -> BaselineFits:
    """Each baseline alone on every fold, its inner-CV scores, and the choice of best_baseline: the fits that do
    not depend on the model.

    Args:
        data: labels, folds and the baselines' features.
        baselines: the candidates for best_baseline (each also scored alone), in order (ties: the earlier).
        cfg: params `evaluate`.
        radius_m: the tile radius (the inner folds' buffer).
        seconds: if given, adds the seconds of the baselines' fits and the choice (``fit_baselines_and_choose``).
        start: fits made beforehand on these very folds for some of the baselines (the suite inputs'): only the
            others are fitted, then best_baseline is chosen among all of them.

    Returns:
        The fits, as `score_added_value` takes them.
    """
    clock = seconds if seconds is not None else {}
    y = data.labels["label"].to_numpy()
    tested = [len(f.test) for f in data.folds]
    if start is not None and start.tested != tested:
        raise Loc2VecError("the baselines' fits were made on other folds: build the suite inputs again")
    fits = BaselineFits(
        preds=dict(start.preds) if start else {},
        tested=tested,
        inner={k: [dict(f) for f in v] for k, v in start.inner.items()} if start else {},
    )
    # every missing fit of every classifier, fold and inner fold in one batch over the fit workers
    t0 = time.perf_counter()
    jobs: list[FitJob] = []
    keys: list[tuple[str, str, int]] = []
    for kind in cfg.suite.classifiers:
        width = _width(kind, cfg)
        for name in baselines:
            if all((name, kind, i) in fits.preds for i in range(len(data.folds))):
                continue
            for i, fold in enumerate(data.folds):
                keys.append((name, kind, i))
                jobs.append(
                    FitJob(kind, (data.historical[name],), fold.train, y, (data.online[name],), fold.test, width)
                )
    finishers = []
    for kind in cfg.suite.classifiers:
        per_fold = fits.inner.setdefault(kind, [{} for _ in data.folds])
        for i, f in enumerate(data.folds):
            todo = [b for b in baselines if b not in per_fold[i]]
            if todo:
                inner_jobs, finish = _inner_plan(data, f.train, todo, kind, cfg, radius_m)
                finishers.append((per_fold[i], len(jobs), len(jobs) + len(inner_jobs), finish))
                jobs.extend(inner_jobs)
    results = fit_predict_all(jobs, cfg)
    fits.preds.update(zip(keys, results[: len(keys)], strict=True))
    for target, lo, hi, finish in finishers:
        target.update(finish(results[lo:hi]))
    for kind in cfg.suite.classifiers:
        fits.chosen[kind] = [pick_baseline(scored, baselines) for scored in fits.inner[kind]]
    clock["fit_baselines_and_choose"] = clock.get("fit_baselines_and_choose", 0.0) + time.perf_counter() - t0
    return fits


def score_added_value(
    data: TaskData,
    featuresets: Sequence[str],
    baselines: Sequence[str],
    cfg: EvaluateConfig,
    radius_m: float,
    lift: bool = True,
    reuse_fits: bool = True,
    fits: BaselineFits | None = None,
    seconds: dict | None = None,
    added: Sequence[str] = (REFERENCE,),
) -> tuple[dict[str, Any], Predictions, dict[str, Any]]:
    """Every featureset, best_baseline and best_baseline+X for each added X under each suite classifier, and the lifts.

    Args:
        data: labels, folds, features (historical: training rows; online: tested rows) and blocks.
        featuresets: featuresets scored alone (must include loc2vec and the baselines).
        baselines: the candidates for best_baseline.
        cfg: params `evaluate` (suite, split, bootstrap).
        radius_m: the tile radius (the inner folds' buffer).
        lift: also best_baseline, best_baseline+loc2vec and the lift (False: the featuresets alone).
        reuse_fits: best_baseline takes the chosen baseline's own predictions on each fold (False: fitted again,
            the same model; `loc2vec bench suite` measures the cost before).
        fits: the baselines' fits made beforehand on these very folds (`baseline_fits`): only loc2vec and
            best_baseline+loc2vec are fitted here.
        seconds: if given, adds the seconds of each featureset's fits (``fit_<name>``) and of the choice.
        added: the featuresets each added to the fold's best_baseline (loc2vec first; the same choice for all).

    Returns:
        ({featureset: {classifier: {accuracy, macro_f1}}}, the tested rows' predictions,
        {lift_key(X): {classifier: {"best_baseline": NAME, "lift": x, "ci95": [lo, hi], "chosen_per_fold": [...]}}}).
    """
    missing = [b for b in (*featuresets, *((*added, *baselines) if lift else ())) if b not in data.historical]
    if missing:
        raise ConfigError(f"featuresets {missing} were not computed")
    y = data.labels["label"].to_numpy()
    tested = np.concatenate([f.test for f in data.folds])
    table: dict[str, Any] = {}
    preds: Predictions = {}
    lifts: dict[str, Any] = {lift_key(a): {} for a in added} if lift else {}

    fold_preds: dict[tuple[str, str, int], np.ndarray] = {}  # (featureset, classifier, fold) → its test predictions
    if fits is not None:
        if fits.tested != [len(f.test) for f in data.folds]:
            raise Loc2VecError("the baselines' fits were made on other folds: build the suite inputs again")
        fold_preds.update(fits.preds)
    clock = seconds if seconds is not None else {}

    def pooled(name: str, kind: str, fold_features, reuse=None) -> None:
        t0 = time.perf_counter()
        pred = np.empty(len(y), dtype=object)
        for i, fold in enumerate(data.folds):
            key = reuse(i) if reuse is not None else (name, kind, i)
            if key in fold_preds:  # the same model on the same rows was already fitted: not fitted twice
                pred[fold.test] = fold_preds[key]
                continue
            x_train, x_test = fold_features(fold)
            pred[fold.test] = fold_preds[(name, kind, i)] = _fit_predict(kind, cfg, x_train, y[fold.train], x_test)
        table.setdefault(name, {})[kind] = scores(y[tested], pred[tested])
        clock[f"fit_{name}"] = clock.get(f"fit_{name}", 0.0) + time.perf_counter() - t0
        preds[(name, kind)] = pred[tested]

    def alone(name: str):
        return lambda f: (cols(data.historical[name][f.train]), cols(data.online[name][f.test]))

    def prefit(keyed: list[tuple[tuple[str, str, int], FitJob]]) -> None:
        """Fit what `pooled` will ask for, in one batch over the fit workers (it then finds them fitted)."""
        todo = [(k, j) for k, j in keyed if k not in fold_preds]
        fold_preds.update(zip([k for k, _ in todo], fit_predict_all([j for _, j in todo], cfg), strict=True))

    t0 = time.perf_counter()
    prefit(
        [
            (
                (name, kind, i),
                FitJob(kind, (data.historical[name],), f.train, y, (data.online[name],), f.test, _width(kind, cfg)),
            )
            for kind in cfg.suite.classifiers
            for name in featuresets
            for i, f in enumerate(data.folds)
        ]
    )
    clock["fit_featuresets"] = clock.get("fit_featuresets", 0.0) + time.perf_counter() - t0

    for kind in cfg.suite.classifiers:
        # a tree fit costs rows × columns × rounds: each featureset (never a concatenation, which would drop
        # loc2vec's columns) is cut to its first hgb_max_dims columns (random_wide: its first filters)
        width = _width(kind, cfg)

        def cols(x: np.ndarray, width: int | None = width) -> np.ndarray:
            return x if width is None else x[:, :width]

        for name in featuresets:
            pooled(name, kind, alone(name))
        if not lift:
            continue
        t0 = time.perf_counter()
        if fits is not None:
            chosen = {id(f): fits.chosen[kind][i] for i, f in enumerate(data.folds)}
        else:
            chosen = {id(f): choose_baseline(data, f.train, baselines, kind, cfg, radius_m) for f in data.folds}
        clock["choose_best_baseline"] = clock.get("choose_best_baseline", 0.0) + time.perf_counter() - t0

        def best(f: Fold, chosen: dict[int, str] = chosen) -> tuple[np.ndarray, np.ndarray]:
            return alone(chosen[id(f)])(f)

        def best_plus(f: Fold, extra: str, chosen: dict[int, str] = chosen) -> tuple[np.ndarray, np.ndarray]:
            b = chosen[id(f)]
            return (
                np.hstack([cols(data.historical[b][f.train]), cols(data.historical[extra][f.train])]),
                np.hstack([cols(data.online[b][f.test]), cols(data.online[extra][f.test])]),
            )

        reuse = (lambda i, kind=kind, chosen=chosen: (chosen[id(data.folds[i])], kind, i)) if reuse_fits else None
        t0 = time.perf_counter()
        prefit(
            [
                (
                    (f"{BEST}+{extra}", kind, i),
                    FitJob(
                        kind,
                        (data.historical[chosen[id(f)]], data.historical[extra]),
                        f.train,
                        y,
                        (data.online[chosen[id(f)]], data.online[extra]),
                        f.test,
                        width,
                    ),
                )
                for extra in added
                for i, f in enumerate(data.folds)
            ]
        )
        clock["fit_featuresets"] = clock.get("fit_featuresets", 0.0) + time.perf_counter() - t0
        pooled(BEST, kind, best, reuse=reuse)
        per_fold = [chosen[id(f)] for f in data.folds]
        for extra in added:
            name = f"{BEST}+{extra}"
            pooled(name, kind, lambda f, extra=extra: best_plus(f, extra))
            value, ci = paired_lift(
                y[tested],
                preds[(name, kind)],
                preds[(BEST, kind)],
                data.blocks[tested],
                max(cfg.bootstrap, 1),
                cfg.split.seed,
            )
            lifts[lift_key(extra)][kind] = {
                "best_baseline": Counter(per_fold).most_common(1)[0][0],
                "lift": value,
                "ci95": ci,
                "chosen_per_fold": per_fold,
            }
    return table, preds, lifts
