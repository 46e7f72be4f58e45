"""The vector index behind `loc2vec similar`: FAISS over the published embeddings, one group per region × version.

What is indexed: the published data, i.e. Feast's offline source (data/feast/embeddings.parquet), reduced to
the newest row per H3 cell, which is exactly what the online store serves.

Why FAISS: Feast 0.67's vector search does not fit here (the SQLite store's sqlite-vec is enabled on
Python 3.10 only; the PostgreSQL store's pgvector columns get no index, a full scan). FAISS's HNSW answers a
16-D query over 280k cells in ~0.3 ms against ~20 ms for a numpy scan (`loc2vec bench similar`).

Why one index per (region, model version): distances between embeddings of two model versions mean
nothing, so only the query's model version is searched; per-region indexes make ``--regions`` a choice of
indexes and the merge of k-per-region results exact.

Why distinct vectors: a tile that is all forest (or all farmland, or empty) is the same input everywhere,
so tens of thousands of cells share one embedding (Liechtenstein + Andorra: 57,590 all-green cells). HNSW
graphs break on such duplicates (recall stalls near 0.85 at any ef); indexing each distinct vector once,
with its cells listed beside it, gives recall 1.0 at ef 64 and a 27% smaller graph. Ties are returned in
(distance, region, h3_cell) order.

Persistence: data/index/similar-<key>/ (FAISS files, the cells as Parquet, a manifest), where the key is the
digest of the published snapshot (the offline store's generation, or its single file) and of the build
settings; a changed publication gets a new key and the index is rebuilt into a temporary directory and
renamed into place (atomic), under a lock, and older ones removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from loc2vec.core.atomic import file_lock
from loc2vec.core.config import SimilarConfig
from loc2vec.core.errors import Loc2VecError
from loc2vec.core.paths import ProjectPaths

log = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is not news
FORMAT = 1  # bump when the on-disk layout changes: old indexes are rebuilt
SOURCE_COLUMNS = ["h3_cell", "region", "lat", "lon", "embedding", "model_name", "model_version", "event_timestamp"]


class SimilarError(Loc2VecError, RuntimeError):
    """A similarity query cannot be answered (nothing published, unknown region, stale index)."""


class NothingPublishedError(SimilarError):
    """No embeddings have been published to the feature store yet."""


def build_settings(cfg: SimilarConfig) -> dict[str, Any]:
    """What changes the built index (ef_search is a query-time setting)."""
    return {"format": FORMAT, "index": cfg.index, "hnsw_m": cfg.hnsw_m, "ef_construction": cfg.ef_construction}


# ---------------------------------------------------------------- published data


def published_cells(path: Path, data: bytes | Path | None = None) -> pd.DataFrame:
    """The newest published row per H3 cell (what the online store serves), sorted by region and cell.

    `path`: Feast's offline source (core.paths offline_store: a link to a generation directory of partition
    files, serving/offline.py, or an older loc2vec's single file); `data`: the file's bytes or the generation
    directory (never changed once made), when the caller needs the rows of exactly the snapshot it hashed."""
    if data is None and not path.exists():
        raise NothingPublishedError(
            f"nothing published: {path} does not exist (run `loc2vec embed` and `loc2vec publish` first)"
        )
    source = pa.BufferReader(data) if isinstance(data, bytes) else (data or path)
    df = pq.read_table(source, columns=SOURCE_COLUMNS).to_pandas()
    if df.empty:
        raise NothingPublishedError(f"nothing published: {path} has no rows")
    df = df.sort_values(["h3_cell", "event_timestamp", "region"]).drop_duplicates("h3_cell", keep="last")
    return df.sort_values(["region", "h3_cell"]).reset_index(drop=True)


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file, memoised per (path, size, mtime) within the process."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        with open(path, "rb") as fh:
            _DIGESTS[memo] = hashlib.file_digest(fh, "sha256").hexdigest()
    return _DIGESTS[memo]


def snapshot(source: Path) -> tuple[str, bytes | Path]:
    """The published data as one unchanging snapshot and its digest: the generation directory the source links
    to (named by the digest of its listing, its files named by content; publish never changes one in place),
    or, for an older loc2vec's single file, its bytes."""
    if source.is_dir():
        generation = source.resolve()
        listing = "\n".join(sorted(p.name for p in generation.glob("*.parquet")))
        return hashlib.sha256(f"{generation.parent.name}/{generation.name}\n{listing}".encode()).hexdigest(), generation
    data = source.read_bytes()
    return hashlib.sha256(data).hexdigest(), data


def index_key(source_digest: str, cfg: SimilarConfig) -> str:
    """The name of the index of a publication (its digest) built with these settings."""
    text = json.dumps({"source": source_digest, **build_settings(cfg)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the index


@dataclass
class Group:
    """One region × model version: an index over its distinct vectors and the cells of each vector.

    Cells are plain arrays ordered by (vector id, h3_cell): a query touches only the few rows it returns.
    """

    region: str
    model_name: str
    model_version: str
    index: Any  # faiss.Index over the distinct vectors
    h3_cell: np.ndarray  # object array of cell ids
    lat: np.ndarray
    lon: np.ndarray
    offsets: np.ndarray  # cells of vector v: rows offsets[v]:offsets[v + 1]

    @property
    def n_vectors(self) -> int:
        """Distinct vectors in the group's index."""
        return len(self.offsets) - 1


def _new_index(vectors: np.ndarray, cfg: SimilarConfig) -> Any:
    import faiss

    index: Any
    if cfg.index == "flat":
        index = faiss.IndexFlatL2(vectors.shape[1])
    else:
        index = faiss.IndexHNSWFlat(vectors.shape[1], cfg.hnsw_m)
        index.hnsw.efConstruction = cfg.ef_construction
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def build_group(cells: pd.DataFrame, cfg: SimilarConfig) -> tuple[Any, pd.DataFrame, np.ndarray]:
    """(index over the distinct vectors, cells ordered by vector id then h3_cell, CSR offsets)."""
    vectors = np.stack(cells["embedding"].to_numpy()).astype(np.float32)
    distinct, inverse = np.unique(vectors, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.lexsort((cells["h3_cell"].to_numpy(), inverse))
    ordered = cells.iloc[order][["h3_cell", "lat", "lon"]].reset_index(drop=True)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=len(distinct)))]).astype(np.int64)
    return _new_index(distinct, cfg), ordered, offsets


def _write_group(directory: Path, i: int, index: Any, cells: pd.DataFrame, offsets: np.ndarray) -> None:
    import faiss

    faiss.write_index(index, str(directory / f"group_{i}.faiss"))
    cells.to_parquet(directory / f"group_{i}.cells.parquet", index=False)
    np.save(directory / f"group_{i}.offsets.npy", offsets)


def build_index(
    directory: Path,
    cfg: SimilarConfig,
    source: Path,
    data: bytes | Path,
    key: str,
    progress: bool = True,
    digest: str | None = None,
) -> dict[str, Any]:
    """Build every (region, model version) group of the published cells (`data`: the snapshot of `source`,
    `digest` its digest) into `directory`; returns the manifest."""
    import faiss
    from tqdm import tqdm

    started = time.perf_counter()
    cells = published_cells(source, data)
    faiss.omp_set_num_threads(max(1, min(2, faiss.omp_get_max_threads())))
    groups = []
    keys = ["region", "model_name", "model_version"]
    grouped = list(cells.groupby(keys, sort=True))
    for i, ((region, name, version), part) in enumerate(tqdm(grouped, desc="similar index", disable=not progress)):
        index, ordered, offsets = build_group(part, cfg)
        _write_group(directory, i, index, ordered, offsets)
        groups.append(
            {
                "id": i,
                "region": region,
                "model_name": name,
                "model_version": str(version),
                "cells": len(ordered),
                "vectors": len(offsets) - 1,
            }
        )
    manifest = {
        "key": key,
        "source": str(source),
        "source_sha256": digest or snapshot(source)[0],
        "settings": build_settings(cfg),
        "groups": groups,
        "cells": int(len(cells)),
        "build_s": round(time.perf_counter() - started, 2),
        "built_at": pd.Timestamp.now(tz="UTC").isoformat(),
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


@dataclass
class SimilarIndex:
    """The loaded index of every published (region, model version)."""

    directory: Path
    manifest: dict[str, Any]
    groups: list[Group]
    cfg: SimilarConfig

    @property
    def regions(self) -> list[str]:
        """The published regions."""
        return sorted({g.region for g in self.groups})

    @property
    def n_cells(self) -> int:
        """Published cells indexed."""
        return int(self.manifest["cells"])

    def check_regions(self, regions: Sequence[str] | None) -> None:
        """Raise SimilarError naming the published regions when a region asked for is not one of them."""
        unknown = sorted(set(regions or ()) - set(self.regions))
        if unknown:
            raise SimilarError(f"region(s) {unknown} are not published; published: {self.regions}")

    def select(self, model_name: str, model_version: str, regions: Sequence[str] | None = None) -> list[Group]:
        """The groups of one model version, in the given regions (all by default); errors name what exists."""
        self.check_regions(regions)
        chosen = [g for g in self.groups if g.model_name == model_name and g.model_version == str(model_version)]
        chosen = [g for g in chosen if regions is None or g.region in regions]
        if not chosen:
            where = f" in {sorted(regions)}" if regions is not None else ""
            have = sorted({f"{g.region}: {g.model_name} v{g.model_version}" for g in self.groups})
            raise SimilarError(f"no published cells of {model_name} v{model_version}{where}; published: {have}")
        return chosen

    def search(
        self, vector: np.ndarray, groups: Sequence[Group], k: int, exclude: frozenset[str] = frozenset()
    ) -> pd.DataFrame:
        """The k cells nearest to `vector` in the groups, skipping `exclude`: h3_cell, region, lat, lon,
        distance, model_version, in (distance, region, h3_cell) order."""
        import faiss

        faiss.omp_set_num_threads(1)  # one query: threads only add latency
        query = np.ascontiguousarray(np.asarray(vector, dtype=np.float32).reshape(1, -1))
        rows: list[tuple] = []
        for g in groups:
            if self.cfg.index == "hnsw":
                g.index.hnsw.efSearch = max(self.cfg.ef_search, k + len(exclude))
            dist, ids = g.index.search(query, min(k + len(exclude), g.n_vectors))
            rows += _expand(g, dist[0], ids[0], k, exclude)
        rows.sort(key=lambda r: (r[0], r[1], r[2]))
        rows = rows[:k]
        return pd.DataFrame(
            {
                "h3_cell": [r[2] for r in rows],
                "region": [r[1] for r in rows],
                "lat": np.array([r[3] for r in rows], dtype=np.float64),
                "lon": np.array([r[4] for r in rows], dtype=np.float64),
                "distance": np.array([r[0] for r in rows], dtype=np.float64),
                "model_version": [r[5] for r in rows],
            }
        )


def _expand(g: Group, dist: np.ndarray, ids: np.ndarray, k: int, exclude: frozenset[str]) -> list[tuple]:
    """(distance, region, h3_cell, lat, lon, version) of the returned vectors' cells, excluded ones
    dropped, at most k: a vector shared by 50,000 all-forest cells yields only the cells needed."""
    out: list[tuple] = []
    for d, vid in zip(dist.tolist(), ids.tolist(), strict=True):
        if vid < 0 or len(out) >= k:
            break
        distance = math.sqrt(max(d, 0.0))
        for j in range(int(g.offsets[vid]), int(g.offsets[vid + 1])):
            cell = g.h3_cell[j]
            if cell in exclude:
                continue
            out.append((distance, g.region, cell, float(g.lat[j]), float(g.lon[j]), g.model_version))
            if len(out) >= k:
                break
    return out


def _cell_arrays(path: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    return {
        "h3_cell": np.asarray(table.column("h3_cell").to_pylist(), dtype=object),
        "lat": table.column("lat").to_numpy(),
        "lon": table.column("lon").to_numpy(),
    }


def _load(directory: Path, cfg: SimilarConfig) -> SimilarIndex:
    import faiss

    manifest = json.loads((directory / "manifest.json").read_text())
    groups = []
    for meta in manifest["groups"]:
        i = meta["id"]
        groups.append(
            Group(
                region=meta["region"],
                model_name=meta["model_name"],
                model_version=meta["model_version"],
                index=faiss.read_index(str(directory / f"group_{i}.faiss")),
                **_cell_arrays(directory / f"group_{i}.cells.parquet"),
                offsets=np.load(directory / f"group_{i}.offsets.npy"),
            )
        )
    return SimilarIndex(directory=directory, manifest=manifest, groups=groups, cfg=cfg)


def ensure_index(
    cfg: SimilarConfig, paths: ProjectPaths, *, rebuild: bool = False, progress: bool = True
) -> SimilarIndex:
    """The index of the current publication: loaded when its key matches, else built (atomically) first.

    Args:
        cfg: params `explore.similar`.
        paths: the project (its offline store is the source; data/index holds the index).
        rebuild: build even if the current index exists.
        progress: show a progress bar while building.

    Raises:
        NothingPublishedError: nothing was published yet.
    """
    source = paths.offline_store
    if not source.exists():
        raise NothingPublishedError(
            f"nothing published: {source} does not exist (run `loc2vec embed` and `loc2vec publish` first)"
        )
    key = index_key(file_digest(source) if source.is_file() else snapshot(source)[0], cfg)
    root = paths.similar_index
    final = root / f"similar-{key}"
    if final.is_dir() and not rebuild:
        return _load(final, cfg)
    with file_lock(root / ".similar.lock"):
        digest, data = snapshot(source)  # one snapshot for the key and the rows: publish may switch generations
        final = root / f"similar-{index_key(digest, cfg)}"
        if rebuild or not final.is_dir():
            _build_into(final, cfg, source, data, progress, digest)
    return _load(final, cfg)


def _build_into(final: Path, cfg: SimilarConfig, source: Path, data: bytes | Path, progress: bool, digest: str) -> None:
    """Build in a temporary sibling, rename it to `final` (atomic), then drop other (stale) indexes."""
    root = final.parent
    _ignore_in_git(root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        manifest = build_index(tmp, cfg, source, data, final.name.removeprefix("similar-"), progress, digest)
        shutil.rmtree(final, ignore_errors=True)
        tmp.chmod(0o755)  # mkdtemp makes 0700
        tmp.rename(final)  # atomic: readers see no index or a complete one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "similar index %s: %d cells, %d groups in %.1f s",
        manifest["key"],
        manifest["cells"],
        len(manifest["groups"]),
        manifest["build_s"],
    )
    for old in root.glob("similar-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _ignore_in_git(root: Path) -> None:
    """data/index/ is derived and rebuilt on demand: keep it out of git (as data/model/ does)."""
    ignore = root / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
