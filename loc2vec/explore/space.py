"""A region's embedding space, loaded for exploration: cells, distinct vectors, PCA colours, neighbours, tiles.

Why distinct vectors: a tile that is all forest is the same input everywhere, so thousands of cells share one
embedding (Liechtenstein: 7,830 all-green cells, 2,367 empty ones). Samples, projections, walks and
nearest-neighbour look-ups work on one representative cell per distinct vector, so a forest counts once and
not 7,830 times; the PCA is fit on them for the same reason (otherwise its first axis is "forest or not").

Why "concepts": interpolation and arithmetic need recognisable endpoints. Each concept scores a tile's channel
histogram (the fraction of pixels each channel draws, stored with every embedding), and its exemplar is the
best-scoring distinct tile: a town centre is many buildings and POIs, a forest is green and nothing else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from loc2vec.core.config import RenderConfig
from loc2vec.core.errors import Loc2VecError
from loc2vec.osm.db import ConnInfo
from loc2vec.raster.channels import CHANNEL_NAMES

log = logging.getLogger(__name__)


class ExploreError(Loc2VecError, RuntimeError):
    """The region cannot be explored (no embeddings, too few cells)."""


# concept → channel weights of a tile's histogram (fraction of pixels each channel draws); "*" weighs every
# channel not listed. The best example of a concept has the highest weighted sum. The weights are judgement.
CONCEPTS: dict[str, dict[str, float]] = {
    "town centre": {"buildings": 1, "pois": 5, "paths": 0.5, "green": -1, "farmland": -1},
    "residential": {"residential": 1, "buildings": 0.5, "commercial_industrial": -1, "green": -1, "farmland": -1,
                    "pois": -1},
    "forest": {"green": 1, "paths": 0, "*": -2},
    "farmland": {"farmland": 1, "paths": 0, "roads_minor": 0, "*": -2},
    "river": {"water_areas": 1, "waterways": 1, "buildings": -1},
    "major road": {"roads_major": 4, "buildings": -1, "residential": -1, "pois": -1},
    "industrial": {"commercial_industrial": 1, "buildings": 0.5, "pois": -5, "residential": -1, "green": -1},
    "rail": {"rail": 4, "commercial_industrial": 0.5, "green": -1},
}  # fmt: skip


def concept_score(concept: str, hist: np.ndarray) -> np.ndarray:
    """How well each (n, 12) histogram row exemplifies the concept (see CONCEPTS)."""
    weights = CONCEPTS[concept]
    w = np.array([weights.get(name, weights.get("*", 0.0)) for name in CHANNEL_NAMES], dtype=np.float32)
    return hist @ w


@dataclass
class Space:
    """Every embedded cell of a region, and the distinct vectors the exploration works on."""

    region: str
    model_name: str
    model_version: str
    h3_resolution: int
    h3_cell: np.ndarray  # (n,) object
    lat: np.ndarray
    lon: np.ndarray
    emb: np.ndarray  # (n, D) float32
    hist: np.ndarray  # (n, 12) float32, fraction of pixels each channel draws
    distinct: np.ndarray  # index of one representative cell per distinct vector
    counts: np.ndarray  # cells sharing each distinct vector
    rgb: np.ndarray = field(default_factory=lambda: np.empty((0, 3)))  # (n, 3) PCA colours in [0, 1]
    explained: np.ndarray = field(default_factory=lambda: np.empty(0))  # PCA explained variance ratios
    pca: Any = None
    _index: Any = None

    @property
    def n(self) -> int:
        return len(self.h3_cell)

    def nearest(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(L2 distances, positions in `distinct`) of the k nearest distinct vectors, exact."""
        import faiss

        if self._index is None:
            self._index = faiss.IndexFlatL2(self.emb.shape[1])
            self._index.add(np.ascontiguousarray(self.emb[self.distinct]))
        q = np.ascontiguousarray(np.atleast_2d(vectors).astype(np.float32))
        d2, ids = self._index.search(q, min(k, len(self.distinct)))
        return np.sqrt(np.maximum(d2, 0.0)), ids

    def exemplar(self, concept: str, rank: int = 0) -> int:
        """The cell index of the `rank`-th best distinct tile for a concept (see CONCEPTS)."""
        return int(self.top(concept, rank + 1)[-1])

    def top(self, concept: str, n: int) -> np.ndarray:
        """Cell indices of the n best distinct tiles for a concept, best first (ties: file order)."""
        reps = self.distinct
        score = concept_score(concept, self.hist[reps])
        return reps[np.lexsort((np.arange(len(reps)), -score))[:n]]


def load_space(region: str, path: Path) -> Space:
    """The region's embeddings (its embeddings Parquet at `path`), one model version, with PCA colours."""
    if not path.is_file():
        raise ExploreError(f"no embeddings for {region!r} at {path}: run `loc2vec embed --region {region}` first")
    cols = ["h3_cell", "lat", "lon", "embedding", "histogram", "model_name", "model_version", "h3_resolution"]
    table = pq.read_table(path, columns=cols)
    if table.num_rows < 10:
        raise ExploreError(f"{path} has {table.num_rows} cells: too few to explore")
    versions = set(table.column("model_version").to_pylist())
    if len(versions) != 1:
        raise ExploreError(f"{path} mixes model versions {sorted(versions)}: re-run `loc2vec embed`")
    emb = _matrix(table.column("embedding"))
    _, first, counts = np.unique(emb, axis=0, return_index=True, return_counts=True)
    order = np.argsort(first)  # representatives in file order (region, then h3 order): deterministic
    space = Space(
        region=region,
        model_name=str(table.column("model_name")[0].as_py()),
        model_version=str(table.column("model_version")[0].as_py()),
        h3_resolution=int(table.column("h3_resolution")[0].as_py()),
        h3_cell=np.asarray(table.column("h3_cell").to_pylist(), dtype=object),
        lat=table.column("lat").to_numpy(),
        lon=table.column("lon").to_numpy(),
        emb=emb,
        hist=_matrix(table.column("histogram")),
        distinct=first[order],
        counts=counts[order],
    )
    fit_pca(space)
    log.info(
        "%s: %d cells, %d distinct embeddings, model %s v%s",
        region,
        space.n,
        len(space.distinct),
        space.model_name,
        space.model_version,
    )
    return space


def _matrix(column) -> np.ndarray:
    """A list<float32> column → (n, k) float32."""
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(len(column), -1)


def fit_pca(space: Space) -> None:
    """3-D PCA fit on the distinct vectors; colours are each component's 1st–99th percentile mapped to 0–1."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=3, random_state=0).fit(space.emb[space.distinct])
    comps = pca.transform(space.emb)
    ref = comps[space.distinct]
    lo, hi = np.percentile(ref, 1, axis=0), np.percentile(ref, 99, axis=0)
    space.rgb = np.clip((comps - lo) / np.maximum(hi - lo, 1e-9), 0.0, 1.0)
    space.explained = pca.explained_variance_ratio_
    space.pca = pca


class Tiles:
    """RGB previews of a region's tiles, rendered directly with Mapnik (~5 ms each) and kept per cell."""

    def __init__(self, space: Space, render: RenderConfig, info: ConnInfo) -> None:
        self.space = space
        self.render, self.info = render, info
        self._rgb: dict[int, np.ndarray] = {}

    def rgb(self, i: int) -> np.ndarray:
        """(128, 128, 3) uint8 composite of cell i's tile (as the encoder saw it: angle 0, no shift)."""
        if i not in self._rgb:
            from loc2vec.raster.preview import composite_rgb
            from loc2vec.raster.render import render_tile

            tile = render_tile(
                self.space.region,
                float(self.space.lat[i]),
                float(self.space.lon[i]),
                render=self.render,
                info=self.info,
            )
            self._rgb[i] = composite_rgb(tile)
        return self._rgb[i]

    def __len__(self) -> int:
        return len(self._rgb)
