"""Training locations: where people are, split spatially, without empty tiles (the `sample` stage).

Kinds (the mix is ``sample.mix`` in params.yaml):

* **visits** – POIs (amenity/shop/tourism points, ``ST_PointOnSurface`` of POI areas, same filter
  as the ``pois`` channel) and buildings (``ST_PointOnSurface``), drawn without replacement,
  uniformly over that union: where people live, work and go.
* **transport** – uniform along the road, rail and path network (the channels' road/path/rail
  classes): a point at a uniform arc length of the whole clipped network, so a line is picked
  with probability ∝ its true length (Mercator length × cos φ).
* **uniform** – uniform by area (uniform in lon and sin φ) over the land (the land side of the
  extract's coastline; the whole extract without one), kept on *mapped land*: points that fall in
  a land-use/natural/leisure/amenity/building polygon that is not water, or within radius/2 of a
  road, rail or path line. The extract's empty bbox corners (outside the country cut) never qualify.

All randomness is a numpy ``Generator`` seeded with ``(seed, kind)``; SQL only returns candidate
geometries in a fixed ``ORDER BY``, so the same params and import give the identical Parquet.
Every point lies inside the import bbox shrunk by ``render.radius_m``, so its tile is inside the data.

**Low-information rule.** Each candidate's anchor tile is rendered (``get_renderer(region).render``)
and scored: ``f_c = mean(tile_c > 0)`` per channel; ``coverage`` = fraction of pixels where any
channel is drawn; ``entropy`` = Shannon entropy of ``p_c = f_c / Σ f`` divided by ln 12 (0 = one
channel only, 1 = all channels equally). Candidates where less than ``min_coverage`` of the pixels
show anything but water areas (bare mountain, outside the data, the open sea) are dropped; the rest
get ``weight = min_weight + (1 − min_weight) · min(1, entropy / entropy_floor)`` in (0, 1], so a tile
of nothing but forest counts less than a village.

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
import time
from pathlib import Path

import numpy as np
import pandas as pd

from loc2vec.core.atomic import atomic_path
from loc2vec.core.config import KINDS, RenderConfig, SampleConfig
from loc2vec.core.geo import inner_bbox
from loc2vec.core.names import validate_region_name
from loc2vec.osm.db import ConnInfo, require_import
from loc2vec.sampling.candidates import Candidates
from loc2vec.sampling.information import information, scoring_pool
from loc2vec.sampling.split import assign_blocks, buffer_violations

log = logging.getLogger(__name__)

COLUMNS = ["location_id", "lat", "lon", "kind", "split", "block", "weight", "coverage", "entropy"]


def location_ids(region: str, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Stable ids: a hash of region and coordinates (1e-7°), independent of N, order and seed."""
    out = np.empty(len(lat), dtype=np.int64)
    for i, (a, b) in enumerate(zip(lat, lon, strict=True)):
        key = f"{region}:{round(float(a) * 1e7)}:{round(float(b) * 1e7)}".encode()
        out[i] = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)
    return out


def sample_locations(region: str, cfg: SampleConfig, *, render: RenderConfig, info: ConnInfo) -> pd.DataFrame:
    """N scored, weighted, spatially split training locations of a region (see the module docstring).

    Args:
        region: an ingested region.
        cfg: params `sample:`.
        render: the tile geometry (params `render:`): tiles are scored as training will see them.
        info: the database.
    """
    validate_region_name(region)
    radius = render.radius_m
    box = inner_bbox(require_import(region, info).bbox, radius)
    quotas = cfg.quotas()
    cands = Candidates(region, box, radius, cfg.seed, info)
    started = time.perf_counter()

    parts: list[pd.DataFrame] = []
    drawn = dict.fromkeys(KINDS, 0)
    low_info = dict.fromkeys(KINDS, 0)
    survival = dict.fromkeys(KINDS, 1.0 / cfg.oversample)
    exhausted: set[str] = set()
    need = dict(quotas)
    frame = pd.DataFrame(columns=[*COLUMNS, "order"])
    with scoring_pool(region, render, info, cfg.workers) as pool:
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
            scored = information(region, new["lat"], new["lon"], cfg, render=render, info=info, pool=pool)
            new = pd.concat([new, scored.drop(columns="keep")], axis=1)
            empty = ~scored["keep"].to_numpy()
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
    df["block"], df["split"] = assign_blocks(
        df["lat"].to_numpy(), df["lon"].to_numpy(), box, cfg.block_m, cfg.seed, cfg.splits
    )
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


def write_samples(region: str, out: Path, cfg: SampleConfig, *, render: RenderConfig, info: ConnInfo) -> Path:
    """Sample a region's locations and write them to `out` as Parquet atomically (temp file + os.replace)."""
    df = sample_locations(region, cfg, render=render, info=info)
    path = Path(out)
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    log.info("wrote %d locations to %s", len(df), path)
    return path
