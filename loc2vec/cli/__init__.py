"""cli: the `loc2vec` command line, an edge: it loads params.yaml once and passes typed sections down.

Owns argument parsing: one module per stage's commands (osm, raster, sampling, training, embedding,
serving, evaluation, explore) plus the flows and benchmarks, shared argument types (args) and the
loaded project (project). May import every subpackage; nothing in loc2vec imports it (the top-level
flows/ and benchmarks/ do).
"""

from loc2vec.cli.main import main

__all__ = ["main"]
