"""evaluation: do the embeddings help downstream classifiers? (the `evaluate` stage and the champion gate)

Owns the labels taken from OSM (labels), what an evaluation reads (context), the featuresets compared
(featuresets), the consumer classifiers (classifiers), spatial cross-validation and bootstrap (cv), the
evaluation run (run) and the champion gate (gate). May import every stage below it: core,
orchestration, osm, raster, sampling, training, embedding and serving.
"""
