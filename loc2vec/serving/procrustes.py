"""Orthogonal Procrustes: rotate a retrained model's embeddings into the previous version's space.

Two trainings of the same architecture learn equivalent spaces up to an (approximately) orthogonal map:
the triplet loss depends only on distances, which any rotation or reflection preserves. Given both
versions' vectors of the same cells, ``fit_alignment`` finds the orthogonal R minimising
``‖(X_new − μ_new) R − (X_old − μ_old)‖_F`` (scipy.linalg.orthogonal_procrustes: the SVD of
``(X_new − μ_new)ᵀ (X_old − μ_old)``), and ``Alignment.apply`` maps new vectors as
``(x − μ_new) R + μ_old``.

Why centre: the embeddings are not normalised (norms ~3) and each training's vectors sit around their own
mean; a rotation about the origin would spend itself on moving one mean onto the other. Centring fits the
rotation to the shapes of the two clouds, and the translation μ_old − μ_new R is carried separately. The map
is affine and distance-preserving (an isometry), so the new model's neighbourhoods are unchanged; only its
coordinates move into the old frame, where a consumer's classifier trained on the old version expects them.

The residual is the relative Frobenius error on the fitted cells, ‖(X_new − μ_new) R − (X_old − μ_old)‖_F /
‖X_old − μ_old‖_F: 0 when the new version is an exact rotation of the old, ~1.4 for unrelated spaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from loc2vec.core.errors import Loc2VecError


class AlignmentError(Loc2VecError, ValueError):
    """The two versions cannot be aligned (too few shared cells, other dimensions)."""


@dataclass(frozen=True)
class Alignment:
    """An isometry x ↦ (x − source_mean) · rotation + target_mean, fitted on `n_cells` shared cells."""

    rotation: np.ndarray  # (d, d), orthogonal
    source_mean: np.ndarray  # (d,)
    target_mean: np.ndarray  # (d,)
    residual: float  # relative Frobenius error after alignment
    residual_unaligned: float  # the same without the rotation (means still matched), for comparison
    n_cells: int

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Map source-space vectors (n, d) into the target space, as float32 (the stored dtype)."""
        x = np.asarray(x, dtype=np.float64)
        return ((x - self.source_mean) @ self.rotation + self.target_mean).astype(np.float32)

    def record(self) -> dict[str, Any]:
        """What MLflow and the publish report keep (the rotation as nested lists)."""
        return {
            "rotation": self.rotation.tolist(),
            "source_mean": self.source_mean.tolist(),
            "target_mean": self.target_mean.tolist(),
            "residual": self.residual,
            "residual_unaligned": self.residual_unaligned,
            "n_cells": self.n_cells,
        }


def fit_alignment(source: np.ndarray, target: np.ndarray, *, centre: bool = True) -> Alignment:
    """The orthogonal map of `source` rows onto the matching `target` rows (same cells, same order).

    Args:
        source: (n, d) vectors of the new version.
        target: (n, d) vectors of the old version, row i the same cell as source's row i.
        centre: subtract each cloud's mean before fitting (see the module doc); False fits a pure rotation.

    Raises:
        AlignmentError: shapes differ, or fewer than d + 1 shared cells (the rotation is underdetermined).
    """
    from scipy.linalg import orthogonal_procrustes

    a, b = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise AlignmentError(f"cannot align vectors of shapes {a.shape} and {b.shape}")
    n, d = a.shape
    if n <= d:
        raise AlignmentError(f"only {n} shared cells for {d}-D vectors: need more than {d} to fit a rotation")
    mu_a = a.mean(axis=0) if centre else np.zeros(d)
    mu_b = b.mean(axis=0) if centre else np.zeros(d)
    a0, b0 = a - mu_a, b - mu_b
    rotation, _ = orthogonal_procrustes(a0, b0)
    norm = float(np.linalg.norm(b0)) or 1.0
    return Alignment(
        rotation=rotation,
        source_mean=mu_a,
        target_mean=mu_b,
        residual=float(np.linalg.norm(a0 @ rotation - b0)) / norm,
        residual_unaligned=float(np.linalg.norm(a0 - b0)) / norm,
        n_cells=n,
    )


def random_orthogonal(d: int, seed: int) -> np.ndarray:
    """A random (Haar-distributed) orthogonal matrix: for tests and measurements."""
    from scipy.stats import ortho_group

    return ortho_group.rvs(d, random_state=seed)
