"""`loc2vec similar`: vector-index query latency against a brute-force scan, side by side, and recall.

Queries are the embeddings of n random published cells (seeded), searched in their own model version's
groups of every published region (or of `region`), k = explore.similar.k, nothing excluded. `index_query`
is `SimilarIndex.search` (FAISS HNSW over distinct vectors by default, plus expanding vectors to cells);
`brute_force` is numpy over every published cell's vector (squared L2, argpartition, sort): what the
index replaces. `recall_at_k` counts index results no farther than the true k-th distance. `e2e` adds the
Feast online lookup of the query cell (`loc2vec.serving.similar.similar`), when the project is published.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from .common import latencies

if TYPE_CHECKING:
    from loc2vec.cli.project import Project


def _brute_force(vectors: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """The k smallest L2 distances from q to the rows of vectors, ascending."""
    d = ((vectors - q) ** 2).sum(axis=1)
    top = np.argpartition(d, k)[:k] if len(d) > k else np.arange(len(d))
    return np.sqrt(np.sort(d[top]))


def run(project: Project, *, region: str | None = None, n: int | None = None) -> dict[str, Any]:
    """Index query vs brute-force latency and recall on the project's published cells (`region`: only its)."""
    from loc2vec.serving.similar_index import ensure_index, published_cells

    n = n or 300
    t0 = time.perf_counter()
    index = ensure_index(project.params.explore.similar, project.paths, progress=False)
    ready_s = time.perf_counter() - t0
    cfg = index.cfg
    k = cfg.k
    cells = published_cells(project.paths.offline_store)
    regions = [region] if region else None
    index.check_regions(regions)
    pool = cells if region is None else cells[cells["region"] == region]
    rng = np.random.default_rng(0)
    picks = pool.iloc[rng.integers(0, len(pool), n)]
    queries = []
    for row in picks.itertuples(index=False):
        groups = index.select(row.model_name, str(row.model_version), regions)
        names = {g.region for g in groups}
        mask = (cells["model_version"] == row.model_version) & cells["region"].isin(names)
        queries.append((np.asarray(row.embedding, dtype=np.float32), groups, mask.to_numpy()))
    vectors = np.stack(cells["embedding"].to_numpy()).astype(np.float32)
    by_mask: dict[bytes, np.ndarray] = {}

    def scan(q) -> np.ndarray:
        key = q[2].tobytes()
        if key not in by_mask:  # the candidate matrix is built once, as a brute-force service would hold it
            by_mask[key] = np.ascontiguousarray(vectors[q[2]])
        return _brute_force(by_mask[key], q[0], k)

    result: dict[str, Any] = {
        "region": region or "all",
        "cells": index.n_cells,
        "groups": [
            {key: g[key] for key in ("region", "model_version", "cells", "vectors")} for g in index.manifest["groups"]
        ],
        "index": {
            "kind": cfg.index,
            "key": index.manifest["key"],
            "build_s": index.manifest["build_s"],
            "ready_s": round(ready_s, 2),
            "hnsw_m": cfg.hnsw_m,
            "ef_search": cfg.ef_search,
        },
        "k": k,
        "index_query": latencies(lambda q: index.search(q[0], q[1], k), queries, warmup=10),
        "brute_force": latencies(scan, queries, warmup=10),
    }
    result["speedup_p50"] = round(result["brute_force"]["p50_ms"] / max(result["index_query"]["p50_ms"], 1e-6), 1)
    recalls = []
    for q in queries:
        got = index.search(q[0], q[1], k)["distance"].to_numpy()
        kth = scan(q)[-1]
        recalls.append(float(np.mean(got <= kth * (1 + 1e-5) + 1e-6)) if len(got) else 0.0)
    result["recall_at_k"] = round(float(np.mean(recalls)), 4)
    result["e2e"] = _end_to_end(project, picks, index, max(10, n // 10))
    return result


def _end_to_end(project: Project, picks, index, n: int) -> dict[str, Any] | str:
    """`similar()` with its Feast online lookup of the query cell, on the project's own store."""
    from loc2vec.serving.similar import similar
    from loc2vec.serving.store import StoreSettings

    params = project.params
    try:
        store = StoreSettings.from_config(params.publish, params.embed, project.paths, project.info)
        lat, lon = picks["lat"].to_numpy()[:n], picks["lon"].to_numpy()[:n]
        return latencies(lambda i: similar(lat[i], lon[i], index, store), list(range(len(lat))), warmup=2)
    except Exception as exc:  # not published online: the index numbers above still stand
        return f"skipped: {type(exc).__name__}: {exc}"[:200]


if __name__ == "__main__":
    import json

    from loc2vec.cli.project import Project as _Project

    print(json.dumps(run(_Project.load()), indent=1))
