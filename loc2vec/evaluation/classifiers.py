"""Consumer classifiers on featuresets: logistic regression and k nearest neighbours, each after a scaler.

`LocationClassifier` is a consumer model the way a downstream team would write one: it trains from Feast's
historical retrieval and predicts from the online store (`TransportModeClassifier`, `VenueClassifier`).
Scored by accuracy and macro-F1 on held-out points.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from loc2vec.core.config import EvaluateConfig
from loc2vec.core.errors import ConfigError, Loc2VecError
from loc2vec.evaluation.context import EvaluationContext
from loc2vec.evaluation.featuresets import Featurizer, points_frame

log = logging.getLogger(__name__)

CLASSIFIERS: tuple[str, ...] = ("logreg", "knn")
# `latest`: evaluate scores what was just published, the newest row per cell (the champion's where a region
# was embedded with it); consumers' own models pin a version (transport_mode_vN, venue_vN) instead.
SERVICES: dict[str, str] = {"transport": "latest", "venue": "latest"}


def make_classifier(kind: str, cfg: EvaluateConfig, n_train: int) -> Pipeline:
    """A fresh classifier of `kind` (features standardised on its training rows)."""
    if kind == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(C=cfg.logreg_c, max_iter=5000))
    if kind == "knn":
        return make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=max(1, min(cfg.knn_k, n_train))))
    raise ConfigError(f"unknown classifier {kind!r}; classifiers are {', '.join(CLASSIFIERS)}")


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy, and F1 averaged over the classes the test points have (a class predicted but absent,
    e.g. `rail` in a region without railways, costs the true class's recall, not a 0 of its own)."""
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=sorted(set(y_true)), average="macro", zero_division=0)),
    }


class LocationClassifier:
    """A consumer model on Feast features: trains from historical retrieval, predicts from the online store.

    The feature vector is any featureset name (default `loc2vec`); non-Feast featuresets compute the
    same vectors on both paths. `predict_online` needs `region` only for featuresets read from the
    region's map data (tag_counts, random_encoder); Feast lookups need just the coordinates.
    """

    task: ClassVar[str] = ""

    def __init__(
        self,
        cfg: EvaluateConfig,
        ctx: EvaluationContext,
        model: str = "logreg",
        featureset: str = "loc2vec",
        featurizer: Featurizer | None = None,
    ):
        self.cfg = cfg
        self.ctx = ctx
        self.model_kind = model
        self.featureset = featureset
        self.featurizer = featurizer or Featurizer.default(cfg, ctx)
        self.featurizer.parts(featureset)
        self.pipeline: Pipeline | None = None

    @property
    def service(self) -> str:
        """The Feast feature service this consumer reads (one per task)."""
        return SERVICES[self.task]

    @property
    def classes_(self) -> np.ndarray:
        """The classes the fitted classifier predicts."""
        if self.pipeline is None:
            raise Loc2VecError("the classifier is not fitted")
        return self.pipeline.classes_

    def fit_features(self, x: np.ndarray, y: np.ndarray) -> LocationClassifier:
        """Fit on feature rows `x` and their labels `y`; returns self."""
        self.pipeline = make_classifier(self.model_kind, self.cfg, len(y)).fit(x, y)
        return self

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        """The predicted label of each feature row."""
        if self.pipeline is None:
            raise Loc2VecError("the classifier is not fitted: call fit_from_feast first")
        return self.pipeline.predict(x)

    def fit_from_feast(self, labels: pd.DataFrame) -> LocationClassifier:
        """Fit on labels with point-in-time features from Feast; labels of unknown cells are skipped.

        Args:
            labels: a `labels.make_labels` frame (lat, lon, h3_cell, event_timestamp, label, region, …).

        Returns:
            self, fitted.

        Raises:
            Loc2VecError: no label has features (were the regions published?).
        """
        x = self.featurizer.compute(labels, [self.featureset], "historical", self.service)[self.featureset]
        ok = np.isfinite(x).all(axis=1)
        if not ok.any():
            raise Loc2VecError(f"no {self.task} label has {self.featureset} features (were the regions published?)")
        if (~ok).any():
            log.warning("%d of %d labels have no %s features: skipped", int((~ok).sum()), len(ok), self.featureset)
        return self.fit_features(x[ok], labels["label"].to_numpy()[ok])

    def predict_online(self, lats: Sequence[float], lons: Sequence[float], region: str | None = None) -> np.ndarray:
        """Predict for locations from the online store, as a consumer serves requests.

        Args:
            lats: latitudes in degrees.
            lons: longitudes in degrees.
            region: the ingested region holding the points (needed by map-based featuresets only).

        Returns:
            One predicted label per location.

        Raises:
            Loc2VecError: a point has no features (e.g. its cell was never published).
        """
        points = points_frame(lats, lons, self.ctx.store.h3_resolution, region)
        x = self.featurizer.compute(points, [self.featureset], "online", self.service)[self.featureset]
        missing = ~np.isfinite(x).all(axis=1)
        if missing.any():
            raise Loc2VecError(
                f"{int(missing.sum())} of {len(x)} points have no {self.featureset} features "
                "(map-based featuresets need `region`, an ingested region containing the points)"
            )
        return self.predict_features(x)


class TransportModeClassifier(LocationClassifier):
    """car / rail / cycle / foot / ferry from where a GPS fix is."""

    task = "transport"


class VenueClassifier(LocationClassifier):
    """The venue group (food & drink, shop, education, …) of a visited place."""

    task = "venue"
