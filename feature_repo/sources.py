"""The offline data: one Parquet with every region and every model version (loc2vec/publish.py maintains it).

The path is relative to this directory, so it works from any checkout and in a test project root
(loc2vec.features builds the store with repo_path = <project root>/feature_repo).
"""

from feast import FileSource

embeddings_source = FileSource(
    name="location_embeddings_source",
    path="../data/feast/embeddings.parquet",
    timestamp_field="event_timestamp",
    created_timestamp_column="created",
    description="loc2vec embeddings, tile histograms and OSM tag counts per H3 cell, all regions and model versions",
)
