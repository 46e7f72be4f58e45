"""serving: the feature store (the `publish` stage) and what consumers call.

Owns the Feast store of a project (store), consumers' lookups (lookup: `get_location_embeddings`,
`historical_features`), publishing embeddings (publish) and nearest-neighbour search over them
(similar_index, similar). May import core, orchestration, osm, raster, sampling, training and embedding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loc2vec.serving.lookup import get_location_embeddings, historical_features

__all__ = ["get_location_embeddings", "historical_features"]


def __getattr__(name: str) -> Any:
    """The consumers' API, imported on first use (numpy, pandas, h3 and Feast only: never torch or Mapnik)."""
    if name in __all__:
        from loc2vec.serving import lookup

        return getattr(lookup, name)
    raise AttributeError(f"module 'loc2vec.serving' has no attribute {name!r}")
