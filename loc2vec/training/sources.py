"""Where triplet batches get their tiles: stored direct tiles, tiles cut from metatiles, several regions.

`build_source` picks the configured source (`train.source`) for every region of the samples; rows of the
source follow the concatenated samples, so a batch's rows mean the same whatever the source.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from loc2vec.core.config import OrchestrateConfig
from loc2vec.core.errors import Loc2VecError
from loc2vec.core.paths import ProjectPaths
from loc2vec.osm.db import ConnInfo
from loc2vec.raster.cutter import cut_tiles
from loc2vec.raster.metatiles import MetatileSpec, ensure_metatiles
from loc2vec.raster.stored import TileStore
from loc2vec.training.batches import TileSource


class StoredTiles:
    """Pairs from a direct-tile store: P of the K pre-rendered positives, drawn without replacement."""

    def __init__(self, store: TileStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def pairs(self, rows: np.ndarray, n_pairs: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        anchors, positives = [], []
        for row in rows:
            tiles = self.store.location(int(row))
            pick = 1 + rng.choice(self.store.k, size=n_pairs, replace=n_pairs > self.store.k)
            anchors.append(np.repeat(tiles[:1], n_pairs, axis=0))
            positives.append(tiles[pick])
        return torch.from_numpy(np.concatenate(anchors)), torch.from_numpy(np.concatenate(positives))


class FastTiles:
    """Pairs cut on the fly from metatiles: every positive is a fresh random rotation and shift.

    With `centre_max_shift_m` (an encoder with a centre branch, model.centre_px > 0) every tile carries two views
    side by side in its channels: the context view, then the centre view. The anchor's two views are the anchor;
    a positive's centre view is cut at its context view's rotation, shifted only U(0, centre_max_shift_m) per axis
    (drawn after everything else, so the context views are those the source cuts without a centre branch).
    """

    def __init__(
        self,
        index,
        lats: np.ndarray,
        lons: np.ndarray,
        max_shift_m: float,
        device: str | None = None,
        centre_max_shift_m: float | None = None,
    ):
        self._cut = cut_tiles
        self.index, self.lats, self.lons = index, np.asarray(lats), np.asarray(lons)
        self.max_shift_m, self.device = max_shift_m, device
        self.centre_max_shift_m = centre_max_shift_m

    def __len__(self) -> int:
        return len(self.lats)

    def pairs(self, rows: np.ndarray, n_pairs: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        lats, lons = np.repeat(self.lats[rows], n_pairs), np.repeat(self.lons[rows], n_pairs)
        zeros = np.zeros(len(rows))
        anchors = self._cut(
            self.index, self.lats[rows], self.lons[rows], zeros, np.zeros((len(rows), 2)), device=self.device
        )
        angles = rng.uniform(0.0, 360.0, len(lats))
        shifts = rng.uniform(-self.max_shift_m, self.max_shift_m, (len(lats), 2))
        positives = self._cut(self.index, lats, lons, angles, shifts, device=self.device)
        anchors = anchors.repeat_interleave(n_pairs, dim=0)
        if self.centre_max_shift_m is None:
            return anchors, positives
        small = rng.uniform(-self.centre_max_shift_m, self.centre_max_shift_m, (len(lats), 2))
        centres = self._cut(self.index, lats, lons, angles, small, device=self.device)
        return torch.cat([anchors, anchors], 1), torch.cat([positives, centres], 1)


class ConcatSource:
    """Several regions' sources behind one row space (rows follow the concatenated samples)."""

    def __init__(self, parts: list[tuple[TileSource, int]]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [n for _, n in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def pairs(self, rows: np.ndarray, n_pairs: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        anchors: list[torch.Tensor | None] = [None] * len(rows)
        positives: list[torch.Tensor | None] = [None] * len(rows)
        for p in np.unique(part):  # one call per region, order restored below
            idx = np.flatnonzero(part == p)
            a, b = self.parts[p][0].pairs(rows[idx] - self.offsets[p], n_pairs, rng)
            for j, i in enumerate(idx):
                anchors[i], positives[i] = a[j * n_pairs : (j + 1) * n_pairs], b[j * n_pairs : (j + 1) * n_pairs]
        return torch.cat(anchors), torch.cat(positives)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SourceSettings:
    """What `build_source` needs: which source (params `train.source`), and where its tiles come from."""

    kind: str  # metatiles | tiles
    paths: ProjectPaths
    spec: MetatileSpec
    info: ConnInfo
    orchestrate: OrchestrateConfig
    max_shift_m: float  # augment.max_shift_m: the positives' shifts (the metatile margin covers them)
    centre_max_shift_m: float | None = None  # augment.centre_max_shift_m with a centre branch (FastTiles), else None


def build_source(samples: pd.DataFrame, settings: SourceSettings, device: torch.device) -> TileSource:
    """The configured tile source for every region of the samples (rows = samples' order)."""
    parts: list[tuple[TileSource, int]] = []
    for region, frame in samples.groupby("region", sort=False):
        name = str(region)
        if settings.kind == "tiles":
            if settings.centre_max_shift_m is not None:
                raise Loc2VecError(
                    "an encoder with a centre branch (model.centre_px > 0) trains on train.source: metatiles"
                    " (its centre views are cut on the fly)"
                )
            store = TileStore(settings.paths.tile_store(name))
            if len(store) != len(frame):
                raise Loc2VecError(f"tile store of {name!r} is out of date: run `loc2vec render-tiles --region {name}`")
            parts.append((StoredTiles(store), len(frame)))
        else:
            lats, lons = frame["lat"].to_numpy(), frame["lon"].to_numpy()
            index = ensure_metatiles(
                name,
                lats,
                lons,
                spec=settings.spec,
                paths=settings.paths,
                info=settings.info,
                orchestrate=settings.orchestrate,
            )
            dev = str(device) if device.type == "cuda" else None
            fast = FastTiles(
                index, lats, lons, settings.max_shift_m, device=dev, centre_max_shift_m=settings.centre_max_shift_m
            )
            parts.append((fast, len(frame)))
    return parts[0][0] if len(parts) == 1 else ConcatSource(parts)


def load_samples(regions: list[str], paths: ProjectPaths) -> pd.DataFrame:
    """The regions' samples, concatenated in region order, with a `region` column."""
    frames = []
    for region in regions:
        path = paths.samples(region)
        if not path.is_file():
            raise Loc2VecError(f"no samples for region {region!r} ({path}): run `loc2vec sample --region {region}`")
        frames.append(pd.read_parquet(path).assign(region=region))
    return pd.concat(frames, ignore_index=True)
