"""training: the encoder and how it learns (the `train` stage).

Owns the model, losses, triplet batches and their tile sources, the trainer with its early stopping,
checkpoints and outputs, DDP plumbing, MLflow tracking and the model registry (champion/candidate).
May import core, orchestration, osm, raster and sampling.
"""
