"""loc2vec: self-supervised location embeddings from OpenStreetMap (Loc2Vec, SoftPN triplets)."""

__version__ = "0.1.0"
