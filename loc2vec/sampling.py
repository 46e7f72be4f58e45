"""Training locations: where people are, split spatially, without empty tiles.

Kinds (the mix is ``sample.mix`` in params.yaml):

* **visits** – POIs (amenity/shop/tourism points, ``ST_PointOnSurface`` of POI areas, same filter
  as the ``pois`` channel) and buildings (``ST_PointOnSurface``), drawn without replacement,
  uniformly over that union: where people live, work and go.
* **transport** – uniform along the road, rail and path network (the channels' road/path/rail
  classes): a point at a uniform arc length of the whole clipped network, so a line is picked
  with probability ∝ its true length (Mercator length × cos φ).
* **uniform** – uniform by area (uniform in lon and sin φ) over *mapped land*: points that fall in
  a land-use/natural/leisure/amenity/building polygon that is not water, or within radius/2 of a
  road, rail or path line. The extract's empty bbox corners (outside the country cut) never qualify.

All randomness is a numpy ``Generator`` seeded with ``(seed, kind)``; SQL only returns candidate
geometries in a fixed ``ORDER BY``, so the same params and import give the identical Parquet.
Every point lies inside the import bbox shrunk by ``render.radius_m``, so its tile is inside the data.

**Low-information rule.** Each candidate's anchor tile is rendered (``get_renderer(region).render``)
and scored: ``f_c = mean(tile_c > 0)`` per channel; ``coverage`` = fraction of pixels where any
channel is drawn; ``entropy`` = Shannon entropy of ``p_c = f_c / Σ f`` divided by ln 12 (0 = one
channel only, 1 = all channels equally). Candidates with ``coverage < min_coverage`` (bare
mountain, outside the data) are dropped; the rest get ``weight = min_weight + (1 − min_weight) ·
min(1, entropy / entropy_floor)`` in (0, 1], so a tile of nothing but forest counts less than a village.

**Spatial split rule.** Locations fall in square blocks of ``block_m`` metres (an equirectangular
frame at the region's mid-latitude, origin at its south-west corner); each block goes to train,
val or test by a seeded hash of its id against the cumulative ``splits`` fractions. Then the
buffer: every *train* location within ``2 · radius_m + extra_buffer_m`` (great-circle distance,
via unit-sphere chords in a KD-tree) of any val or test location is dropped, so no train tile
overlaps or touches an evaluation tile. Val and test keep all their locations (they are the scarce ones).

Candidates are drawn in rounds, oversampled by the survival rate seen so far, until each kind
has its quota ``round(N · mix_k)``; each kind is then cut to its first survivors in draw order
(dropping points never breaks the buffer). If a region cannot supply a quota, the shortfall is logged.
"""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing as mp
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from psycopg2 import sql
from sklearn.neighbors import KDTree
from tqdm import tqdm

from loc2vec.atomic import atomic_path
from loc2vec.channels import MAJOR_ROADS, MINOR_ROADS, N_CHANNELS, NOT_POI_AMENITY, PATHS, RAIL
from loc2vec.config import ConfigError, load_params, section_config
from loc2vec.db import cursor, require_import
from loc2vec.osm import check_region_name
from loc2vec.render import EARTH_RADIUS_M, get_renderer

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("visits", "transport", "uniform")
SPLITS: tuple[str, ...] = ("train", "val", "test")
MEAN_EARTH_RADIUS_M = 6371008.8  # great-circle distances; Mercator maths uses EARTH_RADIUS_M
COLUMNS = ["location_id", "lat", "lon", "kind", "split", "block", "weight", "coverage", "entropy"]


@dataclass(frozen=True)
class SampleConfig:
    n_locations: int = 4000
    seed: int = 42
    mix: dict[str, float] = field(default_factory=lambda: {"visits": 0.5, "transport": 0.3, "uniform": 0.2})
    block_m: float = 1000.0
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    extra_buffer_m: float = 0.0  # added to 2·radius (e.g. the augmentation shift)
    min_coverage: float = 0.02
    entropy_floor: float = 0.3
    min_weight: float = 0.2
    oversample: float = 1.25  # first-round draw factor; later rounds use the observed survival rate
    max_rounds: int = 6
    workers: int = 0  # render processes; 0 = one per core

    def __post_init__(self) -> None:
        if set(self.mix) - set(KINDS) or not any(v > 0 for v in self.mix.values()):
            raise ConfigError(f"sample.mix: weights for {list(KINDS)}, at least one > 0; got {self.mix}")
        if set(self.splits) != set(SPLITS) or abs(sum(self.splits.values()) - 1.0) > 1e-6:
            raise ConfigError(f"sample.splits: fractions for {list(SPLITS)} summing to 1; got {self.splits}")
        if any(v < 0 for v in (*self.mix.values(), *self.splits.values())):
            raise ConfigError("sample.mix and sample.splits must not be negative")
        if self.n_locations < 1 or self.max_rounds < 1 or self.block_m <= 0 or not 0 < self.min_weight <= 1:
            raise ConfigError("sample: n_locations, max_rounds ≥ 1, block_m > 0 and 0 < min_weight ≤ 1 are required")

    def quotas(self) -> dict[str, int]:
        """round(N · mix_k) per kind by largest remainder, so the quotas sum to N exactly."""
        total = sum(self.mix.get(k, 0.0) for k in KINDS)
        exact = {k: self.n_locations * self.mix.get(k, 0.0) / total for k in KINDS}
        out = {k: int(math.floor(v)) for k, v in exact.items()}
        for k in sorted(KINDS, key=lambda k: out[k] - exact[k])[: self.n_locations - sum(out.values())]:
            out[k] += 1
        return out


# ---------------------------------------------------------------- geometry helpers


def to_mercator(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lon, lat = np.asarray(lon, float), np.asarray(lat, float)
    return np.radians(lon) * EARTH_RADIUS_M, np.log(np.tan(np.pi / 4 + np.radians(lat) / 2)) * EARTH_RADIUS_M


def from_mercator(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lon, lat) in degrees of Web Mercator metres."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    return np.degrees(x / EARTH_RADIUS_M), np.degrees(np.arctan(np.sinh(y / EARTH_RADIUS_M)))


def inner_bbox(bbox: tuple[float, float, float, float], margin_m: float) -> tuple[float, float, float, float]:
    """The bbox shrunk by margin_m on every side (lon margin taken at the most poleward latitude)."""
    west, south, east, north = bbox
    dlat = math.degrees(margin_m / MEAN_EARTH_RADIUS_M)
    dlon = math.degrees(margin_m / (MEAN_EARTH_RADIUS_M * math.cos(math.radians(max(abs(south), abs(north))))))
    if west + dlon >= east - dlon or south + dlat >= north - dlat:
        raise ConfigError(f"region bbox {bbox} is smaller than two tile radii")
    return west + dlon, south + dlat, east - dlon, north - dlat


def unit_xyz(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Points on the unit sphere: chord distances are monotone in great-circle distance, anywhere."""
    phi, lam = np.radians(np.asarray(lat, float)), np.radians(np.asarray(lon, float))
    return np.column_stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)])


def chord(distance_m: float) -> float:
    return 2.0 * math.sin(distance_m / (2.0 * MEAN_EARTH_RADIUS_M))


def location_ids(region: str, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Stable ids: a hash of region and coordinates (1e-7°), independent of N, order and seed."""
    out = np.empty(len(lat), dtype=np.int64)
    for i, (a, b) in enumerate(zip(lat, lon, strict=True)):
        key = f"{region}:{round(float(a) * 1e7)}:{round(float(b) * 1e7)}".encode()
        out[i] = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)
    return out


def _unit_hash(seed: int, value: int) -> float:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{value}".encode(), digest_size=8).digest(), "little") / 2.0**64


# ---------------------------------------------------------------- candidates from PostGIS

POI_WHERE = f"((amenity IS NOT NULL AND amenity NOT IN {NOT_POI_AMENITY}) OR shop IS NOT NULL OR tourism IS NOT NULL)"
NETWORK_WHERE = f"(highway IN {MAJOR_ROADS} OR highway IN {MINOR_ROADS} OR highway IN {PATHS} OR railway IN {RAIL})"
LAND_WHERE = (
    "((landuse IS NOT NULL AND landuse NOT IN ('reservoir','basin')) OR leisure IS NOT NULL OR amenity IS NOT NULL"
    " OR (building IS NOT NULL AND building <> 'no')"
    " OR (\"natural\" IS NOT NULL AND \"natural\" NOT IN ('water','bay','strait')))"
    " AND water IS NULL AND waterway IS NULL"
)
ENVELOPE = "ST_MakeEnvelope(%s, %s, %s, %s, 3857)"


class _Candidates:
    """Draws candidate points of each kind inside the inner bbox (Mercator geometry from PostGIS)."""

    def __init__(self, region: str, box: tuple[float, float, float, float], radius_m: float, seed: int):
        self.schema = sql.Identifier(region)
        self.box = box
        x0, y0 = to_mercator(box[0], box[1])
        x1, y1 = to_mercator(box[2], box[3])
        self.env = (float(x0), float(y0), float(x1), float(y1))
        self.radius_m = radius_m
        self.rngs = {k: np.random.default_rng([seed, i]) for i, k in enumerate(KINDS)}
        self._visits: np.ndarray | None = None  # (n, 2) lon/lat in a seeded random order
        self._visits_next = 0
        self._network: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # seg starts, ends, cum length

    def _inside(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        w, s, e, n = self.box
        return (lon > w) & (lon < e) & (lat > s) & (lat < n)

    def draw(self, kind: str, n: int) -> np.ndarray:
        """Up to n (lon, lat) rows; fewer only when the visits pool is exhausted."""
        if n <= 0:
            return np.empty((0, 2))
        return {"visits": self._draw_visits, "transport": self._draw_transport, "uniform": self._draw_uniform}[kind](n)

    def _draw_visits(self, n: int) -> np.ndarray:
        if self._visits is None:
            query = sql.SQL(
                """SELECT ST_X(g), ST_Y(g) FROM (
                     SELECT 0 AS src, osm_id, way AS g FROM {s}.planet_osm_point WHERE {poi}
                     UNION ALL SELECT 1, osm_id, ST_PointOnSurface(way) FROM {s}.planet_osm_polygon WHERE {poi}
                     UNION ALL SELECT 2, osm_id, ST_PointOnSurface(way) FROM {s}.planet_osm_polygon
                               WHERE building IS NOT NULL AND building <> 'no'
                   ) c WHERE g && {env} ORDER BY src, osm_id, ST_X(g), ST_Y(g)"""
            ).format(s=self.schema, poi=sql.SQL(POI_WHERE), env=sql.SQL(ENVELOPE))
            with cursor() as cur:
                cur.execute(query, self.env)
                xy = np.asarray(cur.fetchall(), dtype=float).reshape(-1, 2)
            lon, lat = from_mercator(xy[:, 0], xy[:, 1])
            pts = np.column_stack([lon, lat])[self._inside(lon, lat)]
            self._visits = pts[self.rngs["visits"].permutation(len(pts))]
            log.info("visits pool: %d POIs and buildings", len(pts))
        out = self._visits[self._visits_next : self._visits_next + n]
        self._visits_next += len(out)
        return out

    def _load_network(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every straight segment of the network clipped to the inner bbox, with cumulative true length."""
        query = sql.SQL(
            """SELECT ST_AsBinary(ST_Force2D(d.geom), 'NDR') FROM {s}.planet_osm_line l,
                 LATERAL ST_Dump(ST_CollectionExtract(ST_Intersection(l.way, {env}), 2)) d
               WHERE {net} AND l.way && {env}
               ORDER BY l.osm_id, d.path, ST_AsBinary(d.geom)"""
        ).format(s=self.schema, net=sql.SQL(NETWORK_WHERE), env=sql.SQL(ENVELOPE))
        starts, ends = [], []
        with cursor() as cur:
            cur.execute(query, self.env + self.env)
            for (wkb,) in cur:
                buf = bytes(wkb)
                npts = int.from_bytes(buf[5:9], "little")
                xy = np.frombuffer(buf, dtype="<f8", offset=9, count=2 * npts).reshape(npts, 2)
                starts.append(xy[:-1])
                ends.append(xy[1:])
        if not starts:
            raise ConfigError("no roads, rails or paths inside the region: cannot draw transport locations")
        a, b = np.concatenate(starts), np.concatenate(ends)
        _, lat_mid = from_mercator(0.0, (a[:, 1] + b[:, 1]) / 2)
        length = np.hypot(*(b - a).T) * np.cos(np.radians(lat_mid))  # Mercator → true metres
        log.info("transport network: %d segments, %.0f km", len(a), length.sum() / 1000)
        return a, b, np.cumsum(length)

    def _draw_transport(self, n: int) -> np.ndarray:
        if self._network is None:
            self._network = self._load_network()
        a, b, cum = self._network
        s = self.rngs["transport"].uniform(0.0, cum[-1], n)
        i = np.minimum(np.searchsorted(cum, s, side="right"), len(cum) - 1)
        seg_start = np.where(i > 0, cum[i - 1], 0.0)
        t = np.clip((s - seg_start) / np.maximum(cum[i] - seg_start, 1e-12), 0.0, 1.0)
        xy = a[i] + (b[i] - a[i]) * t[:, None]
        lon, lat = from_mercator(xy[:, 0], xy[:, 1])
        keep = self._inside(lon, lat)  # guards float error at the clip edge
        return np.column_stack([lon, lat])[keep]

    def _draw_uniform(self, n: int) -> np.ndarray:
        """Rejection sampling: uniform by area in the inner bbox, kept when on mapped land."""
        rng, (w, s, e, nth) = self.rngs["uniform"], self.box
        query = sql.SQL(
            """SELECT p.i FROM unnest(%s::float8[], %s::float8[], %s::float8[]) WITH ORDINALITY AS p(x, y, d, i)
               CROSS JOIN LATERAL (SELECT ST_SetSRID(ST_MakePoint(p.x, p.y), 3857) AS pt) q
               WHERE EXISTS (SELECT 1 FROM {s}.planet_osm_polygon g WHERE g.way && q.pt
                             AND ST_Intersects(g.way, q.pt) AND {land})
                  OR EXISTS (SELECT 1 FROM {s}.planet_osm_line l WHERE ST_DWithin(l.way, q.pt, p.d) AND {net})
               ORDER BY p.i"""
        ).format(s=self.schema, land=sql.SQL(LAND_WHERE), net=sql.SQL(NETWORK_WHERE))
        got: list[np.ndarray] = []
        have, rate = 0, 0.5
        with cursor() as cur:
            for _ in range(30):
                m = int(math.ceil((n - have) / rate * 1.1)) + 16
                lon = rng.uniform(w, e, m)
                lat = np.degrees(np.arcsin(rng.uniform(math.sin(math.radians(s)), math.sin(math.radians(nth)), m)))
                x, y = to_mercator(lon, lat)
                d = 0.5 * self.radius_m / np.cos(np.radians(lat))  # radius/2 in Mercator units
                cur.execute(query, (x.tolist(), y.tolist(), d.tolist()))
                idx = np.asarray([r[0] - 1 for r in cur.fetchall()], dtype=int)
                got.append(np.column_stack([lon[idx], lat[idx]]))
                have += len(idx)
                rate = max(len(idx) / m, 0.01)
                if have >= n:
                    break
        return np.concatenate(got)[:n]


# ---------------------------------------------------------------- information score


def tile_information(tile: np.ndarray) -> tuple[float, float]:
    """(coverage, entropy) of a (12, H, W) tile: drawn fraction, and channel diversity in [0, 1]."""
    on = tile > 0
    f = on.mean(axis=(1, 2))
    coverage = float(on.any(axis=0).mean())
    total = f.sum()
    if total <= 0:
        return coverage, 0.0
    p = f[f > 0] / total
    return coverage, max(0.0, float(-(p * np.log(p)).sum() / math.log(N_CHANNELS)))


def information_weight(entropy: np.ndarray, cfg: SampleConfig) -> np.ndarray:
    if cfg.entropy_floor <= 0:
        return np.ones_like(entropy)
    return cfg.min_weight + (1.0 - cfg.min_weight) * np.minimum(1.0, np.asarray(entropy) / cfg.entropy_floor)


_WORKER_REGION: str | None = None


def _init_worker(region: str) -> None:
    global _WORKER_REGION
    _WORKER_REGION = region
    get_renderer(region)  # parse the 12 maps once per process


def _score(point: tuple[float, float]) -> tuple[float, float]:
    assert _WORKER_REGION is not None
    return tile_information(get_renderer(_WORKER_REGION).render(point[0], point[1]))


def score_locations(
    region: str, lat: Iterable[float], lon: Iterable[float], workers: int = 0, pool=None
) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, entropy) of each anchor tile, rendered in a process pool (one renderer per process)."""
    points = [(float(a), float(b)) for a, b in zip(lat, lon, strict=True)]
    if not points:
        return np.empty(0), np.empty(0)
    bar = {"total": len(points), "desc": f"score {region}", "unit": "tile", "disable": None}
    if pool is None and (workers or os.cpu_count() or 1) <= 1:
        _init_worker(region)
        scores = [_score(p) for p in tqdm(points, **bar)]
    elif pool is None:
        with _pool(region, workers) as own:
            scores = list(tqdm(own.imap(_score, points, chunksize=16), **bar))
    else:
        scores = list(tqdm(pool.imap(_score, points, chunksize=16), **bar))
    arr = np.asarray(scores, dtype=float)
    return arr[:, 0], arr[:, 1]


def information(region: str, lat: Iterable[float], lon: Iterable[float], cfg: SampleConfig, pool=None) -> pd.DataFrame:
    """The low-information rule applied to locations: coverage, entropy, weight and keep (coverage ≥ min)."""
    coverage, entropy = score_locations(region, lat, lon, cfg.workers, pool)
    return pd.DataFrame(
        {
            "coverage": coverage,
            "entropy": entropy,
            "weight": information_weight(entropy, cfg),
            "keep": coverage >= cfg.min_coverage,
        }
    )


def _pool(region: str, workers: int):
    # spawn, not fork: a parent that already runs torch, Feast or Mapnik threads cannot be forked
    # safely (seen: forked workers dying in a loop and the pool hanging after other tests had run).
    # Spawned workers inherit the environment (LOC2VEC_PARAMS, LOC2VEC_PG_DSN) and build their own
    # renderer once; the cost is ~2 s of start-up, and scripts must be importable (not stdin).
    n = workers or os.cpu_count() or 1
    return mp.get_context("spawn").Pool(n, initializer=_init_worker, initargs=(region,))


# ---------------------------------------------------------------- spatial split


def assign_blocks(
    lat: np.ndarray, lon: np.ndarray, box: tuple[float, float, float, float], cfg: SampleConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(block id, split) per location: square blocks in a local metric frame, split by a seeded hash."""
    w, s, e, n = box
    k = MEAN_EARTH_RADIUS_M * math.pi / 180.0
    cos0 = math.cos(math.radians((s + n) / 2))
    nx = int(math.ceil((e - w) * k * cos0 / cfg.block_m)) + 1
    ix = np.floor((np.asarray(lon) - w) * k * cos0 / cfg.block_m).astype(np.int64)
    iy = np.floor((np.asarray(lat) - s) * k / cfg.block_m).astype(np.int64)
    block = iy * nx + ix
    edges = np.cumsum([cfg.splits[name] for name in SPLITS])
    by_block = {b: SPLITS[min(int(np.searchsorted(edges, _unit_hash(cfg.seed, b), "right")), 2)] for b in set(block)}
    return block, np.asarray([by_block[b] for b in block], dtype=object)


def buffer_violations(lat: np.ndarray, lon: np.ndarray, split: np.ndarray, distance_m: float) -> np.ndarray:
    """Mask of train locations within distance_m of any val/test location (these get dropped)."""
    split = np.asarray(split)
    train, held = split == "train", split != "train"
    out = np.zeros(len(split), dtype=bool)
    if train.any() and held.any():
        tree = KDTree(unit_xyz(lat[held], lon[held]))
        counts = tree.query_radius(unit_xyz(lat[train], lon[train]), chord(distance_m), count_only=True)
        out[np.flatnonzero(train)] = counts > 0
    return out


# ---------------------------------------------------------------- the sample


def sample_locations(region: str, cfg: SampleConfig | None = None) -> pd.DataFrame:
    """N scored, weighted, spatially split training locations of a region (see the module docstring)."""
    check_region_name(region)
    cfg = cfg or section_config(SampleConfig, "sample")
    radius = load_params().render.radius_m
    box = inner_bbox(require_import(region).bbox, radius)
    quotas = cfg.quotas()
    cands = _Candidates(region, box, radius, cfg.seed)
    started = time.perf_counter()

    parts: list[pd.DataFrame] = []
    drawn = dict.fromkeys(KINDS, 0)
    low_info = dict.fromkeys(KINDS, 0)
    survival = dict.fromkeys(KINDS, 1.0 / cfg.oversample)
    exhausted: set[str] = set()
    need = dict(quotas)
    frame = pd.DataFrame(columns=[*COLUMNS, "order"])
    with _pool(region, cfg.workers) as pool:
        for round_no in range(cfg.max_rounds):
            batch = []
            for kind in KINDS:
                if need[kind] <= 0 or kind in exhausted:
                    continue
                want = int(math.ceil(need[kind] / max(survival[kind], 0.05) * 1.1)) + 8
                pts = cands.draw(kind, want)
                if len(pts) < want and kind == "visits":
                    exhausted.add(kind)
                batch.append(
                    pd.DataFrame(
                        {"kind": kind, "order": drawn[kind] + np.arange(len(pts)), "lon": pts[:, 0], "lat": pts[:, 1]}
                    )
                )
                drawn[kind] += len(pts)
            if not batch:
                break
            new = pd.concat(batch, ignore_index=True)
            log.info("round %d: scoring %d candidates", round_no + 1, len(new))
            info = information(region, new["lat"], new["lon"], cfg, pool)
            new = pd.concat([new, info.drop(columns="keep")], axis=1)
            empty = ~info["keep"].to_numpy()
            for kind, count in new.loc[empty, "kind"].value_counts().items():
                low_info[kind] += int(count)
            parts.append(new[~empty])
            frame = _finish(region, pd.concat(parts, ignore_index=True), box, cfg, radius)
            have = frame["kind"].value_counts()
            for kind in KINDS:
                survival[kind] = have.get(kind, 0) / max(drawn[kind], 1)
                need[kind] = quotas[kind] - int(have.get(kind, 0))
            if all(need[k] <= 0 or k in exhausted for k in KINDS):
                break

    per_kind = [g.nsmallest(quotas[k], "order") for k, g in frame.groupby("kind", sort=True)]
    out = pd.concat(per_kind) if per_kind else frame
    out = out.sort_values("location_id", kind="stable").reset_index(drop=True)[COLUMNS]
    _log_summary(region, out, quotas, drawn, low_info, time.perf_counter() - started)
    out.attrs["summary"] = {
        "region": region,
        "quotas": quotas,
        "drawn": drawn,
        "dropped_low_information": low_info,
        "kinds": {k: int(v) for k, v in out["kind"].value_counts().sort_index().items()},
        "splits": {k: int(v) for k, v in out["split"].value_counts().sort_index().items()},
    }
    return out


def _finish(region: str, df: pd.DataFrame, box: tuple, cfg: SampleConfig, radius: float) -> pd.DataFrame:
    """Ids, dedupe, blocks, splits, and the train buffer around val/test locations (re-run each round)."""
    df = df.copy()
    df["location_id"] = location_ids(region, df["lat"].to_numpy(), df["lon"].to_numpy())
    df = df.drop_duplicates("location_id", keep="first").reset_index(drop=True)
    df["block"], df["split"] = assign_blocks(df["lat"].to_numpy(), df["lon"].to_numpy(), box, cfg)
    near = buffer_violations(
        df["lat"].to_numpy(), df["lon"].to_numpy(), df["split"].to_numpy(), 2.0 * radius + cfg.extra_buffer_m
    )
    return df[~near].reset_index(drop=True)


def _log_summary(region: str, out: pd.DataFrame, quotas: dict, drawn: dict, low_info: dict, seconds: float) -> None:
    kinds = out["kind"].value_counts()
    for kind in KINDS:
        if kinds.get(kind, 0) < quotas[kind]:
            log.warning("%s: only %d of %d %s locations available", region, kinds.get(kind, 0), quotas[kind], kind)
    log.info(
        "%s: %d locations in %.1fs — kinds %s, splits %s; drawn %s, dropped for low information %s",
        region,
        len(out),
        seconds,
        {k: int(v) for k, v in kinds.sort_index().items()},
        {k: int(v) for k, v in out["split"].value_counts().sort_index().items()},
        drawn,
        low_info,
    )


def write_samples(region: str, out_path: Path | str | None = None, cfg: SampleConfig | None = None) -> Path:
    """Sample a region's locations and write them as Parquet atomically (temp file + os.replace)."""
    df = sample_locations(region, cfg)
    path = Path(out_path) if out_path else load_params().root / "data" / "samples" / f"{region}.parquet"
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    log.info("wrote %d locations to %s", len(df), path)
    return path
