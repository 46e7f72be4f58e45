"""embedding: every H3 cell of a region → its embedding with the champion model (the `embed` stage).

Owns which cells (cells), their tag counts (tag_counts), encoding them (encode), the embeddings Parquet
(store) and the stage itself (run). May import core, orchestration, osm, raster, sampling and training.
"""
