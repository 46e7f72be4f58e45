"""Feature services. Each serves the embedding with its model version and both baselines (tile histogram,
OSM tag counts), so a consumer's evaluation compares them on the same rows.

* `transport_mode_v<N>`, `venue_v<N>` (made by `pinned_services` for each served model version N): pinned to
  `location_embedding_v<N>`. A classifier trained on them keeps receiving the same vectors when a new
  champion is published; it moves to a newer version by retraining on its service.
* `latest`: the newest row per cell, whatever its model version. For exploration (and `loc2vec evaluate`,
  which scores what was just published): a new champion changes what it returns.
"""

from feast import FeatureService, FeatureView
from features import location_embedding, tag_counts, tile_histogram

CONSUMERS = {
    "transport_mode": "transport-mode classifier: where a GPS fix was taken",
    "venue": "venue-type classifier: what kind of place a check-in is",
}

latest = FeatureService(
    name="latest",
    features=[location_embedding[["embedding", "model_version"]], tile_histogram, tag_counts],
    description="the newest embedding of each cell, any model version: for exploration only, never for a model",
    tags={"model_version": ""},
)


def pinned_services(view: FeatureView, version: str) -> list[FeatureService]:
    """One service per consumer, pinned to `view` (the feature view of model version `version`)."""
    return [
        FeatureService(
            name=f"{consumer}_v{version}",
            features=[view[["embedding", "model_version"]], tile_histogram, tag_counts],
            description=f"{text}; model version {version}",
            tags={"model_version": version},
        )
        for consumer, text in CONSUMERS.items()
    ]
