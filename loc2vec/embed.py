"""Embed a region: every H3 cell on mapped land → a 16-D embedding with the `champion` model.

Which cells: the H3 cells (``embed.h3_resolution``, default 11: ~29 m edge, so a cell is far smaller
than a 200 m tile) whose centres lie inside the import bbox shrunk by ``render.radius_m`` (so every
tile lies inside the data) and on *mapped land* — sampling's rule (loc2vec/sampling.py): inside a
land-use/natural/leisure/amenity/building polygon that is not water, or within radius/2 of a road,
rail or path. Liechtenstein at resolution 11: 145,625 candidates, 89,492 on mapped land.

How: tiles come from the fast path (``ensure_metatiles`` + ``cut_tiles``, angle 0, no shift),
encoded in fixed batches under ``torch.no_grad`` with the model in eval mode. In the same
pass each tile gives its ``histogram`` (fraction of non-zero pixels per channel: the evaluation's
naive baseline), and PostGIS gives ``tag_counts`` (OSM features by category within the tile radius:
the second baseline, see TAG_COUNT_NAMES).

Why these timestamps: ``event_timestamp`` is when the embeddings became valid: the later of the model
version's registration time and the region's import time (an embedding cannot exist before both
its model and its data). ``created`` equals it. Both are pure functions of (model version, import), so
embedding again with the same model and data gives byte-identical Parquet, and publishing it again
changes nothing. A new model version, or a new import, is a new event: the feature store keeps
both and serves the latest (loc2vec/publish.py).

Why the model is rebuilt: MLflow's pt2 export may specialise the batch dimension (a champion logged
with a batch-1 example accepts only batch 1) and cannot be switched to eval mode; its state dict is
the Encoder's, so the weights are loaded into a fresh ``Encoder`` and checked against the artifact.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from psycopg2 import sql
from tqdm import tqdm

from loc2vec.atomic import atomic_path, write_text
from loc2vec.channels import N_CHANNELS, NOT_POI_AMENITY
from loc2vec.config import ConfigError, load_params, section_config
from loc2vec.db import ImportRecord, cursor, require_import
from loc2vec.errors import Loc2VecError
from loc2vec.model import Encoder, ModelConfig, channel_coverage, to_input
from loc2vec.osm import check_region_name
from loc2vec.sampling import LAND_WHERE, NETWORK_WHERE, inner_bbox, to_mercator

log = logging.getLogger(__name__)

FOOD = "('restaurant','cafe','fast_food','bar','pub','biergarten','ice_cream','food_court')"
EDUCATION = "('school','kindergarten','university','college','library','music_school','language_school')"
HEALTH = "('hospital','clinic','doctors','dentist','pharmacy','veterinary','nursing_home')"
# (name, SQL condition, table kinds it applies to): counts for points/polygons, true metres for lines.
TAG_COUNTS: tuple[tuple[str, str, str], ...] = (
    ("buildings", "building IS NOT NULL AND building <> 'no'", "polygon"),
    ("poi_food_drink", f"amenity IN {FOOD}", "point,polygon"),
    ("poi_shop", "shop IS NOT NULL", "point,polygon"),
    ("poi_tourism", "tourism IS NOT NULL", "point,polygon"),
    ("poi_education", f"amenity IN {EDUCATION}", "point,polygon"),
    ("poi_health", f"amenity IN {HEALTH}", "point,polygon"),
    ("poi_other_amenity",
     f"amenity NOT IN {FOOD} AND amenity NOT IN {EDUCATION} AND amenity NOT IN {HEALTH}"
     f" AND amenity NOT IN {NOT_POI_AMENITY} AND amenity <> 'parking'", "point,polygon"),
    ("parking", "amenity = 'parking'", "point,polygon"),
    ("transit_stops", "highway = 'bus_stop' OR railway IN ('station','halt','tram_stop')", "point"),
    ("road_major_m", "highway IN ('motorway','motorway_link','trunk','trunk_link','primary','primary_link',"
     "'secondary','secondary_link','tertiary','tertiary_link')", "line"),
    ("road_minor_m", "highway IN ('residential','unclassified','living_street','service','road','busway')", "line"),
    ("path_m", "highway IN ('footway','path','cycleway','pedestrian','steps','track','bridleway')", "line"),
    ("rail_m", "railway IN ('rail','tram','light_rail','subway','narrow_gauge','funicular','monorail')", "line"),
)  # fmt: skip
TAG_COUNT_NAMES: tuple[str, ...] = tuple(name for name, _, _ in TAG_COUNTS)
SQL_CHUNK = 50_000  # cells per PostGIS query: bounded arrays and temp tables for any region size


class EmbedError(Loc2VecError, RuntimeError):
    """Embedding cannot run: no champion model, no cells, or a model that does not match its weights."""


@dataclass(frozen=True)
class EmbedConfig:
    """params.yaml `embed:`."""

    h3_resolution: int = 11  # ~29 m edge; a 200 m tile spans ~7 cells
    batch_size: int = 256  # tiles per forward pass (fixed, so the same cells always share a batch)
    tag_counts: bool = True  # per-cell OSM category counts (PostGIS, ~20 s for Liechtenstein)
    max_cells: int = 2_000_000  # refuse (and say so) rather than run for hours on 2 cores

    def __post_init__(self) -> None:
        if not 0 <= self.h3_resolution <= 15:
            raise ConfigError(f"embed.h3_resolution must be in [0, 15], got {self.h3_resolution}")
        if self.batch_size < 1 or self.max_cells < 1:
            raise ConfigError("embed.batch_size and embed.max_cells must be ≥ 1")


def embed_config() -> EmbedConfig:
    return section_config(EmbedConfig, "embed")


def embeddings_path(region: str) -> Path:
    return load_params().root / "data" / "embeddings" / f"{check_region_name(region)}.parquet"


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelRef:
    """A registered model version: what the embeddings record about their model."""

    name: str
    version: str
    created: datetime  # registration time (UTC)
    run_id: str | None


def registered_model_name() -> str:
    name = load_params().section("train").get("registered_model")
    if not name:
        raise ConfigError("params.yaml train.registered_model is not set")
    return str(name)


def resolve_champion(name: str | None = None, alias: str | None = None) -> ModelRef:
    """The version the `champion` alias (or `alias`) points at now (resolved once: the alias may move later)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from loc2vec.tracking import CHAMPION, tracking_uri

    name = name or registered_model_name()
    alias = alias or CHAMPION
    mlflow.set_tracking_uri(tracking_uri())
    try:
        mv = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise EmbedError(
            f"no '{alias}' version of registered model {name!r} in {tracking_uri()}: run `loc2vec train` first"
        ) from exc
    created = datetime.fromtimestamp(int(mv.creation_timestamp) / 1000.0, tz=UTC)
    return ModelRef(name=name, version=str(mv.version), created=created, run_id=mv.run_id)


def _model_config(ref: ModelRef) -> ModelConfig:
    """The architecture the version was trained with (its run's `model.*` params), else params.yaml's."""
    from mlflow import MlflowClient

    if ref.run_id:
        params = MlflowClient().get_run(ref.run_id).data.params
        values = {k.removeprefix("model."): _param_value(v) for k, v in params.items() if k.startswith("model.")}
        if values:
            try:
                return ModelConfig(**values)
            except (TypeError, ValueError) as exc:
                raise EmbedError(f"{ref.name} v{ref.version}: its run's model.* params are unusable: {exc}") from exc
    return ModelConfig.from_params()


def _param_value(text: str) -> Any:
    """MLflow params are strings: '[16, 32]', '0.1', '12' → Python values."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_model(ref: ModelRef) -> Encoder:
    """The version's weights in a fresh Encoder, eval mode, checked against the registered artifact."""
    import mlflow.pytorch

    loaded = mlflow.pytorch.load_model(f"models:/{ref.name}/{ref.version}", map_location="cpu")
    if isinstance(loaded, Encoder):
        return loaded.eval()
    encoder = Encoder(_model_config(ref))
    try:
        encoder.load_state_dict(loaded.state_dict(), strict=True)
    except RuntimeError as exc:
        raise EmbedError(f"{ref.name} v{ref.version} does not hold Encoder weights: {exc}") from exc
    encoder.eval()
    x = torch.rand((1, 12, encoder.cfg.input_size, encoder.cfg.input_size), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        try:
            expected = loaded(x)
        except Exception:  # an export specialised to batch 2
            x = x.repeat(2, 1, 1, 1)
            expected = loaded(x)
        got = encoder(x)
    if not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
        raise EmbedError(f"{ref.name} v{ref.version}: rebuilt Encoder differs from the registered model")
    return encoder


# ---------------------------------------------------------------- cells


def candidate_cells(bbox: tuple[float, float, float, float], resolution: int) -> list[str]:
    """H3 cells whose centres lie inside the bbox (west, south, east, north), sorted."""
    west, south, east, north = bbox
    poly = h3.LatLngPoly([(south, west), (south, east), (north, east), (north, west)])
    return sorted(h3.polygon_to_cells(poly, resolution))


def cell_centres(cells: list[str]) -> tuple[np.ndarray, np.ndarray]:
    latlng = np.array([h3.cell_to_latlng(c) for c in cells], dtype=np.float64).reshape(-1, 2)
    return latlng[:, 0], latlng[:, 1]


def on_mapped_land(region: str, lats: np.ndarray, lons: np.ndarray, radius_m: float) -> np.ndarray:
    """Mask: the point lies in a land polygon or within radius/2 of the network (sampling's rule)."""
    query = sql.SQL(
        """SELECT p.i FROM unnest(%s::float8[], %s::float8[], %s::float8[]) WITH ORDINALITY AS p(x, y, d, i)
           CROSS JOIN LATERAL (SELECT ST_SetSRID(ST_MakePoint(p.x, p.y), 3857) AS pt) q
           WHERE EXISTS (SELECT 1 FROM {s}.planet_osm_polygon g WHERE g.way && q.pt
                         AND ST_Intersects(g.way, q.pt) AND {land})
              OR EXISTS (SELECT 1 FROM {s}.planet_osm_line l WHERE ST_DWithin(l.way, q.pt, p.d) AND {net})"""
    ).format(s=sql.Identifier(region), land=sql.SQL(LAND_WHERE), net=sql.SQL(NETWORK_WHERE))
    mask = np.zeros(len(lats), dtype=bool)
    with cursor() as cur:
        for c0 in range(0, len(lats), SQL_CHUNK):
            la, lo = lats[c0 : c0 + SQL_CHUNK], lons[c0 : c0 + SQL_CHUNK]
            x, y = to_mercator(lo, la)
            d = 0.5 * radius_m / np.cos(np.radians(la))  # radius/2 in Mercator units
            cur.execute(query, (x.tolist(), y.tolist(), d.tolist()))
            mask[[c0 + r[0] - 1 for r in cur.fetchall()]] = True
    return mask


def tag_counts(region: str, lats: np.ndarray, lons: np.ndarray, radius_m: float) -> np.ndarray:
    """(n, len(TAG_COUNT_NAMES)) float32: features per category within radius_m of each point
    (a count for points/polygons, true metres of line inside the circle for roads, paths, rail)."""
    out = np.zeros((len(lats), len(TAG_COUNTS)), dtype=np.float64)
    schema = sql.Identifier(region)
    with cursor() as cur:
        for c0 in range(0, len(lats), SQL_CHUNK):
            la, lo = lats[c0 : c0 + SQL_CHUNK], lons[c0 : c0 + SQL_CHUNK]
            x, y = to_mercator(lo, la)
            d = radius_m / np.cos(np.radians(la))
            cur.execute("DROP TABLE IF EXISTS pg_temp.loc2vec_cells")
            cur.execute(
                "CREATE TEMP TABLE loc2vec_cells AS SELECT (p.i - 1)::int AS i, p.d, p.k,"
                " ST_SetSRID(ST_MakePoint(p.x, p.y), 3857) AS pt"
                " FROM unnest(%s::float8[], %s::float8[], %s::float8[], %s::float8[]) WITH ORDINALITY AS p(x, y, d, k, i)",
                (x.tolist(), y.tolist(), d.tolist(), np.cos(np.radians(la)).tolist()),
            )
            cur.execute("CREATE INDEX ON loc2vec_cells USING gist (pt); ANALYZE loc2vec_cells")
            for table in ("point", "polygon", "line"):
                cols = [(j, cond) for j, (_, cond, kinds) in enumerate(TAG_COUNTS) if table in kinds.split(",")]
                if table == "line":  # Mercator length × cos φ = true metres
                    agg = "sum(ST_Length(ST_Intersection(g.way, ST_Buffer(c.pt, c.d, 8))) * c.k) FILTER (WHERE {})"
                else:
                    agg = "count(*) FILTER (WHERE {})"
                select = sql.SQL(", ").join(sql.SQL(agg).format(sql.SQL(cond)) for _, cond in cols)
                where = sql.SQL(" OR ").join(sql.SQL(f"({cond})") for _, cond in cols)
                cur.execute(
                    sql.SQL(
                        "SELECT c.i, {sel} FROM {s}.{t} g JOIN loc2vec_cells c ON ST_DWithin(g.way, c.pt, c.d)"
                        " WHERE {where} GROUP BY c.i"
                    ).format(sel=select, s=schema, t=sql.Identifier(f"planet_osm_{table}"), where=where)
                )
                rows = cur.fetchall()
                if rows:
                    idx = np.array([r[0] for r in rows]) + c0
                    vals = np.array([[v or 0.0 for v in r[1:]] for r in rows], dtype=np.float64)
                    out[np.ix_(idx, [j for j, _ in cols])] += vals
            cur.execute("DROP TABLE pg_temp.loc2vec_cells")
    return out.astype(np.float32)


# ---------------------------------------------------------------- the pass


def _utc(ts: datetime) -> datetime:
    """UTC, truncated to microseconds (Parquet/Arrow timestamp[us]): the same value round-trips exactly."""
    if ts.tzinfo is None:
        raise EmbedError(f"naive timestamp {ts!r}: every timestamp must be timezone-aware")
    return ts.astimezone(UTC)


def event_time(model: ModelRef, record: ImportRecord) -> datetime:
    """When these embeddings became valid: both the model version and the import existed."""
    return max(_utc(model.created), _utc(record.imported_at))


def encode(
    model: Encoder, index, lats: np.ndarray, lons: np.ndarray, batch_size: int, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (n, D) float32, histograms (n, 12) float32) for tiles cut at the locations."""
    from loc2vec.cutter import cut_tiles

    n = len(lats)
    dim = model.cfg.embedding_dim
    emb = np.empty((n, dim), dtype=np.float32)
    hist = np.empty((n, N_CHANNELS), dtype=np.float32)
    model = model.to(memory_format=torch.channels_last)  # cut_tiles returns channels_last: no copy
    bar = tqdm(total=n, desc="embed", unit="cell", disable=not progress)
    with bar:
        for b0 in range(0, n, batch_size):
            b1 = min(n, b0 + batch_size)
            zeros = np.zeros(b1 - b0)
            # Cut outside no_grad: the cutter's threads fill reused buffers in place.
            tiles = cut_tiles(index, lats[b0:b1], lons[b0:b1], zeros, np.zeros((b1 - b0, 2)), device="cpu")
            with torch.no_grad():
                hist[b0:b1] = channel_coverage(tiles).numpy()
                emb[b0:b1] = model(to_input(tiles)).float().numpy()
            bar.update(b1 - b0)
    if not np.isfinite(emb).all():
        raise EmbedError("the model produced non-finite embeddings")
    return emb, hist


def _list_array(values: np.ndarray) -> pa.Array:
    """(n, k) float32 → list<float32> (variable-size lists: Feast maps them to Array(Float32))."""
    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=pa.float32()))


SCHEMA = pa.schema(
    [
        ("h3_cell", pa.string()),
        ("lat", pa.float64()),
        ("lon", pa.float64()),
        ("embedding", pa.list_(pa.float32())),
        ("histogram", pa.list_(pa.float32())),
        ("tag_counts", pa.list_(pa.float32())),
        ("h3_resolution", pa.int8()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("osm_timestamp", pa.timestamp("us", tz="UTC")),
        ("event_timestamp", pa.timestamp("us", tz="UTC")),
        ("created", pa.timestamp("us", tz="UTC")),
        ("region", pa.string()),
    ]
)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Readers see the old file or the new one, never half of one (loc2vec.atomic)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


class EmbedResult(type(Path())):  # type: ignore[misc]
    """The Parquet path, carrying the run's `stats` (cells, cells/s, model, timings)."""

    stats: dict[str, Any]


def select_cells(region: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The H3 cells to embed (on mapped land, tile inside the data) and their centres.

    The metatiles stage renders for these too, so embedding never writes into its output.
    """
    cfg = embed_config()
    radius = float(load_params().render.radius_m)
    record = require_import(region)
    cells = candidate_cells(inner_bbox(record.bbox, radius), cfg.h3_resolution)
    if len(cells) > cfg.max_cells:
        raise EmbedError(
            f"{region}: {len(cells):,} H3 cells at resolution {cfg.h3_resolution} exceed embed.max_cells="
            f"{cfg.max_cells:,}; use a coarser embed.h3_resolution (each step down is 7× fewer cells)"
        )
    lats, lons = cell_centres(cells)
    keep = on_mapped_land(region, lats, lons, radius)
    cells = [c for c, k in zip(cells, keep, strict=True) if k]
    if not cells:
        raise EmbedError(f"{region}: no H3 cell centre at resolution {cfg.h3_resolution} lies on mapped land")
    log.info("%s: %d of %d H3 cells (res %d) on mapped land", region, len(cells), len(keep), cfg.h3_resolution)
    return cells, lats[keep], lons[keep]


def embed_region(region: str, *, model: ModelRef | None = None, progress: bool = True) -> EmbedResult:
    """Embed every mapped-land H3 cell of a region with the champion model (or `model`); see the module doc.

    Writes data/embeddings/<region>.parquet atomically (and <region>.json with the run's stats) and
    returns the Parquet path, whose `.stats` holds cells and cells/s.
    """
    from loc2vec.fanout import encode_cells, runner_kind
    from loc2vec.metatiles import ensure_metatiles

    check_region_name(region)
    cfg = embed_config()
    radius = float(load_params().render.radius_m)
    record = require_import(region)
    ref = model or resolve_champion()
    timings: dict[str, float] = {}
    started = t0 = time.perf_counter()

    encoder = load_model(ref)
    timings["load_model_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cells, lats, lons = select_cells(region)
    timings["select_cells_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tags = tag_counts(region, lats, lons, radius) if cfg.tag_counts else np.zeros((len(cells), len(TAG_COUNTS)), "f4")
    timings["tag_counts_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    index = ensure_metatiles(region, lats, lons, progress=progress)
    timings["metatiles_s"] = time.perf_counter() - t0

    # Encode in metatile order (memory-mapped pages are read once), output in cell order.
    order = np.lexsort((np.arange(len(cells)), np.asarray(index.keys_for(lats, lons))))
    t0 = time.perf_counter()
    runner = runner_kind()  # chunks of whole batches on the configured task runner (loc2vec/fanout.py)
    emb_o, hist_o = encode_cells(encoder, index, lats[order], lons[order], cfg.batch_size, progress, runner)
    encode_s = timings["encode_s"] = time.perf_counter() - t0
    emb, hist = np.empty_like(emb_o), np.empty_like(hist_o)
    emb[order], hist[order] = emb_o, hist_o

    event = event_time(ref, record)
    n = len(cells)

    def const(value: Any, typ: pa.DataType) -> pa.Array:
        return pa.array([value] * n, type=typ)

    ts = pa.timestamp("us", tz="UTC")
    table = pa.Table.from_arrays(
        [
            pa.array(cells, type=pa.string()),
            pa.array(lats),
            pa.array(lons),
            _list_array(emb),
            _list_array(hist),
            _list_array(tags),
            const(cfg.h3_resolution, pa.int8()),
            const(ref.name, pa.string()),
            const(ref.version, pa.string()),
            const(_utc(record.osm_timestamp) if record.osm_timestamp else None, ts),
            const(event, ts),
            const(event, ts),
            const(region, pa.string()),
        ],
        schema=SCHEMA,
    )
    path = embeddings_path(region)
    write_parquet_atomic(table, path)
    total = time.perf_counter() - started
    stats = {
        "region": region,
        "path": str(path),
        "cells": n,
        "h3_resolution": cfg.h3_resolution,
        "model_name": ref.name,
        "model_version": ref.version,
        "event_timestamp": event.isoformat(),
        "cells_per_s": round(n / encode_s, 1),  # tiles cut + encoded per second
        "cells_per_s_end_to_end": round(n / total, 1),
        "seconds": round(total, 1),
        "torch_threads": torch.get_num_threads(),
        "task_runner": runner,
        **{k: round(v, 2) for k, v in timings.items()},
        "config": asdict(cfg),
    }
    write_text(path.with_suffix(".json"), json.dumps(stats, indent=1, default=str))
    log.info(
        "%s: embedded %d cells with %s v%s in %.1f s (%.0f cells/s encoding, %.0f cells/s end to end) → %s",
        region, n, ref.name, ref.version, total, stats["cells_per_s"], stats["cells_per_s_end_to_end"], path,
    )  # fmt: skip
    result = EmbedResult(path)
    result.stats = stats
    return result


def read_embeddings(path: Path) -> pa.Table:
    """An embeddings Parquet, checked against the schema this module writes."""
    if not path.is_file():
        raise EmbedError(f"no embeddings at {path}: run `loc2vec embed --region {path.stem}`")
    table = pq.read_table(path)
    missing = [f.name for f in SCHEMA if f.name not in table.column_names]
    if missing:
        raise EmbedError(f"{path} lacks columns {missing}: re-run `loc2vec embed --region {path.stem}`")
    return table.select(SCHEMA.names).cast(SCHEMA)
