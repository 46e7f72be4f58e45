"""What a published store serves, read from its Feast registry (the metadata a client needs, no params).

The registry is the published metadata: publish tags each embedding view with its model name, model
version and H3 resolution (serving/versions.py), and each feature service with the version it pins, and
swaps the registry in whole. So a consumer reads the resolution and versions of exactly what it queries,
not of the params.yaml or checkout it happens to run in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from loc2vec.core.errors import Loc2VecError
from loc2vec.core.names import validate_model_version
from loc2vec.serving.view_names import LATEST_VIEW, pinned_view, version_key, view_version


class VersionNotServedError(Loc2VecError, LookupError):
    """The requested model version has no view in the store (never published, or retired)."""


@dataclass(frozen=True)
class EmbeddingView:
    """The view a lookup reads: its name, the model version it pins (None: latest) and its cells' resolution."""

    name: str
    version: str | None
    h3_resolution: int | None


def _versions(view_names: Iterable[str]) -> list[str]:
    return sorted({v for name in view_names if (v := view_version(name)) is not None}, key=version_key)


def served_versions(store: Any) -> list[str]:
    """The model versions with a view of their own, oldest first."""
    return _versions(view.name for view in store.list_feature_views())


def _checked(version: str | None) -> str | None:
    if version is not None:
        try:
            validate_model_version(str(version))
        except ValueError as exc:
            raise VersionNotServedError(str(exc)) from None
    return None if version is None else str(version)


def _not_served(version: str, served: list[str]) -> VersionNotServedError:
    return VersionNotServedError(
        f"model version {version} is not served by this store (served: {served}); "
        "it was never published, or retired after publish.retain_versions newer ones"
    )


def _view(name: str, version: str | None, tags: Mapping[str, str]) -> EmbeddingView:
    tag = tags.get("h3_resolution")
    return EmbeddingView(name, version, int(tag) if tag else None)


def embedding_view(store: Any, version: str | None = None) -> EmbeddingView:
    """The view serving `version` (None: the latest view), with the H3 resolution its publish recorded
    (None when the registry predates the tag: the caller falls back to its configuration).

    Raises:
        VersionNotServedError: `version` is malformed, was never published or has been retired.
    """
    version = _checked(version)
    name = LATEST_VIEW if version is None else pinned_view(version)
    try:
        view = store.get_feature_view(name, allow_registry_cache=True)  # re-read when the file changes
    except Exception:  # Feast raises FeatureViewNotFoundException (and others for an unreadable registry)
        if version is None:
            raise
        raise _not_served(version, served_versions(store)) from None
    return _view(name, version, view.tags)


def embedding_view_in(views: Mapping[str, Mapping[str, str]], version: str | None = None) -> EmbeddingView | None:
    """As `embedding_view`, over a registry's views read without Feast (name → tags, serving/online_read.py);
    None when the latest view is missing (Feast's read then says why).

    Raises:
        VersionNotServedError: `version` is malformed, was never published or has been retired.
    """
    version = _checked(version)
    name = LATEST_VIEW if version is None else pinned_view(version)
    if name not in views:
        if version is None:
            return None
        raise _not_served(version, _versions(views))
    return _view(name, version, views[name])


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
