"""orchestration: fan-out over task runners (inline, threads, Dask) and retries of transient failures.

Owns choosing and building a Prefect task runner and mapping calls over it (runners), and telling a
transient failure from a final one (transient). No domain code: stages hand it plain functions and
arguments (raster's metatile renders, embedding's encode chunks). May import core only. The Prefect flows
that run the DVC stages are the top-level `flows/` package, an edge like the command line.
"""
