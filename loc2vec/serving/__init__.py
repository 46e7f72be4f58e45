"""serving: the feature store (the `publish` stage) and what consumers call.

Owns the Feast store of a project (store), consumers' lookups (lookup: `get_location_embeddings`,
`historical_features`), publishing embeddings (publish) and nearest-neighbour search over them
(similar_index, similar). May import core, orchestration, osm, raster, sampling, training and embedding.
"""
