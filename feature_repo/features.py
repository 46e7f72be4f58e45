"""Feature views over the embeddings sources.

`location_embedding` (with the baselines `tile_histogram` and `tag_counts`) serves, per cell, the row with the
latest event timestamp, whatever model version computed it: for exploration only, since a new champion
changes it. `pinned_embedding_view(version, ...)` makes `location_embedding_v<version>`, a view over that
version's own offline file (data/feast/versions/embeddings_v<version>.parquet): publishing another version
never changes what it serves. loc2vec publish builds one per served version (publish.retain_versions).

ttl: an embedding version stays valid until a newer one replaces it, so the ttl is long (10 years):
a point-in-time join at t sees the latest version with event_timestamp in [t − ttl, t], and nothing
(NaN) before the first version was published.
"""

from datetime import timedelta

from entities import h3_cell
from feast import FeatureView, Field, FileSource
from feast.types import Array, Float32, String
from sources import embeddings_source

TTL = timedelta(days=3650)
PINNED_PREFIX = "location_embedding_v"  # + the MLflow model version


def _embedding_schema() -> list[Field]:
    return [
        Field(name="h3_cell", dtype=String),
        Field(name="embedding", dtype=Array(Float32), description="16-D loc2vec embedding of the cell's tile"),
        Field(name="model_name", dtype=String, description="MLflow registered model"),
        Field(name="model_version", dtype=String, description="MLflow model version that computed `embedding`"),
    ]


location_embedding = FeatureView(
    name="location_embedding",
    entities=[h3_cell],
    ttl=TTL,
    schema=_embedding_schema(),
    online=True,
    source=embeddings_source,
    tags={"owner": "loc2vec", "role": "latest"},
)


def pinned_embedding_view(version: str, path: str, tags: dict[str, str]) -> FeatureView:
    """The feature view of one model version, over that version's offline file (`path`, relative to
    this directory); `tags` carry what a client needs to look it up (model name, H3 resolution)."""
    source = FileSource(
        name=f"location_embeddings_v{version}_source",
        path=path,
        timestamp_field="event_timestamp",
        created_timestamp_column="created",
        description=f"loc2vec embeddings of model version {version} only",
    )
    return FeatureView(
        name=f"{PINNED_PREFIX}{version}",
        entities=[h3_cell],
        ttl=TTL,
        schema=_embedding_schema(),
        online=True,
        source=source,
        tags={"owner": "loc2vec", "role": "pinned", **tags, "model_version": version},
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
