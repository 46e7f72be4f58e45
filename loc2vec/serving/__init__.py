"""serving: the feature store (the `publish` stage) and what consumers call.

Owns the Feast store of a project (store; feast_import: Feast without its import-time cost), the model versions
served on their own (versions), publishing embeddings (publish), what a published store serves (catalog),
consumers' lookups (lookup: `get_location_embeddings`, `historical_features`), Feast's feature server (server),
a local Redis for the Redis online store (redis_server) and nearest-neighbour search (similar_index, similar).
May import core, orchestration, osm, raster, sampling, training and embedding.
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
