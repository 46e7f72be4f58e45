"""Train the encoder with triplet batches: Adam + warm-up/cosine LR, checkpoints, early stopping.

* Batch k is a pure function of (seed, k) (`TripletBatches.batch`), and the checkpoint holds
  model, optimizer, scheduler and torch RNG state, so a run killed at any point resumes at
  the checkpointed step and continues exactly as if it had never stopped (deterministic on CPU).
* CUDA when present (bf16 autocast, channels_last, optional torch.compile), CPU otherwise;
  no code change between the two. On the CPU, channels_last (`train.channels_last`, default on) and
  bf16 autocast (`train.cpu_bf16`: `auto` uses it where the CPU has its own bf16 kernels, core/numerics.py).
* Early stopping on validation triplet accuracy — the fraction of val triplets with
  Δ(a,p) < min(Δ(a,n), Δ(p,n)) — over fixed val batches from spatially held-out locations
  (positives rotated and shifted; channel drop is for training only, as in the article).
* A loss that reads no negatives (infonce, the default, and vicreg: losses.NEGATIVE_FREE) gets a step that encodes
  anchors and positives only, 200 tiles instead of 300 with the default batch (`forward_triplets`). Validation
  scores real negatives, each distinct tile encoded once (its negatives are copies of its positives, its anchors
  one per location: 120 tiles instead of 300, the same embeddings in eval mode up to the head's float rounding).
* The step budget (max_steps) is sized so the cosine schedule completes; a wall-clock cap
  (max_minutes) is optional, because on a shared machine it would cut the schedule short.
* Everything is tracked in MLflow (training/tracking.py). The loop is this module; what stops it
  is training/early_stopping.py, what resumes it training/checkpoint.py, what it leaves behind
  training/outputs.py.
* DDP under torchrun (`loc2vec train --nproc N`, or `torchrun --nproc-per-node=N -m loc2vec.cli
  train`): gloo on CPU, nccl on CUDA (one GPU per LOCAL_RANK). Each rank trains on its slice of the
  locations of the same global batch k, so batch size and composition do not depend on the world
  size; rank 0 alone validates, checkpoints, writes outputs and logs to MLflow, and broadcasts the
  decision to stop. Design notes in training/distributed.py. A single process never initialises
  torch.distributed and runs exactly as before.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from loc2vec.core.config import LossConfig, ModelConfig, Params, TrainConfig
from loc2vec.core.errors import Loc2VecError
from loc2vec.core.numerics import cpu_bf16_enabled
from loc2vec.core.paths import ProjectPaths
from loc2vec.osm.db import ConnInfo
from loc2vec.raster.metatiles import MetatileSpec
from loc2vec.training import distributed as ddp
from loc2vec.training.batches import (
    TripletBatch,
    TripletBatches,
    TripletConfig,
    anchor_rows,
    stand_in_negatives,
)
from loc2vec.training.checkpoint import Checkpointer
from loc2vec.training.early_stopping import TrainState, record_budgets, record_validation
from loc2vec.training.losses import NEGATIVE_FREE, build_loss, softpn_terms, triplet_accuracy
from loc2vec.training.model import Encoder, to_input
from loc2vec.training.outputs import write_outputs
from loc2vec.training.sources import SourceSettings, build_source, load_samples

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise Loc2VecError("train.device is 'cuda' but no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


# ---------------------------------------------------------------- training


def lr_lambda(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def forward_triplets(
    model: torch.nn.Module,
    batch: TripletBatch,
    device: torch.device,
    channels_last: bool,
    cpu_bf16: bool = False,
    encode_negatives: bool = True,
    distinct_once: bool = False,
) -> tuple[torch.Tensor, ...]:
    """One forward pass over anchors, positives and negatives together (shared BN statistics): the (a, p, n)
    embeddings.

    With `encode_negatives` False (a loss that reads no negatives, losses.NEGATIVE_FREE) only anchors and positives
    are encoded, a third fewer tiles, and n is another location's positive embedding (`stand_in_negatives`),
    for the triplet metrics only; a batch where no row can have one is encoded whole.
    With `distinct_once` (validation) each distinct tile is encoded once: a location's anchor once for all its rows
    (`anchor_rows`: 20 anchors instead of 100 with the default batch), and negatives that are exact copies of
    positives (`TripletBatch.negative_row`: no channel drop) not at all, copied from the positives' embeddings. In
    eval mode that gives the same embeddings up to float rounding: the convolutions' results do not depend on the
    rest of the batch, but MKL's sgemm (the head) may sum in another order for another number of rows (~2e-6 apart
    on an Intel AVX-512 machine, bit for bit on an AMD AVX2 one); validation always encodes the same batches the
    same way, so a run is still deterministic.
    Not for training: there the copies would share one dropout mask and BatchNorm's batch statistics would see each
    tile once (measured: a worse model, README "Issue 17's options in one table").
    bf16 autocast on CUDA always, on the CPU when `cpu_bf16`; the embeddings come back as float32.
    """
    first, inverse = anchor_rows(batch.location) if distinct_once else (None, None)
    anchors = batch.anchor if first is None else batch.anchor[first]
    copy_from = batch.negative_row if distinct_once else None
    stand_in = None if encode_negatives or copy_from is not None else stand_in_negatives(batch.location)
    parts = [anchors, batch.positive]
    if copy_from is None and stand_in is None:
        parts.append(batch.negative)
    x = to_input(torch.cat(parts).to(device, non_blocking=True))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bf16 = device.type == "cuda" or cpu_bf16
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        emb = model(x)
    emb = emb.float()
    b = len(batch.positive)
    a, p = emb[: len(anchors)], emb[len(anchors) : len(anchors) + b]
    if inverse is not None:
        a = a[inverse.to(a.device)]
    if copy_from is not None:
        return a, p, p[copy_from.to(p.device)]
    if stand_in is not None:
        return a, p, p.detach()[stand_in.to(p.device)]
    return a, p, emb[len(anchors) + b :]


def run_signature(regions: list[str], samples: pd.DataFrame, parts: dict[str, Any]) -> str:
    """Identifies a training run's inputs: a checkpoint is resumed only for the same signature."""
    h = hashlib.sha256(json.dumps({"regions": regions, **parts}, sort_keys=True, default=str).encode())
    h.update(pd.util.hash_pandas_object(samples[["lat", "lon", "split"]], index=False).values.tobytes())
    return h.hexdigest()[:16]


def deterministic_cpu_kernels() -> None:
    """Deterministic kernels for CPU training, without importing TorchInductor.

    `torch.use_deterministic_algorithms` also sets Inductor's `deterministic` flag, and importing Inductor for
    it costs 1.2–2.6 s per training process (measured); CPU training never compiles (`train.compile` is for
    CUDA), so the flag is only set through the public call when Inductor is already loaded.
    """
    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch._C._set_deterministic_algorithms(True, warn_only=True)


class Trainer:
    """One training run over the regions' samples; `fit` trains (or resumes) it and writes its outputs."""

    def __init__(
        self,
        regions: list[str],
        samples: pd.DataFrame,
        *,
        cfg: TrainConfig,
        model_cfg: ModelConfig,
        loss_cfg: LossConfig,
        triplets: TripletConfig,
        source: SourceSettings,
        out_dir: Path,
        checkpoint_dir: Path,
    ):
        self.regions = regions
        if cfg.cpu_bf16 == "auto":  # not resolved at an edge (a library call): bf16 only where the kernels allow it now
            cfg = cfg.model_copy(update={"cpu_bf16": cpu_bf16_enabled(cfg.cpu_bf16)})
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.loss_cfg = loss_cfg
        self.triplet_cfg = triplets
        self.source = source
        self.out_dir = out_dir
        self.checkpoint_path = checkpoint_dir / "train.pt"
        self.device = ddp.rank_device(resolve_device(cfg.device), ddp.env_context())
        self.samples = samples
        # Settings that only decide when to stop, how to prefetch or how many processes share each
        # batch do not change the optimisation problem: a run resumed with another value continues
        # the same run (bit-identical only with the same world size).
        trajectory = {
            k: v
            for k, v in cfg.model_dump(mode="json").items()
            if k not in ("max_minutes", "prefetch", "checkpoint_every", "nproc", "backend")
        }
        self.signature = run_signature(
            regions,
            self.samples,
            {
                "train": trajectory,
                "model": model_cfg.model_dump(mode="json"),
                "loss": loss_cfg.model_dump(mode="json"),
                "triplets": asdict(triplets),
            },
        )

    @classmethod
    def from_params(
        cls,
        params: Params,
        regions: list[str],
        info: ConnInfo,
        *,
        paths: ProjectPaths | None = None,
        out_dir: Path | None = None,
        checkpoint_dir: Path | None = None,
    ) -> Trainer:
        """The run params.yaml describes, on the regions' samples (inputs and outputs: `paths`, core.paths)."""
        paths = paths or ProjectPaths.from_params(params)
        source = SourceSettings(
            kind=params.train.source,
            paths=paths,
            spec=MetatileSpec.from_config(params.render, params.augment, params.tiles),
            info=info,
            orchestrate=params.orchestrate,
            max_shift_m=params.augment.max_shift_m,
            centre_max_shift_m=params.augment.centre_max_shift_m if params.model.centre_px else None,
        )
        return cls(
            regions,
            load_samples(regions, paths),
            cfg=params.train,
            model_cfg=params.model,
            loss_cfg=params.loss,
            triplets=TripletConfig.from_config(params.triplets, params.augment),
            source=source,
            out_dir=out_dir or paths.model_dir,
            checkpoint_dir=checkpoint_dir or paths.checkpoints,
        )

    def _split_rows(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        mask = (self.samples["split"] == split).to_numpy()
        rows = np.flatnonzero(mask)
        if len(rows) < 2:
            raise Loc2VecError(f"only {len(rows)} {split} locations in {self.regions}: sample more locations")
        weights = self.samples["weight"].to_numpy()[rows] if "weight" in self.samples else None
        return rows, weights

    def fit(self, resume: bool = True, tracker=None) -> dict[str, Any]:
        """Train (resuming a matching checkpoint); under torchrun as one rank of a DDP job.

        Returns the training summary; ranks other than 0 return only their rank and weights digest.
        """
        with ddp.process_group(self.cfg.backend, self.device) as ctx:
            return self._fit(ctx, resume, tracker if ctx.is_main else None)

    def _fit(self, ctx: ddp.DistContext, resume: bool, tracker) -> dict[str, Any]:
        cfg, device = self.cfg, self.device
        torch.manual_seed(cfg.seed)
        if device.type == "cpu":
            deterministic_cpu_kernels()
        model = Encoder(self.model_cfg).to(device)
        channels_last = cfg.channels_last  # faster on CUDA and on CPU (oneDNN) alike
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        loss_fn = build_loss(self.loss_cfg)
        state = TrainState(history=[])
        best_weights = copy.deepcopy(model.state_dict())
        if ctx.enabled:  # same initial weights on every rank (seeded above), own dropout masks from here on
            torch.manual_seed(ddp.rank_seed(cfg.seed, ctx.rank))

        checkpoints = Checkpointer(self.checkpoint_path, self.signature, cfg.seed)
        ckpt = checkpoints.load(device) if resume else None
        if ckpt is not None:
            state, best_weights = checkpoints.restore(ckpt, model, optimizer, scheduler, ctx)
        if ctx.enabled and len(set(ddp.all_gather(state.step, ctx))) > 1:
            raise Loc2VecError(
                f"DDP ranks would start at different steps: every rank must see {self.checkpoint_path} "
                "(use a filesystem shared by all nodes, or --no-resume)"
            )
        step_model = self._step_model(model, ctx)

        source = build_source(self.samples, self.source, device)
        train_rows, train_w = self._split_rows("train")
        val_rows, _ = self._split_rows("val")
        train_stream = TripletBatches(source, train_rows, self.triplet_cfg, weights=train_w, seed=cfg.seed)
        # Channel drop is a training-time augmentation (the article: "during training"); val
        # positives are rotated and shifted re-renders with all channels. Val batches are composed
        # like training's, so early stopping follows the same task.
        val_cfg = replace(self.triplet_cfg, channel_drop_p=0.0)
        val_stream = TripletBatches(source, val_rows, val_cfg, seed=cfg.seed + 7919)
        draw, loss_scale = self._batch_draw(train_stream, len(train_rows), ctx)
        if tracker is not None:
            state.mlflow_run_id = tracker.start(self, model, state.mlflow_run_id)
            if ctx.enabled:
                tracker.mlflow.set_tags({"ddp.world_size": ctx.world_size, "ddp.backend": ctx.backend})
            if state.step == 0:
                tracker.log_triplet_grid(train_stream.batch(0), self.model_cfg.in_channels)

        started = time.monotonic()
        pool = ThreadPoolExecutor(max_workers=1)
        pending = {k: pool.submit(draw, k) for k in range(state.step, state.step + cfg.prefetch + 1)}
        bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train", unit="step", disable=not ctx.is_main)
        try:
            while state.step < cfg.max_steps:
                k = state.step
                batch = pending.pop(k).result()
                pending[k + cfg.prefetch + 1] = pool.submit(draw, k + cfg.prefetch + 1)
                record = self._step(step_model, model, batch, loss_fn, loss_scale, optimizer, scheduler, ctx)
                state.step += 1
                record = {"step": state.step, **record}
                if ctx.is_main and (state.step % cfg.val_every == 0 or state.step == cfg.max_steps):
                    record.update(self._validate(model, val_stream, loss_fn, channels_last))
                    if record_validation(state, record["val_triplet_accuracy"], cfg):
                        best_weights = copy.deepcopy(model.state_dict())
                state.history.append(record)
                if tracker is not None:
                    tracker.log_step(record)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    acc=f"{record['triplet_accuracy']:.2f}",
                    val=f"{state.best_val_accuracy:.3f}",
                )
                record_budgets(state, cfg, time.monotonic() - started)
                if ctx.enabled:  # rank 0 alone validates and owns the clock: every rank follows its decision
                    stop = ddp.broadcast_flag(bool(state.stopped_reason), ctx, device)
                    if not ctx.is_main:
                        state.stopped_reason = "stopped with rank 0" if stop else ""
                if state.step % cfg.checkpoint_every == 0 or state.stopped_reason:
                    checkpoints.save(model, optimizer, scheduler, state, best_weights, ctx)
                if state.stopped_reason:
                    break
        finally:
            bar.close()
            pool.shutdown(wait=False, cancel_futures=True)

        extra: dict[str, Any] = {}
        if ctx.enabled:
            digests = ddp.all_gather(ddp.parameters_digest(model), ctx)
            if not ctx.is_main:
                return {
                    "rank": ctx.rank,
                    "world_size": ctx.world_size,
                    "steps": state.step,
                    "weights_sha256": digests[ctx.rank],
                }
            in_sync = len(set(digests)) == 1
            if not in_sync:
                log.error("DDP ranks ended with different weights: %s", digests)
            extra["distributed"] = {
                "world_size": ctx.world_size,
                "backend": ctx.backend,
                "ranks_in_sync": in_sync,
                "rank_weights_sha256": digests,
            }

        if state.best_step < 0:  # never validated (tiny runs): validate the final weights
            state.history[-1].update(self._validate(model, val_stream, loss_fn, channels_last))
            state.best_val_accuracy, state.best_step = state.history[-1]["val_triplet_accuracy"], state.step
            best_weights = copy.deepcopy(model.state_dict())
        model.load_state_dict(best_weights)
        run = {
            "regions": self.regions,
            "wall_s": round(time.monotonic() - started, 1),
            "device": str(self.device),
            "cpu_bf16": bool(self.cfg.cpu_bf16),
            "source": self.cfg.source,
            "n_train_locations": int((self.samples["split"] == "train").sum()),
            "n_val_locations": int((self.samples["split"] == "val").sum()),
            "signature": self.signature,
        }
        summary = write_outputs(self.out_dir, model, self.model_cfg, state, run, extra)
        if tracker is not None:
            tracker.finish(self, model.cpu().eval(), summary, self.out_dir)
        return summary

    def _step(
        self, step_model, model, batch: TripletBatch, loss_fn, loss_scale: float, optimizer, scheduler, ctx
    ) -> dict[str, float]:
        """One optimisation step on a batch; returns its metrics (under DDP: the global batch's)."""
        model.train()
        a, p, n = forward_triplets(
            step_model,
            batch,
            self.device,
            self.cfg.channels_last,
            self.cfg.cpu_bf16,
            encode_negatives=self.loss_cfg.name not in NEGATIVE_FREE,
        )
        loss = loss_fn(a, p, n, groups=batch.location.to(self.device))
        optimizer.zero_grad(set_to_none=True)
        # under DDP, each rank's mean weighted by its share of the global batch (1.0 when even)
        (loss if loss_scale == 1.0 else loss * loss_scale).backward()
        optimizer.step()
        scheduler.step()
        terms = softpn_terms(a.detach(), p.detach(), n.detach())
        record = {
            "loss": float(loss.detach()),
            "d_pos": float(terms["d_pos"]),
            "d_neg": float(terms["d_neg"]),
            "triplet_accuracy": float(triplet_accuracy(a.detach(), p.detach(), n.detach())),
            "lr": scheduler.get_last_lr()[0],
        }
        if ctx.enabled:  # log the global batch's metrics, as a single process would
            keys = ("loss", "d_pos", "d_neg", "triplet_accuracy")
            record.update(ddp.weighted_mean({k: record[k] for k in keys}, len(batch.anchor), ctx, self.device))
        return record

    @torch.no_grad()
    def _validate(self, model, stream: TripletBatches, loss_fn, channels_last: bool) -> dict[str, float]:
        model.eval()
        accs, losses = [], []
        for k in range(self.cfg.val_batches):
            batch = stream.batch(k)  # no channel drop: its negatives are copies of its positives
            a, p, n = forward_triplets(model, batch, self.device, channels_last, self.cfg.cpu_bf16, distinct_once=True)
            accs.append(float(triplet_accuracy(a, p, n)))
            losses.append(float(loss_fn(a, p, n, groups=batch.location.to(self.device))))
        return {"val_triplet_accuracy": float(np.mean(accs)), "val_loss": float(np.mean(losses))}

    def _step_model(self, model: torch.nn.Module, ctx: ddp.DistContext) -> torch.nn.Module:
        """What the training step calls: the model, DDP-wrapped across ranks, compiled on CUDA if asked.

        Validation, checkpoints and outputs use the bare model (rank 0 alone runs them, and
        DDP's forward is a collective).
        """
        wrapped: torch.nn.Module = model
        if ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # DDP's default syncs buffers from rank 0 before each forward: every rank's BatchNorm
            # running statistics are rank 0's, which are what checkpoints and outputs hold.
            wrapped = DistributedDataParallel(model, device_ids=ids)
        return torch.compile(wrapped) if self.cfg.compile and self.device.type == "cuda" else wrapped

    def _batch_draw(
        self, stream: TripletBatches, n_rows: int, ctx: ddp.DistContext
    ) -> tuple[Callable[[int], TripletBatch], float]:
        """Batch k for this rank, and its loss scale: the whole batch alone, a slice of its locations under DDP."""
        if not ctx.enabled:
            return stream.batch, 1.0
        n_loc, n_pairs = min(self.triplet_cfg.locations_per_batch, n_rows), self.triplet_cfg.pairs_per_location
        lo, hi = ddp.shard_bounds(n_loc, ctx)

        def draw(k: int) -> TripletBatch:
            b = stream.batch(k)  # locations are contiguous runs of P pairs
            rows = slice(lo * n_pairs, hi * n_pairs)
            return TripletBatch(b.anchor[rows], b.positive[rows], b.negative[rows], b.location[rows])

        return draw, ddp.shard_loss_scale(n_loc, ctx)


def train(
    trainer: Trainer, *, resume: bool = True, track: bool = True, paths: ProjectPaths | None = None
) -> dict[str, Any]:
    """Fit a run; track it in MLflow (rank 0) with the project's store. Returns the training summary."""
    tracker = None
    if track and ddp.env_context().is_main:
        from loc2vec.training.tracking import MlflowTracker

        if paths is None:
            raise Loc2VecError("tracking a run in MLflow needs the project's paths")
        tracker = MlflowTracker(paths)
    return trainer.fit(resume=resume, tracker=tracker)
