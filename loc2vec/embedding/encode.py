"""Encode cells: cut each cell's tile from the metatiles (angle 0, no shift) and run the encoder over it.

Fixed batches under ``torch.no_grad`` with the model in eval mode; in the same pass each tile gives its
``histogram`` (fraction of non-zero pixels per channel: the evaluation's naive baseline). The work fans
out over the configured task runner (orchestration/) in chunks of whole batches, so every forward pass
sees exactly the tiles the one-pass path gives it and every runner writes the same bytes.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from loc2vec.core.config import OrchestrateConfig
from loc2vec.orchestration.runners import RunnerKind, map_tasks, runner_kind
from loc2vec.raster.channels import N_CHANNELS
from loc2vec.raster.cutter import cut_tiles
from loc2vec.raster.metatiles import MetatileIndex
from loc2vec.training.model import Encoder, channel_coverage, to_input


def encode(
    model: Encoder,
    index,
    lats: np.ndarray,
    lons: np.ndarray,
    batch_size: int,
    progress: bool = True,
    *,
    bf16: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (n, D) float32, histograms (n, 12) float32) for tiles cut at the locations; with `bf16`, the
    encoder's convolutions under bf16 autocast (embed.cpu_bf16: `Encoder.forward_with_bf16_convs`)."""
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
                x = to_input(tiles)
                emb[b0:b1] = (model.forward_with_bf16_convs(x) if bf16 else model(x)).numpy()
            bar.update(b1 - b0)
    if not np.isfinite(emb).all():
        raise ValueError("the model produced non-finite embeddings")
    return emb, hist


def encode_chunk(
    index: MetatileIndex,
    model: Encoder,
    lats: np.ndarray,
    lons: np.ndarray,
    batch_size: int,
    start: int,
    bf16: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and histograms of cells [start, start + len(lats)) of the encoding order (see `encode`).

    `start` names the task run; `index` travels without its memory maps (metatiles are re-opened here).
    """
    return encode(model, index, lats, lons, batch_size, progress=False, bf16=bf16)


def chunk_bounds(n: int, batch_size: int, batches_per_chunk: int) -> list[tuple[int, int]]:
    """[start, end) of consecutive chunks of whole batches: chunk edges fall on batch edges, so each forward
    pass of a chunk is a forward pass of the one-pass encoding (same tiles, same batch)."""
    step = batch_size * batches_per_chunk
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def encode_cells(
    model: Encoder,
    index: MetatileIndex,
    lats: np.ndarray,
    lons: np.ndarray,
    batch_size: int,
    progress: bool = True,
    *,
    cfg: OrchestrateConfig,
    kind: RunnerKind | None = None,
    bf16: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """`encode` over the configured runner: chunks of whole batches, assembled in order."""
    kind = kind or runner_kind(cfg)
    if kind == "inline":
        return encode(model, index, lats, lons, batch_size, progress, bf16=bf16)
    n = len(lats)
    bounds = chunk_bounds(n, batch_size, cfg.embed_chunk_batches)
    emb = np.empty((n, model.cfg.embedding_dim), dtype=np.float32)
    hist = np.empty((n, N_CHANNELS), dtype=np.float32)
    bar = tqdm(total=n, desc=f"embed ({kind})", unit="cell", disable=not progress)

    def store(i: int, result: tuple[np.ndarray, np.ndarray]) -> None:
        s, e = bounds[i]
        emb[s:e], hist[s:e] = result
        bar.update(e - s)

    # Converted here, once: `encode`'s own `.to(channels_last)` then finds nothing to change. Done in each
    # task instead, one thread would swap a parameter's storage while another's forward pass reads it.
    model = model.eval().to(memory_format=torch.channels_last)
    with bar:
        map_tasks(
            encode_chunk,
            [
                {
                    "index": index,
                    "model": model,
                    "lats": lats[s:e],
                    "lons": lons[s:e],
                    "batch_size": batch_size,
                    "start": s,
                    "bf16": bf16,
                }
                for s, e in bounds
            ],
            store,
            flow_name="loc2vec-embed",
            run_name=f"{index.region}-{n}",
            task_name="encode-chunk",
            task_run_name=index.region + "-{start}",
            cfg=cfg,
            kind=kind,
        )
    return emb, hist
