"""Dense vs per-tile embedding of a region's H3 cells, side by side in one run (embedding/dense.py, encode.py).

Cells: the region's cells as `loc2vec embed` selects them (``embed.h3_resolution``, mapped land), with
their metatiles on disk (rendering them is the render stage's cost: `metatile_render_s`, zero when they
exist). Both paths run inline on every torch thread, after the metatiles have been read once (page cache
warm for both), and time only the encoding (tiles cut + encoded, or windows + heads, with histograms):

* ``dense``: `encode_dense` over *every* cell, with params ``embed.dense_*``: its speed depends on how
  densely the cells fill the metatiles, so a subset would understate it.
* ``per_tile``: `encode` (cut + encode in ``embed.batch_size`` batches) over a seeded random subset of
  `n` cells (default 4096; its speed does not depend on which cells), half of them timed before dense and
  half after, so that a load drifting during the run weighs on both paths alike.

Agreement, on that subset: per-cell cosine similarity of the dense embedding with the per-tile one
(median, 5th percentile, minimum), split into its two causes, each measured alone with the tile corner
snapped to the dense grid: ``padding_*`` (per-tile on the tile cut at the snapped corner vs dense at that
corner: only the zero padding at the tile's edge differs) and ``position_*`` (per-tile at the snapped
corner vs per-tile at the exact one). Histograms: the share of cells whose histogram equals per-tile's
exactly, and the largest difference.

Downstream (``macro_f1``): logistic-regression macro-F1 of the transport and venue tasks on the region's
labels, blocked spatial folds, as `loc2vec evaluate` scores them (evaluation/run.py), with per-tile
features (`encoder_features`: each label cell's tile, cut and encoded) against dense features (the dense
embedding of the label's cell); labels whose cell is not embedded are dropped from both, as evaluate does.
With each difference, its 95% paired spatial block-bootstrap interval (the suite's lift statistic: whole
blocks resampled, both predictions scored on the same draw) and how many tested labels the two paths predict
differently: whether a difference is more than the task's sampling noise.

Precision: both paths in ``embed.cpu_bf16`` as `loc2vec embed` resolves it on this machine (``cpu_bf16`` in the
JSON: bf16 autocast with the CPU's own kernels, or the pinned float32), so the speedup compares like with like; the
padding/position split runs in float32. ``macs_per_cell``: each path's multiply-adds per cell (convolutions and
matmuls, torch's FlopCounterMode, untimed): the speedup the arithmetic alone allows, against which the measured one
says how much better the dense path's large convolutions use the cores.

The encoder: ``$LOC2VEC_BENCH_MODEL_DIR`` (model.pt + model_config.json, e.g. another checkout's
data/model), else the registered ``champion`` of ``train.registered_model``, else data/model.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loc2vec.cli.project import Project
from loc2vec.embedding.cells import select_cells
from loc2vec.embedding.dense import DenseSettings, encode_dense, encode_metatile, tile_corners
from loc2vec.embedding.encode import encode
from loc2vec.raster.channels import N_CHANNELS
from loc2vec.raster.metatiles import MetatileSpec, ensure_metatiles
from loc2vec.training.model import Encoder, to_input

from .common import bench_region

SEED = 0
MODEL_DIR_ENV = "LOC2VEC_BENCH_MODEL_DIR"


def _encoder(project: Project) -> tuple[Encoder, dict[str, Any]]:
    """The encoder to measure with and where it came from."""
    from loc2vec.training.outputs import load_encoder
    from loc2vec.training.registry import RegistryError, load_model, resolve_alias

    env = os.environ.get(MODEL_DIR_ENV)
    if env:
        path = Path(env)
        return load_encoder(path), {"source": str(path), "md5": _md5(path / "model.pt")}
    name = project.params.train.registered_model
    try:
        ref = resolve_alias(project.paths, name)
        model = load_model(project.paths, ref, project.params.model)
        return model, {"source": f"models:/{name}@champion", "version": ref.version}
    except RegistryError:
        path = project.paths.model_dir
        return load_encoder(path), {"source": str(path), "md5": _md5(path / "model.pt")}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _stats(prefix: str, cos: np.ndarray) -> dict[str, float]:
    return {
        f"{prefix}cosine_median": round(float(np.median(cos)), 4),
        f"{prefix}cosine_p05": round(float(np.percentile(cos, 5)), 4),
        f"{prefix}cosine_min": round(float(cos.min()), 4),
    }


def _snapped(model: Encoder, index, keys, xs, ys, settings: DenseSettings, batch: int) -> tuple[np.ndarray, ...]:
    """(dense at the snapped corner, per-tile on the tile cut at the snapped corner) for the cells."""
    snap = DenseSettings(settings.stride, "snap", settings.window_px)
    s, size = settings.stride, model.cfg.input_size
    sx, sy = (np.rint(v / s).astype(np.int64) * s for v in (xs, ys))
    dense = np.empty((len(keys), model.cfg.embedding_dim), np.float32)
    tile = np.empty_like(dense)
    for key in np.unique(keys).tolist():
        sel = np.flatnonzero(keys == key)
        array = index.array(key)
        dense[sel] = encode_metatile(model, array, xs[sel], ys[sel], snap)[0]
        for b0 in range(0, len(sel), batch):
            part = sel[b0 : b0 + batch]
            tiles = np.stack([array[y : y + size, x : x + size] for x, y in zip(sx[part], sy[part], strict=True)])
            with torch.no_grad():
                x = to_input(torch.from_numpy(tiles).permute(0, 3, 1, 2))
                tile[part] = model(x).numpy()
    return dense, tile


def _macs(model: Encoder, index, lats, lons, order: np.ndarray, settings: DenseSettings, params) -> dict[str, float]:
    """Multiply-adds per cell of each path (convolutions and matmuls, counted by torch's FlopCounterMode on one
    per-tile batch and on the whole dense run, untimed): the speedup the arithmetic alone allows."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = min(params.embed.batch_size, len(order))
    with FlopCounterMode(display=False) as counter:
        encode(model, index, lats[order[:batch]], lons[order[:batch]], batch, progress=False, bf16=settings.bf16)
    per_tile = counter.get_total_flops() / 2 / batch
    with FlopCounterMode(display=False) as counter:
        encode_dense(
            model, index, lats[order], lons[order], settings, progress=False, cfg=params.orchestrate, kind="inline"
        )
    dense = counter.get_total_flops() / 2 / len(order)
    return {"per_tile": round(per_tile), "dense": round(dense), "ratio": round(per_tile / dense, 2)}


def _macro_f1(project: Project, region: str, model: Encoder, cells: list[str], dense: np.ndarray) -> dict[str, Any]:
    """Logreg macro-F1 per task, per-tile features vs dense ones, on the same labels and folds."""
    from loc2vec.evaluation.added_value import paired_lift
    from loc2vec.evaluation.context import EvaluationContext
    from loc2vec.evaluation.featuresets import Featurizer, encoder_features
    from loc2vec.evaluation.labels import TASKS
    from loc2vec.evaluation.run import prepare_task, score_task

    cfg = project.params.evaluate.model_copy(update={"featuresets": ("per_tile", "dense"), "bootstrap": 0})
    ctx = EvaluationContext.from_params(project.params, project.info)
    row = {c: i for i, c in enumerate(cells)}

    tiles: dict[str, np.ndarray] = {}  # per-tile features by cell (historical and online ask for the same cells)

    def dense_features(points, mode, service) -> np.ndarray:
        at = np.array([row.get(c, -1) for c in points["h3_cell"]], dtype=np.int64)
        out = np.full((len(points), dense.shape[1]), np.nan)
        out[at >= 0] = dense[at[at >= 0]]
        return out

    def per_tile_features(points, mode, service) -> np.ndarray:
        embedded = points[points["h3_cell"].isin(row)]  # only the cells embed covers, as published
        new = embedded[~embedded["h3_cell"].isin(tiles)].drop_duplicates("h3_cell")
        if len(new):
            tiles.update(zip(new["h3_cell"], encoder_features(new, model, ctx, cfg.batch_size), strict=True))
        out = np.full((len(points), dense.shape[1]), np.nan)
        for i, cell in enumerate(points["h3_cell"]):
            if cell in tiles:
                out[i] = tiles[cell]
        return out

    featurizer = Featurizer({"per_tile": per_tile_features, "dense": dense_features})
    out: dict[str, Any] = {}
    for task in TASKS:
        data = prepare_task(task, region, None, cfg, featurizer, ctx)
        scored, preds = score_task(data, cfg)
        f1 = {k: round(scored[k]["logreg"]["macro_f1"], 4) for k in ("per_tile", "dense")}
        tested = np.concatenate([f.test for f in data.folds])
        y = data.labels["label"].to_numpy()[tested]
        with_dense, with_tiles = preds[("dense", "logreg")], preds[("per_tile", "logreg")]
        _, ci95 = paired_lift(y, with_dense, with_tiles, data.blocks[tested], 1000, cfg.split.seed)
        out[task] = {
            **f1,
            "difference": round(f1["dense"] - f1["per_tile"], 4),
            "difference_ci95": [round(v, 4) for v in ci95],
            "predictions_differing": int((with_dense != with_tiles).sum()),
            "n_labels": len(data.labels),
        }
    return out


def run(project: Project, *, region: str | None = None, n: int | None = None) -> dict:
    params, paths = project.params, project.paths
    region = bench_region(project, region)
    n = n or 4096
    model, model_info = _encoder(project)
    model = model.eval()
    spec = MetatileSpec.from_config(params.render, params.augment, params.tiles)
    settings = DenseSettings.from_config(params.embed)
    cells, lats, lons = select_cells(region, params.embed, spec.grid.radius_m, project.info)
    started = time.perf_counter()
    index = ensure_metatiles(
        region, lats, lons, spec=spec, paths=paths, info=project.info, orchestrate=params.orchestrate, progress=False
    )
    metatile_s = time.perf_counter() - started
    keys, xs, ys = tile_corners(index, lats, lons)
    for key in np.unique(keys).tolist():  # page cache warm for both paths
        int(np.asarray(index.array(key))[::64].sum())
    order = np.lexsort((np.arange(len(cells)), keys))  # metatile order, as `loc2vec embed` encodes
    sub = np.sort(np.random.default_rng(SEED).choice(len(cells), min(n, len(cells)), replace=False))
    sub = sub[np.lexsort((sub, keys[sub]))]
    threads = torch.get_num_threads()

    # per-tile in two halves, one before and one after dense: a load that drifts during the run weighs on both
    halves = np.array_split(np.arange(len(sub)), 2)
    tile_emb = np.empty((len(sub), model.cfg.embedding_dim), np.float32)
    tile_hist = np.empty((len(sub), N_CHANNELS), np.float32)
    per_tile_s = 0.0

    def per_tile(half: np.ndarray) -> float:
        started = time.perf_counter()
        tile_emb[half], tile_hist[half] = encode(
            model, index, lats[sub[half]], lons[sub[half]], params.embed.batch_size, progress=False, bf16=settings.bf16
        )
        return time.perf_counter() - started

    per_tile_s += per_tile(halves[0])
    started = time.perf_counter()
    dense_o, dense_hist_o = encode_dense(
        model, index, lats[order], lons[order], settings, progress=False, cfg=params.orchestrate, kind="inline"
    )
    dense_s = time.perf_counter() - started
    per_tile_s += per_tile(halves[1])
    dense, dense_hist = np.empty_like(dense_o), np.empty_like(dense_hist_o)
    dense[order], dense_hist[order] = dense_o, dense_hist_o

    cos = _cosine(dense[sub], tile_emb)
    snapped_dense, snapped_tile = _snapped(model, index, keys[sub], xs[sub], ys[sub], settings, params.embed.batch_size)
    hist_diff = np.abs(dense_hist[sub] - tile_hist).max(axis=1)
    per_tile_rate, dense_rate = len(sub) / per_tile_s, len(cells) / dense_s
    return {
        "region": region,
        "cells": len(cells),
        "metatiles": int(len(np.unique(keys))),
        "torch_threads": threads,
        "cpu_bf16": settings.bf16,
        "model": model_info,
        "per_tile": {"cells": len(sub), "seconds": round(per_tile_s, 2), "cells_per_s": round(per_tile_rate, 1)},
        "dense": {
            "cells": len(cells),
            "seconds": round(dense_s, 2),
            "cells_per_s": round(dense_rate, 1),
            **_stats("", cos),
            **_stats("padding_", _cosine(snapped_dense, snapped_tile)),
            **_stats("position_", _cosine(snapped_tile, tile_emb)),
            "histogram_exact": round(float((hist_diff == 0).mean()), 4),
            "histogram_max_diff": round(float(hist_diff.max()), 5),
            "settings": {"stride": settings.stride, "position": settings.position, "window_px": settings.window_px},
        },
        "speedup": round(dense_rate / per_tile_rate, 2),
        "macs_per_cell": _macs(model, index, lats, lons, order, settings, params),
        "macro_f1": _macro_f1(project, region, model, list(cells), dense),
        "metatile_render_s": round(metatile_s, 2),
    }
