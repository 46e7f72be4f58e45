"""What a published store serves, read from its Feast registry (the metadata a client needs, no params).

The registry is the published metadata: publish tags each embedding view with its model name, model
version and H3 resolution (serving/versions.py), and each feature service with the version it pins, and
swaps the registry in whole. So a consumer reads the resolution and versions of exactly what it queries,
not of the params.yaml or checkout it happens to run in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loc2vec.core.errors import Loc2VecError
from loc2vec.core.names import validate_model_version
from loc2vec.serving.versions import LATEST_VIEW, pinned_view, version_key, view_version


class VersionNotServedError(Loc2VecError, LookupError):
    """The requested model version has no view in the store (never published, or retired)."""


@dataclass(frozen=True)
class EmbeddingView:
    """The view a lookup reads: its name, the model version it pins (None: latest) and its cells' resolution."""

    name: str
    version: str | None
    h3_resolution: int | None


def served_versions(store: Any) -> list[str]:
    """The model versions with a view of their own, oldest first."""
    found = {v for view in store.list_feature_views() if (v := view_version(view.name)) is not None}
    return sorted(found, key=version_key)


def embedding_view(store: Any, version: str | None = None) -> EmbeddingView:
    """The view serving `version` (None: the latest view), with the H3 resolution its publish recorded
    (None when the registry predates the tag: the caller falls back to its configuration).

    Raises:
        VersionNotServedError: `version` is malformed, was never published or has been retired.
    """
    if version is not None:
        try:
            validate_model_version(str(version))
        except ValueError as exc:
            raise VersionNotServedError(str(exc)) from None
    name = LATEST_VIEW if version is None else pinned_view(str(version))
    try:
        view = store.get_feature_view(name, allow_registry_cache=True)  # re-read when the file changes
    except Exception:  # Feast raises FeatureViewNotFoundException (and others for an unreadable registry)
        if version is None:
            raise
        raise VersionNotServedError(
            f"model version {version} is not served by this store (served: {served_versions(store)}); "
            "it was never published, or retired after publish.retain_versions newer ones"
        ) from None
    tag = view.tags.get("h3_resolution")
    return EmbeddingView(name, None if version is None else str(version), int(tag) if tag else None)


def services(store: Any) -> list[dict[str, Any]]:
    """Every feature service: name, the model version it pins (None: latest), its views and description."""
    out = []
    for service in sorted(store.list_feature_services(), key=lambda s: s.name):
        views = [p.name for p in service.feature_view_projections]
        pinned = [v for name in views if (v := view_version(name)) is not None]
        out.append(
            {
                "name": service.name,
                "model_version": pinned[0] if pinned else None,
                "feature_views": views,
                "description": service.description,
            }
        )
    return out
