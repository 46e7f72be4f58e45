"""Feature views over the embeddings source.

ttl: an embedding version stays valid until a newer one replaces it, so the ttl is long (10 years):
a point-in-time join at t sees the latest version with event_timestamp in [t − ttl, t], and nothing
(NaN) before the first version was published.
"""

from datetime import timedelta

from entities import h3_cell
from feast import FeatureView, Field
from feast.types import Array, Float32, String
from sources import embeddings_source

TTL = timedelta(days=3650)

location_embedding = FeatureView(
    name="location_embedding",
    entities=[h3_cell],
    ttl=TTL,
    schema=[
        Field(name="h3_cell", dtype=String),
        Field(name="embedding", dtype=Array(Float32), description="16-D loc2vec embedding of the cell's tile"),
        Field(name="model_name", dtype=String, description="MLflow registered model"),
        Field(name="model_version", dtype=String, description="MLflow model version that computed `embedding`"),
    ],
    online=True,
    source=embeddings_source,
    tags={"owner": "loc2vec"},
)

tile_histogram = FeatureView(
    name="tile_histogram",
    entities=[h3_cell],
    ttl=TTL,
    schema=[
        Field(name="h3_cell", dtype=String),
        Field(name="histogram", dtype=Array(Float32), description="fraction of non-zero pixels per channel (12)"),
    ],
    online=True,
    source=embeddings_source,
    tags={"owner": "loc2vec", "role": "baseline"},
)

tag_counts = FeatureView(
    name="tag_counts",
    entities=[h3_cell],
    ttl=TTL,
    schema=[
        Field(name="h3_cell", dtype=String),
        Field(
            name="tag_counts",
            dtype=Array(Float32),
            description="OSM features within the tile radius, in the order of loc2vec.embed.TAG_COUNT_NAMES",
        ),
    ],
    online=True,
    source=embeddings_source,
    tags={"owner": "loc2vec", "role": "baseline"},
)
