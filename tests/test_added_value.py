"""The lift statistics: a planted signal gets a lift whose interval is above 0, pure noise one that spans 0.

Synthetic points on a real-sized spatial layout (blocked folds, block bootstrap as in the suite), so the
scoring code (best-baseline choice on training folds, best_baseline+loc2vec, paired block bootstrap) is
exercised end to end without the map: what is tested here is the statistics, not the features.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from loc2vec.core.config import EvaluateConfig, SplitConfig
from loc2vec.evaluation.added_value import BEST, BEST_PLUS, paired_lift, score_added_value
from loc2vec.evaluation.cv import spatial_folds
from loc2vec.evaluation.run import TaskData
from loc2vec.sampling.split import assign_blocks

BBOX = (9.50, 47.10, 9.60, 47.17)  # ~7.6 × 7.8 km: ~50 blocks of 1 km
N = 900


def _task(loc2vec: str, seed: int = 0) -> TaskData:
    """Three balanced classes; `weak` carries the label through heavy noise, `latlon` nothing, and loc2vec
    either an independent second noisy view of the label ("planted") or pure noise."""
    rng = np.random.default_rng(seed)
    lat = rng.uniform(BBOX[1], BBOX[3], N)
    lon = rng.uniform(BBOX[0], BBOX[2], N)
    y = rng.integers(0, 3, N)
    onehot = np.eye(3)[y]
    features = {
        "latlon": np.c_[lat, lon],
        "weak": onehot + rng.normal(0, 1.2, (N, 3)),
        "loc2vec": onehot + rng.normal(0, 1.2, (N, 3)) if loc2vec == "planted" else rng.normal(0, 1, (N, 8)),
    }
    labels = pd.DataFrame({"lat": lat, "lon": lon, "label": np.asarray(["a", "b", "c"])[y]})
    split = SplitConfig(block_m=1000.0, folds=5, seed=0)
    folds = spatial_folds(labels, split, BBOX, 100.0)
    blocks, _ = assign_blocks(lat, lon, BBOX, split.block_m, split.seed)
    return TaskData(labels, folds, features, features, np.asarray(blocks), {})


@pytest.fixture(scope="module")
def cfg() -> EvaluateConfig:
    return EvaluateConfig(split=SplitConfig(block_m=1000.0, folds=5, seed=0), bootstrap=500)


@pytest.mark.parametrize("kind", ["logreg", "hgb"])
def test_planted_signal_lifts_above_zero(cfg: EvaluateConfig, kind: str) -> None:
    cfg = cfg.model_copy(update={"suite": cfg.suite.model_copy(update={"classifiers": (kind,)})})
    table, _, lifts = score_added_value(_task("planted"), ["loc2vec", "latlon", "weak"], ["latlon", "weak"], cfg, 100.0)
    lift = lifts["lift"]
    assert lift[kind]["best_baseline"] == "weak" and set(lift[kind]["chosen_per_fold"]) == {"weak"}
    assert lift[kind]["ci95"][0] > 0, lift[kind]
    assert lift[kind]["lift"] == pytest.approx(table[BEST_PLUS][kind]["macro_f1"] - table[BEST][kind]["macro_f1"])
    assert table[BEST][kind] == table["weak"][kind], "best_baseline is the chosen baseline's own score"


@pytest.mark.parametrize("kind", ["logreg", "hgb"])
def test_pure_noise_lift_interval_spans_zero(cfg: EvaluateConfig, kind: str) -> None:
    cfg = cfg.model_copy(update={"suite": cfg.suite.model_copy(update={"classifiers": (kind,)})})
    _, _, lifts = score_added_value(_task("noise"), ["loc2vec", "latlon", "weak"], ["latlon", "weak"], cfg, 100.0)
    low, high = lifts["lift"][kind]["ci95"]
    assert low < 0 < high, lifts


def test_paired_lift_of_identical_predictions_is_zero() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    pred = np.where(rng.random(200) < 0.7, y, rng.integers(0, 3, 200))
    value, ci = paired_lift(y, pred, pred, rng.integers(0, 20, 200), 200, 0)
    assert value == 0.0 and ci == [0.0, 0.0]


def test_tree_width_cap_never_drops_the_added_featureset(cfg: EvaluateConfig) -> None:
    """hgb_max_dims cuts each featureset, not best_baseline+loc2vec's concatenation (which would lose loc2vec)."""
    cfg = cfg.model_copy(update={"suite": cfg.suite.model_copy(update={"classifiers": ("hgb",), "hgb_max_dims": 3})})
    data = _task("planted")
    wide = np.hstack([data.historical["weak"], np.random.default_rng(2).normal(0, 1, (N, 5))])  # 8 > 3 columns
    data.historical["weak"] = data.online["weak"] = wide
    _, _, lifts = score_added_value(data, ["loc2vec", "weak"], ["latlon", "weak"], cfg, 100.0)
    lift = lifts["lift"]
    assert lift["hgb"]["best_baseline"] == "weak" and lift["hgb"]["ci95"][0] > 0, lift["hgb"]


def test_fits_spread_over_worker_processes_score_as_in_one(cfg: EvaluateConfig) -> None:
    """`suite.fit_workers` spreads the fits over processes: every score, choice and lift is the same as inline."""
    from loc2vec.evaluation.added_value import baseline_fits

    data = _task("planted", seed=3)
    cheap = {"hgb_max_iter": 10}  # equality, not accuracy, is tested: ten boosting rounds suffice
    inline, spread = (
        cfg.model_copy(update={"suite": cfg.suite.model_copy(update={**cheap, "fit_workers": n})}) for n in (1, 2)
    )
    args = (["loc2vec", "latlon", "weak"], ["latlon", "weak"])
    (t1, p1, l1), (t2, p2, l2) = (score_added_value(data, *args, c, 100.0) for c in (inline, spread))
    assert t1 == t2 and l1 == l2 and p1.keys() == p2.keys()
    assert all(np.array_equal(p1[k], p2[k]) for k in p1)
    one, two = (baseline_fits(data, ["latlon", "weak"], c, 100.0) for c in (inline, spread))
    assert one.chosen == two.chosen and one.inner == two.inner
    assert one.preds.keys() == two.preds.keys()
    assert all(np.array_equal(one.preds[k], two.preds[k]) for k in one.preds)
