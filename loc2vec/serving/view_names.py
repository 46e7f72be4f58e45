"""The names of the embedding views: the latest one and one per model version (what consumers pin).

Apart from serving/versions.py (which reads and writes the versions' offline files, with pyarrow) so that a
lookup can name the view it reads without importing pyarrow.
"""

from __future__ import annotations

from loc2vec.core.names import MODEL_VERSION_RE, validate_model_version

LATEST_VIEW = "location_embedding"
PINNED_PREFIX = "location_embedding_v"  # as feature_repo/features.py names them


def pinned_view(version: str) -> str:
    """The feature view of one model version."""
    return PINNED_PREFIX + validate_model_version(version)


def view_version(name: str) -> str | None:
    """The model version a pinned view's name carries, or None for another view."""
    rest = name.removeprefix(PINNED_PREFIX)
    return rest if rest != name and MODEL_VERSION_RE.match(rest) else None


def version_key(v: str) -> tuple[int, str]:
    """Order versions numerically (MLflow's are integers; an aligned `NaM` right after N); anything else last."""
    return (int(v.split("a")[0]), v) if MODEL_VERSION_RE.match(v) else (1 << 62, v)
