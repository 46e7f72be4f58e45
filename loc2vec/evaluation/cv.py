"""Spatial cross-validation and its uncertainty: blocked K-fold with a buffer, and the block bootstrap.

**Split.** Within one region: blocked K-fold cross-validation. Labels fall in sampling's square
blocks (``sampling.split.assign_blocks``, ``split.block_m``), the blocks are shuffled (seeded) and dealt to
``split.folds`` folds; each fold is tested by a model trained on the other folds, minus every train
point within ``split.buffer_m`` of a test point (default 2·render.radius_m: train and test tiles
never overlap). Predictions are pooled over the folds, so every label is tested exactly once.
Neighbouring points share most of their tile, so a random split would reward memorising places rather
than reading maps.

Hand-written rather than scikit-learn's GroupKFold: the buffer (train points dropped near each fold's
test points) and the seeded block shuffle shared with sampling are what the tests check; GroupKFold
has neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from loc2vec.core.config import SplitConfig
from loc2vec.core.errors import Loc2VecError
from loc2vec.sampling.split import assign_blocks, buffer_violations

Predictions = dict[tuple[str, str], np.ndarray]  # (featureset, classifier) → labels of the tested rows


@dataclass(frozen=True)
class Fold:
    """Row indices of one train/test split; `n_buffer` train-side rows were dropped near test rows."""

    train: np.ndarray
    test: np.ndarray
    n_buffer: int = 0


def block_folds(
    lat: np.ndarray, lon: np.ndarray, bbox: tuple[float, float, float, float], cfg: SplitConfig
) -> np.ndarray:
    """Fold id per point: sampling's square blocks, shuffled (seeded) and dealt round-robin to the folds."""
    blocks, _ = assign_blocks(lat, lon, bbox, cfg.block_m, cfg.seed)
    unique = np.unique(blocks)
    order = np.random.default_rng([cfg.seed, 7]).permutation(len(unique))
    fold_of = dict(zip(unique[order].tolist(), (np.arange(len(unique)) % cfg.folds).tolist(), strict=True))
    return np.asarray([fold_of[b] for b in blocks.tolist()], dtype=np.int64)


def spatial_folds(
    labels: pd.DataFrame, cfg: SplitConfig, bbox: tuple[float, float, float, float], radius_m: float
) -> list[Fold]:
    """Blocked K-fold: each fold tests its blocks and trains on the others minus a buffer around its points."""
    lat, lon = labels["lat"].to_numpy(float), labels["lon"].to_numpy(float)
    fold = block_folds(lat, lon, bbox, cfg)
    out = []
    for k in range(cfg.folds):
        split = np.where(fold == k, "test", "train").astype(object)
        if not (split == "test").any():
            continue
        near = buffer_violations(lat, lon, split, cfg.buffer(radius_m))
        out.append(Fold(np.flatnonzero((split == "train") & ~near), np.flatnonzero(split == "test"), int(near.sum())))
    if len(out) < 2:
        raise Loc2VecError(
            f"the labels fall in fewer than 2 folds of {cfg.block_m:g} m blocks; lower evaluate.split.block_m"
        )
    return out


def macro_f1_codes(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> float:
    """scores()'s macro-F1 on integer codes: F1 = 2·TP / (support + predicted), over classes with support."""
    cm = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    present = support > 0
    return float((2.0 * np.diag(cm)[present] / (support[present] + predicted[present])).mean())


def block_bootstrap(
    y: np.ndarray, preds: Predictions, blocks: np.ndarray, n: int, seed: int, reference: str = "loc2vec"
) -> dict[str, Any]:
    """95% intervals of macro-F1, and of `reference` minus each other featureset (same classifier, paired).

    Resamples whole spatial blocks, not points: neighbouring points share their tiles and errors, so a
    point bootstrap would claim more certainty than ~N/block-size independent places give.
    """
    classes = {c: i for i, c in enumerate(sorted({str(v) for v in (*y, *(x for p in preds.values() for x in p))}))}
    k = len(classes)
    y_codes = np.asarray([classes[str(v)] for v in y])
    p_codes = {key: np.asarray([classes[str(v)] for v in p]) for key, p in preds.items()}
    _, inverse = np.unique(blocks, return_inverse=True)
    members = [np.flatnonzero(inverse == b) for b in range(inverse.max() + 1)]
    rng = np.random.default_rng([seed, 11])
    samples = {key: np.empty(n) for key in preds}
    for b in range(n):
        rows = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        for key, p in p_codes.items():
            samples[key][b] = macro_f1_codes(y_codes[rows], p[rows], k)

    def interval(values: np.ndarray) -> list[float]:
        return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]

    ci: dict[str, dict[str, list[float]]] = {}
    versus: dict[str, dict[str, dict[str, Any]]] = {}
    for name, kind in preds:
        ci.setdefault(name, {})[kind] = interval(samples[(name, kind)])
        if name != reference and (reference, kind) in samples:
            diff = samples[(reference, kind)] - samples[(name, kind)]
            point = macro_f1_codes(y_codes, p_codes[(reference, kind)], k) - macro_f1_codes(
                y_codes, p_codes[(name, kind)], k
            )
            versus.setdefault(name, {})[kind] = {
                "diff": point,
                "ci95": interval(diff),
                "p_better": float((diff > 0).mean()),
            }
    return {"n": n, "blocks": len(members), "macro_f1_ci95": ci, f"{reference}_minus": versus}
