"""One FeatureService per consumer. Each serves the embedding with its model version and both baselines
(tile histogram, OSM tag counts), so a consumer's evaluation compares them on the same rows."""

from feast import FeatureService
from features import location_embedding, tag_counts, tile_histogram

transport_mode_v1 = FeatureService(
    name="transport_mode_v1",
    features=[location_embedding[["embedding", "model_version"]], tile_histogram, tag_counts],
    description="transport-mode classifier: where a GPS fix was taken",
)

venue_v1 = FeatureService(
    name="venue_v1",
    features=[location_embedding[["embedding", "model_version"]], tile_histogram, tag_counts],
    description="venue-type classifier: what kind of place a check-in is",
)
