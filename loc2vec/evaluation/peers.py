"""The peers: srai's embeddings as featuresets of the leak-free suite (optional extra ``loc2vec[peers]``).

srai (kraina-ai) is the library a user would pick instead of loc2vec. Two of its embedders are measured
beside loc2vec, fitted on the suite's training region(s) from the same extract:

* ``srai_contextual_counts`` – srai's ``ContextualCountEmbedder``: counts of OSM tag values (srai's
  Hex2Vec tag filter) per H3 cell at ``suite.peer_resolution`` (11: ~25 m edges), plus the average of each
  neighbour ring up to ``suite.peer_rings`` weighted 1/(d+1)² (srai's default; 2 rings ≈ the 100 m tile radius).
* ``srai_hex2vec`` – srai's ``Hex2VecEmbedder`` (skip-gram on neighbouring cells' count vectors; a 3-layer
  MLP encoder, srai's default 150-75-50), fitted on the H3 cells at ``suite.hex2vec_resolution`` (10:
  ~15,000 m², the closest H3 cell area to a 200 m tile) that hold a feature's representative point in the
  training regions. Chosen over GeoVex (a hexagonal convolution over k-ring patches) and S2Vec (a masked
  autoencoder over rasterised patches, which needs timm/torchvision): it trains in minutes on 2 CPU cores,
  and its embedding of a cell is a function of that cell's counts alone, so a label's object can be removed
  from it exactly. Fitted and applied on one torch thread (``_one_thread``): with two, the same seeded fit
  ended on other weights in a few busy processes.

**Source.** The features come from the region's PostGIS import (osm2pgsql's point/line/polygon tables,
columns and hstore tags), i.e. the extract recorded in ``loc2vec_meta.imports`` with its sha256: srai's
PBF loader (QuackOSM) needs DuckDB's spatial extension, which DuckDB downloads at first use, and srai 0.10.2
does not run with the current QuackOSM (0.19) or DuckDB (2.x); nothing here needs a network.

**Masking.** As for tag_counts, the label's own object is removed from the peers' inputs: the
``node``/``way`` osm2pgsql id of the label is dropped from the features of that label only (building_type:
the footprint stays counted as ``building=yes``, everything else it carries is dropped). Building types are
never counted: every ``building=*`` value is counted as ``building=yes`` (a footprint), as tag_counts counts
footprints. Contextual counts are linear in the cells' counts: a label's vector loses its object's own count
vector (srai's CountEmbedder) with the weight of each cell of its rings that the object intersects; Hex2Vec
encodes each label's own cell, counted without the object, with the fitted encoder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
from psycopg2 import sql

from loc2vec.core.config import SuiteConfig
from loc2vec.core.errors import Loc2VecError
from loc2vec.core.names import validate_region_name
from loc2vec.evaluation.leakfree import KEEP_CHANNELS
from loc2vec.osm.db import ConnInfo, cursor, require_import

if TYPE_CHECKING:
    import geopandas as gpd

log = logging.getLogger(__name__)

PEERS: tuple[str, ...] = ("srai_contextual_counts", "srai_hex2vec")
TABLES: tuple[str, ...] = ("point", "line", "polygon")
FOOTPRINT = "yes"  # every building=* value is counted as building=yes: no featureset counts building types


def require_srai() -> None:
    """Fail with one line when the optional extra is missing (the pipeline never needs it)."""
    try:
        import geopandas  # noqa: F401
        import pytorch_lightning  # noqa: F401
        import srai  # noqa: F401
    except ImportError as e:
        raise Loc2VecError(
            f"the srai peers need the optional extra ({e.name} is missing): pip install 'loc2vec[peers]',"
            " or leave srai_* out of evaluate.suite.baselines"
        ) from None


def tag_filter() -> dict[str, list[str]]:
    """srai's Hex2Vec tag filter with building types collapsed to building=yes (a footprint)."""
    from srai.loaders.osm_loaders.filters import HEX2VEC_FILTER

    out = {k: list(cast(list[str], v)) for k, v in HEX2VEC_FILTER.items()}
    out["building"] = [FOOTPRINT]
    return out


def osm_features(region: str, info: ConnInfo, keys: dict[str, list[str]]) -> gpd.GeoDataFrame:
    """srai's features frame (wide: one column per OSM key, the value where it is in the filter) of a region's
    import; index ``feature_id`` = ``"<table>:<osm2pgsql id>"`` (a way in both line and polygon appears twice,
    as osm2pgsql drew it)."""
    import geopandas as gpd
    import shapely

    schema = validate_region_name(region)
    frames = []
    with cursor(info) as cur:
        for table in TABLES:
            name = f"planet_osm_{table}"
            cur.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
                (schema, name),
            )
            columns = {r[0] for r in cur.fetchall()}
            exprs = [sql.Identifier(k) if k in columns else sql.SQL("tags -> {}").format(sql.Literal(k)) for k in keys]
            cur.execute(
                sql.SQL("SELECT osm_id, ST_AsBinary(ST_Transform(way, 4326)), {} FROM {}.{}").format(
                    sql.SQL(", ").join(exprs), sql.Identifier(schema), sql.Identifier(name)
                )
            )
            rows = cur.fetchall()
            if not rows:
                continue
            df = pd.DataFrame([r[2:] for r in rows], columns=list(keys), dtype=object)
            if "building" in df:
                b = df["building"]
                df["building"] = b.where(b.isna() | (b == "no"), FOOTPRINT).where(b.notna() & (b != "no"), None)
            for k, values in keys.items():
                df[k] = df[k].where(df[k].isin(values), None)
            keep = df.notna().any(axis=1).to_numpy()
            df = df[keep]
            df.index = pd.Index([f"{table}:{r[0]}" for r, k in zip(rows, keep, strict=True) if k], name="feature_id")
            geoms = shapely.from_wkb([bytes(r[1]) for r, k in zip(rows, keep, strict=True) if k])
            frames.append(gpd.GeoDataFrame(df, geometry=geoms, crs=4326))
    if not frames:
        raise Loc2VecError(f"region {region!r} has no OSM features in srai's tag filter")
    out = pd.concat(frames)
    return gpd.GeoDataFrame(out[~out.index.duplicated()], geometry="geometry", crs=4326)


def hidden_feature_ids(points: pd.DataFrame) -> list[tuple[str, ...]]:
    """Per label, the feature ids of its own object in `osm_features` (none for consumer points)."""
    if "hidden_id" not in points:
        return [()] * len(points)
    out: list[tuple[str, ...]] = []
    for table, i in zip(points["hidden_table"], points["hidden_id"], strict=True):
        if int(i) == 0:
            out.append(())
        elif table == "point":
            out.append((f"point:{int(i)}",))
        else:
            out.append((f"line:{int(i)}", f"polygon:{int(i)}"))
    return out


def _cells_gdf(cells: Sequence[str]) -> gpd.GeoDataFrame:
    """srai's regions frame of H3 cells (index ``region_id``)."""
    import geopandas as gpd
    import h3
    import shapely

    polys = [shapely.Polygon([(lng, lat) for lat, lng in h3.cell_to_boundary(c)]) for c in cells]
    return gpd.GeoDataFrame(index=pd.Index(list(cells), name="region_id"), geometry=polys, crs=4326)


def _join(regions: gpd.GeoDataFrame, features: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    from srai.joiners import IntersectionJoiner

    return IntersectionJoiner().transform(regions, features, return_geom=False)


def _masked(features: gpd.GeoDataFrame, hidden: Sequence[str], keep_footprint: bool) -> gpd.GeoDataFrame:
    """The features without a label's object (building_type: only its footprint, as building=yes)."""
    present = [h for h in hidden if h in features.index]
    if not keep_footprint:
        return features.drop(index=present)
    out = features.copy()
    for h in present:
        is_building = out.at[h, "building"] == FOOTPRINT if "building" in out else False
        for col in out.columns:
            if col != "geometry":
                out.at[h, col] = FOOTPRINT if (col == "building" and is_building) else None
        if not is_building:
            out = out.drop(index=h)
    return out


@contextmanager
def _canonical_pairs() -> Iterator[None]:
    """srai's Hex2Vec training pairs in one order, whatever the process: srai lists each region's neighbours from
    a set of H3 strings (its order follows PYTHONHASHSEED), so the same seed gave another fit in another process.
    Within the block the (anchor, positive) pairs are sorted."""
    import srai.embedders.hex2vec.embedder as module
    from srai.embedders.hex2vec.neighbour_dataset import NeighbourDataset

    class Sorted(NeighbourDataset):
        def _build_lookup_tables(self, data: pd.DataFrame, neighbourhood: Any) -> None:
            super()._build_lookup_tables(data, neighbourhood)
            order = np.lexsort((self._positive_df_locs_lookup, self._anchor_df_locs_lookup))
            self._anchor_df_locs_lookup = self._anchor_df_locs_lookup[order]
            self._positive_df_locs_lookup = self._positive_df_locs_lookup[order]

    original = module.NeighbourDataset
    setattr(module, "NeighbourDataset", Sorted)  # noqa: B010  # a class attribute of srai's module, swapped back
    try:
        yield
    finally:
        setattr(module, "NeighbourDataset", original)  # noqa: B010


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread inside the block (Hex2Vec's fit and transform), the caller's count restored after.

    With the commands' two threads the same seeded fit ended, in a few processes out of many and only while the
    machine was busy (a concurrent `make test`), on other weights (~6e-6 apart in the embeddings; no thread count,
    seed or input changed): one thread leaves no split of work to vary, and srai's small MLP loses little by it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class Peers:
    """The srai peers of one suite run: the region features (loaded once) and Hex2Vec fitted once.

    Attributes:
        cfg: params `evaluate.suite` (peer_resolution, peer_rings, hex2vec_*).
        info: the database.
        fit_regions: the regions Hex2Vec is fitted on (the suite's training regions).
    """

    cfg: SuiteConfig
    info: ConnInfo
    fit_regions: tuple[str, ...]
    _features: dict[str, Any] = field(default_factory=dict)
    _hex2vec: Any = None
    seconds: dict[str, float] = field(default_factory=dict)
    columns: dict[str, list[str]] = field(default_factory=dict)  # srai's column names of each peer (before drops)

    def features(self, region: str) -> gpd.GeoDataFrame:
        """The region's srai features (cached)."""
        if region not in self._features:
            start = time.perf_counter()
            self._features[region] = osm_features(region, self.info, tag_filter())
            self.seconds[f"load_{region}"] = round(time.perf_counter() - start, 1)
        return self._features[region]

    def embed(self, name: str, points: pd.DataFrame) -> np.ndarray:
        """(n, d) featureset `name` of the points, each without its label's object.

        Args:
            name: a peer (PEERS).
            points: labels (lat, lon, region, task, hidden_table, hidden_id).

        Returns:
            Row-aligned float array.
        """
        require_srai()
        import srai.embedders.contextual_count_embedder as cce

        cce.FORCE_TERMINAL = True  # srai's per-call progress bar: one per label otherwise
        points = points.reset_index(drop=True)
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        for region, group in points.groupby("region", sort=True):
            fn = self._contextual if name == "srai_contextual_counts" else self._hex2vec_embed
            parts.append((group.index.to_numpy(), fn(str(region), group)))
        out = np.full((len(points), parts[0][1].shape[1]), np.nan)
        for rows, values in parts:
            out[rows] = values
        return out

    def _keep_footprint(self, points: pd.DataFrame) -> list[bool]:
        """building_type keeps the label's footprint (as its tile and tag counts do)."""
        return [bool(KEEP_CHANNELS.get(str(t))) for t in points.get("task", [""] * len(points))]

    def _contextual(self, region: str, points: pd.DataFrame) -> np.ndarray:
        import h3
        from srai.embedders import ContextualCountEmbedder
        from srai.neighbourhoods import H3Neighbourhood

        start = time.perf_counter()
        res, rings = self.cfg.peer_resolution, self.cfg.peer_rings
        features = self.features(region)
        centres = [h3.latlng_to_cell(a, o, res) for a, o in zip(points["lat"], points["lon"], strict=True)]
        disks = [h3.grid_disk(c, rings) for c in centres]
        cells = sorted({c for d in disks for c in d})
        regions = _cells_gdf(cells)
        joint = _join(regions, features)
        by_cell = joint.index.to_frame(index=False).groupby("region_id")["feature_id"].agg(list).to_dict()

        embedder = ContextualCountEmbedder(
            H3Neighbourhood(regions),
            rings,
            concatenate_vectors=False,  # srai's default: ring averages added with weight 1/(d+1)²
            expected_output_features=cast(Any, tag_filter()),
            count_subcategories=True,  # key=value counts (srai's CountEmbedder default)
            num_of_multiprocessing_workers=1,
        )
        full = embedder.transform(regions, features, joint)
        self.columns["srai_contextual_counts"] = [str(c) for c in full.columns]
        out = full.loc[centres].to_numpy(float)
        keep = self._keep_footprint(points)
        # Without its object, a label's vector loses exactly what the object adds: the embedding is linear in the
        # counts (a cell's counts + the mean of each ring d's cells' counts / (d+1)^2). So each hidden object's own
        # count vector (srai's CountEmbedder on the object alone; building_type: minus its footprint's, which stays)
        # is subtracted with the weight of every cell of the label's rings that it intersects. One srai call for
        # all objects instead of one per label (Liechtenstein's three leak-free tasks: 110 → 18 s; test_peers checks
        # that both agree).
        hidden_near: list[list[str]] = []
        for disk, hidden in zip(disks, hidden_feature_ids(points), strict=True):
            near = {f for c in disk for f in by_cell.get(c, ())}
            hidden_near.append(sorted(near.intersection(hidden)))  # empty: the object is not counted here
        objects = sorted({f for ids in hidden_near for f in ids})
        delta = self._object_counts(features, objects, full.columns)
        footprints = sorted({f for ids, k in zip(hidden_near, keep, strict=True) if k for f in ids})
        stand_ins = _masked(features.loc[footprints], footprints, True)  # buildings' footprints, as building=yes
        kept = self._object_counts(stand_ins, list(stand_ins.index), full.columns)
        masked = 0
        for i, ids in enumerate(hidden_near):
            if not ids:
                continue
            for d in range(rings + 1):
                ring = h3.grid_ring(centres[i], d)
                weight = 1.0 if d == 0 else 1.0 / ((d + 1) ** 2 * len(ring))  # srai: the ring's mean / (d+1)^2
                for cell in ring:
                    for f in by_cell.get(cell, ()):
                        if f in ids:
                            out[i] -= weight * (delta[f] - (kept.get(f, 0.0) if keep[i] else 0.0))
            masked += 1
        # To 9 decimals (the smallest weight is 1/108): a count the subtraction removes is then exactly 0, as srai's
        # recount gives it (a residue of 1e-17 would keep an all-zero column alive and split a tree's bins), and values
        # that float noise tells apart are one value again, whichever way they were summed.
        out = np.round(out, 9) + 0.0  # + 0.0: no -0.0
        self.seconds[f"contextual_{region}"] = self.seconds.get(f"contextual_{region}", 0) + round(
            time.perf_counter() - start, 1
        )
        log.info("srai_contextual_counts %s: %d points, %d without their object's counts", region, len(points), masked)
        return out

    @staticmethod
    def _object_counts(features: gpd.GeoDataFrame, ids: list[str], columns: pd.Index) -> dict[str, np.ndarray]:
        """{feature id: its count vector} as srai's CountEmbedder counts it in a cell (each object its own region)."""
        if not ids:
            return {}
        import geopandas as gpd
        from srai.embedders import CountEmbedder

        objects = features.loc[ids]
        regions = gpd.GeoDataFrame(index=pd.Index(ids, name="region_id"), geometry=objects.geometry.values, crs=4326)
        joint = pd.DataFrame(index=pd.MultiIndex.from_arrays([ids, ids], names=["region_id", objects.index.name]))
        counts = CountEmbedder(expected_output_features=cast(Any, tag_filter()), count_subcategories=True).transform(
            regions, objects, joint
        )
        values = counts.reindex(columns=columns).fillna(0.0).to_numpy(float)
        return {f: values[j] for j, f in enumerate(counts.index)}

    def _fit_hex2vec(self) -> Any:
        import h3
        import pytorch_lightning as pl
        import torch
        from srai.embedders import Hex2VecEmbedder
        from srai.neighbourhoods import H3Neighbourhood

        start = time.perf_counter()
        res = self.cfg.hex2vec_resolution
        frames, joints, regions_all = [], [], []
        for region in self.fit_regions:
            features = self.features(region)
            cells = set()
            for geom in features.geometry.representative_point():
                cells.add(h3.latlng_to_cell(geom.y, geom.x, res))
            regions = _cells_gdf(sorted(cells))
            joint = _join(regions, features)
            frames.append(features)
            joints.append(joint)
            regions_all.append(regions)
        import geopandas as gpd

        features = gpd.GeoDataFrame(pd.concat(frames), geometry="geometry", crs=4326)
        features = features[~features.index.duplicated()]
        regions = gpd.GeoDataFrame(pd.concat(regions_all), geometry="geometry", crs=4326)
        regions = regions[~regions.index.duplicated()]
        joint = pd.concat(joints)
        joint = joint[~joint.index.duplicated()]
        pl.seed_everything(self.cfg.hex2vec_seed, workers=False, verbose=False)
        torch.manual_seed(self.cfg.hex2vec_seed)
        embedder = Hex2VecEmbedder(
            list(self.cfg.hex2vec_sizes),
            expected_output_features=cast(Any, tag_filter()),
        )
        # srai's counts come in a row and column order that varies from call to call: sorted (fit and transform
        # alike), and the training pairs sorted too (_canonical_pairs), the same seed gives the same fit anywhere
        raw_counts = embedder._get_raw_counts
        embedder._get_raw_counts = lambda *a, **k: raw_counts(*a, **k).sort_index().sort_index(axis=1)  # type: ignore[method-assign]
        with _canonical_pairs(), _one_thread():
            embedder.fit(
                regions,
                features,
                joint,
                H3Neighbourhood(regions),
                batch_size=self.cfg.hex2vec_batch_size,
                trainer_kwargs={
                    "max_epochs": self.cfg.hex2vec_epochs,
                    "accelerator": "cpu",
                    "logger": False,
                    "enable_checkpointing": False,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                },
            )
        self.seconds["fit_hex2vec"] = round(time.perf_counter() - start, 1)
        log.info(
            "srai_hex2vec fitted on %s: %d cells (%.0f s)", self.fit_regions, len(regions), self.seconds["fit_hex2vec"]
        )
        return embedder

    def _hex2vec_embed(self, region: str, points: pd.DataFrame) -> np.ndarray:
        import h3

        if self._hex2vec is None:
            self._hex2vec = self._fit_hex2vec()
        features = self.features(region)
        res = self.cfg.hex2vec_resolution
        centres = [h3.latlng_to_cell(a, o, res) for a, o in zip(points["lat"], points["lon"], strict=True)]
        cells = _cells_gdf(sorted(set(centres)))
        by_cell = _join(cells, features).index.to_frame(index=False).groupby("region_id")["feature_id"].agg(list)
        by_cell = by_cell.to_dict()
        # one srai region per label (its cell), counted without the label's own object
        ids = [f"label{i}" for i in range(len(points))]
        regions = _cells_gdf(centres)
        regions.index = pd.Index(ids, name="region_id")
        keep = self._keep_footprint(points)
        local_frames: list[gpd.GeoDataFrame] = []
        pairs: list[tuple[str, str]] = []
        for i, (cell, hidden) in enumerate(zip(centres, hidden_feature_ids(points), strict=True)):
            near = sorted(by_cell.get(cell, ()))
            if not near:
                continue
            local = _masked(features.loc[near], hidden, keep[i])
            local.index = pd.Index([f"{ids[i]}|{f}" for f in local.index], name="feature_id")
            local_frames.append(local)
            pairs.extend((ids[i], f) for f in local.index)
        import geopandas as gpd

        if local_frames:
            feats = gpd.GeoDataFrame(pd.concat(local_frames), geometry="geometry", crs=4326)
        else:
            feats = features.iloc[:0]
        joint = gpd.GeoDataFrame(index=pd.MultiIndex.from_tuples(pairs, names=["region_id", "feature_id"]))
        with _one_thread():
            emb = self._hex2vec.transform(regions, feats, joint)
        return emb.loc[ids].to_numpy(float)


def fit_regions_of(region: str, train_regions: Sequence[str]) -> tuple[str, ...]:
    """The regions the peers are fitted on: the training regions (transfer), else the evaluated region."""
    for r in (*train_regions, region):
        validate_region_name(r)
    return tuple(train_regions) or (region,)


def check_sources(regions: Sequence[str], info: ConnInfo) -> dict[str, dict[str, str]]:
    """The extract each region's features come from (its import record: the file's name and sha256), for the
    JSON: the name, not the path, so the same extract reads the same in any checkout."""
    out = {}
    for r in regions:
        rec = require_import(r, info)
        out[r] = {"source": Path(rec.source).name, "sha256": rec.sha256}
    return out


def drop_empty_columns(x: np.ndarray) -> np.ndarray:
    """Columns that are zero at every label dropped (tag values absent from the regions: most of srai's
    filter); label-free, so the same for training and tested rows."""
    keep = np.nanmax(np.abs(x), axis=0) > 0
    return x[:, keep] if keep.any() else x[:, :1]
