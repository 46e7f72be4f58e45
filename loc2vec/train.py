"""Train the encoder with triplet batches: Adam + warm-up/cosine LR, checkpoints, early stopping.

* Batch k is a pure function of (seed, k) (`TripletBatches.batch`), and the checkpoint holds
  model, optimizer, scheduler and torch RNG state, so a run killed at any point resumes at
  the checkpointed step and continues exactly as if it had never stopped (deterministic on CPU).
* CUDA when present (bf16 autocast, channels_last, optional torch.compile), CPU otherwise;
  no code change between the two.
* Early stopping on validation triplet accuracy — the fraction of val triplets with
  Δ(a,p) < min(Δ(a,n), Δ(p,n)) — over fixed val batches from spatially held-out locations
  (positives rotated and shifted; channel drop is for training only, as in the article).
* The default CPU budget is max_steps = 450 (~11 min at 1.4 s/step on 2 idle cores), sized so
  the cosine schedule completes; a wall-clock cap (max_minutes) is optional, because on a shared
  machine it would cut the schedule short.
* Everything is tracked in MLflow (see loc2vec/tracking.py).
* DDP under torchrun (`loc2vec train --nproc N`, or `torchrun --nproc-per-node=N -m loc2vec.cli
  train`): gloo on CPU, nccl on CUDA (one GPU per LOCAL_RANK). Each rank trains on its slice of the
  locations of the same global batch k, so batch size and composition do not depend on the world
  size; rank 0 alone validates, checkpoints, writes outputs and logs to MLflow, and broadcasts the
  decision to stop. Design notes in loc2vec/distributed.py. A single process never initialises
  torch.distributed and runs exactly as before.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from loc2vec import distributed as ddp
from loc2vec.atomic import atomic_path, swap_dir
from loc2vec.config import load_params, section_config
from loc2vec.data import StoredTiles, TileSource, TripletBatch, TripletBatches, TripletConfig, triplet_config
from loc2vec.errors import Loc2VecError
from loc2vec.losses import CoverageHead, LossConfig, coverage_loss, softpn_terms, triplet_accuracy
from loc2vec.model import Encoder, ModelConfig, count_parameters, to_input
from loc2vec.sampling import unit_xyz

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    # metatiles: cut on the fly from data/metatiles (the fast path) | tiles: the stored direct
    # tiles of data/tiles (the article's scheme). The name is the data directory, so DVC's train
    # stage depends on exactly the tiles it reads (`data/${train.source}`).
    source: str = "metatiles"
    lr: float = 1e-3
    min_lr_factor: float = 0.05  # cosine decays to lr·factor at max_steps
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_steps: int = 600
    max_minutes: float = 0.0  # optional wall-clock cap; 0 = none (max_steps is the budget)
    val_every: int = 25
    val_batches: int = 10
    checkpoint_every: int = 25
    patience: int = 8  # evaluations without improvement before stopping
    min_delta: float = 0.002
    target_val_accuracy: float = 1.01  # stop early once reached (>1 disables)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile on CUDA
    prefetch: int = 2  # batches prepared ahead in a background thread
    experiment_prefix: str = "loc2vec"
    registered_model: str = "loc2vec-encoder"
    # DDP: processes `loc2vec train` starts through torchrun (1 = one plain process); inside
    # torchrun its WORLD_SIZE decides. backend: auto (nccl on CUDA, gloo on CPU) | gloo | nccl.
    nproc: int = 1
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.source not in ("metatiles", "tiles"):
            raise ValueError(f"train.source must be 'metatiles' or 'tiles', got {self.source!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device must be auto, cpu or cuda, got {self.device!r}")
        if isinstance(self.nproc, bool) or not isinstance(self.nproc, int) or self.nproc < 1:
            raise ValueError(f"train.nproc must be an integer >= 1, got {self.nproc!r}")
        if self.backend not in ddp.BACKENDS:
            raise ValueError(f"train.backend must be one of {', '.join(ddp.BACKENDS)}, got {self.backend!r}")


def train_config() -> TrainConfig:
    return section_config(TrainConfig, "train")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise Loc2VecError("train.device is 'cuda' but no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


# ---------------------------------------------------------------- data


def samples_path(region: str) -> Path:
    return load_params().root / "data" / "samples" / f"{region}.parquet"


def load_samples(regions: list[str]) -> pd.DataFrame:
    frames = []
    for region in regions:
        path = samples_path(region)
        if not path.is_file():
            raise Loc2VecError(f"no samples for region {region!r} ({path}): run `loc2vec sample --region {region}`")
        frames.append(pd.read_parquet(path).assign(region=region))
    return pd.concat(frames, ignore_index=True)


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


def build_source(samples: pd.DataFrame, cfg: TrainConfig, device: torch.device) -> TileSource:
    """The configured tile source for every region of the samples (rows = samples' order)."""
    parts: list[tuple[TileSource, int]] = []
    for region, frame in samples.groupby("region", sort=False):
        if cfg.source == "tiles":
            from loc2vec.tiles import TileStore, default_store

            store = TileStore(default_store(str(region)))
            if len(store) != len(frame):
                raise Loc2VecError(
                    f"tile store of {region!r} is out of date: run `loc2vec render-tiles --region {region}`"
                )
            parts.append((StoredTiles(store), len(frame)))
        else:
            from loc2vec.data import FastTiles
            from loc2vec.metatiles import ensure_metatiles

            lats, lons = frame["lat"].to_numpy(), frame["lon"].to_numpy()
            index = ensure_metatiles(str(region), lats, lons)
            dev = str(device) if device.type == "cuda" else None
            parts.append((FastTiles(index, lats, lons, triplet_config().max_shift_m, device=dev), len(frame)))
    return parts[0][0] if len(parts) == 1 else ConcatSource(parts)


# ---------------------------------------------------------------- training


def lr_lambda(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def forward_triplets(
    model: torch.nn.Module, batch: TripletBatch, device: torch.device, channels_last: bool
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """One forward pass over anchors, positives and negatives together (shared BN statistics).

    Returns ((a, p, n) embeddings, the coverage read-out of all 3B tiles or None): a
    `TrainingModel` with a coverage head returns both, a bare encoder the embeddings.
    """
    x = torch.cat([batch.anchor, batch.positive, batch.negative]).to(device, non_blocking=True)
    x = to_input(x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model(x)
    emb, coverage = out if isinstance(out, tuple) else (out, None)
    return emb.float().split(len(batch.anchor)), coverage


def embed_triplets(model: torch.nn.Module, batch: TripletBatch, device: torch.device, channels_last: bool):
    """(a, p, n) embeddings of a batch (see `forward_triplets`)."""
    return forward_triplets(model, batch, device, channels_last)[0]


class TrainingModel(torch.nn.Module):
    """What the optimizer trains: the encoder, plus the coverage read-out head when loss.coverage_weight > 0.

    One module, so that DDP synchronises the head's gradients with the encoder's.
    """

    def __init__(self, encoder: Encoder, coverage_head: CoverageHead | None) -> None:
        super().__init__()
        self.encoder, self.coverage_head = encoder, coverage_head

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        emb = self.encoder(x)
        return emb if self.coverage_head is None else (emb, self.coverage_head(emb))


@dataclass
class TrainState:
    step: int = 0
    best_val_accuracy: float = -1.0
    best_step: int = -1
    evals_without_improvement: int = 0
    stopped_reason: str = ""
    history: list[dict[str, float]] | None = None
    mlflow_run_id: str | None = None


def run_signature(regions: list[str], samples: pd.DataFrame, parts: dict[str, Any]) -> str:
    """Identifies a training run's inputs: a checkpoint is resumed only for the same signature."""
    h = hashlib.sha256(json.dumps({"regions": regions, **parts}, sort_keys=True, default=str).encode())
    h.update(pd.util.hash_pandas_object(samples[["lat", "lon", "split"]], index=False).values.tobytes())
    return h.hexdigest()[:16]


class Trainer:
    def __init__(self, regions: list[str], out_dir: Path | None = None, checkpoint_dir: Path | None = None):
        params = load_params()
        self.regions = regions
        self.cfg = train_config()
        self.model_cfg = section_config(ModelConfig, "model")
        self.loss_cfg = section_config(LossConfig, "loss")
        self.triplet_cfg: TripletConfig = triplet_config()
        self.out_dir = out_dir or params.root / "data" / "model"
        self.checkpoint_path = (checkpoint_dir or params.root / "data" / "checkpoints") / "train.pt"
        self.device = ddp.rank_device(resolve_device(self.cfg.device), ddp.env_context())
        self.samples = load_samples(regions)
        # Settings that only decide when to stop, how to prefetch or how many processes share each
        # batch do not change the optimisation problem: a run resumed with another value continues
        # the same run (bit-identical only with the same world size).
        trajectory = {
            k: v
            for k, v in asdict(self.cfg).items()
            if k not in ("max_minutes", "prefetch", "checkpoint_every", "nproc", "backend")
        }
        self.signature = run_signature(
            regions,
            self.samples,
            {"train": trajectory, **{k: asdict(v) for k, v in
             {"model": self.model_cfg, "loss": self.loss_cfg, "triplets": self.triplet_cfg}.items()}},
        )  # fmt: skip

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
            torch.use_deterministic_algorithms(True, warn_only=True)
        model = Encoder(self.model_cfg).to(device)
        channels_last = True  # faster on CUDA and on CPU (oneDNN) alike
        model = model.to(memory_format=torch.channels_last)
        head = None
        if self.loss_cfg.coverage_weight > 0:
            head = CoverageHead(self.model_cfg.embedding_dim, self.model_cfg.in_channels).to(device)
        trainable = TrainingModel(model, head)
        optimizer = torch.optim.Adam(trainable.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        loss_fn = self.loss_cfg.build()
        state = TrainState(history=[])
        best_weights = copy.deepcopy(model.state_dict())
        if ctx.enabled:  # same initial weights on every rank (seeded above), own dropout masks from here on
            torch.manual_seed(ddp.rank_seed(cfg.seed, ctx.rank))

        if resume and self.checkpoint_path.is_file():
            ckpt = torch.load(self.checkpoint_path, map_location=device, weights_only=False)
            if ckpt.get("signature") == self.signature and not ckpt["state"].stopped_reason:
                model.load_state_dict(ckpt["model"])
                if head is not None:
                    head.load_state_dict(ckpt["coverage_head"])
                optimizer.load_state_dict(ckpt["optimizer"])
                scheduler.load_state_dict(ckpt["scheduler"])
                self._restore_rng(ckpt, ctx)
                state, best_weights = ckpt["state"], ckpt["best_weights"]
                log.info("resuming from %s at step %d", self.checkpoint_path, state.step)
            else:
                log.info("ignoring checkpoint %s (other inputs, or a finished run)", self.checkpoint_path)
        if ctx.enabled and len(set(ddp.all_gather(state.step, ctx))) > 1:
            raise Loc2VecError(
                f"DDP ranks would start at different steps: every rank must see {self.checkpoint_path} "
                "(use a filesystem shared by all nodes, or --no-resume)"
            )
        step_model = self._step_model(trainable, ctx)

        source = build_source(self.samples, cfg, device)
        train_rows, train_w = self._split_rows("train")
        val_rows, _ = self._split_rows("val")
        xyz = unit_xyz(self.samples["lat"].to_numpy(), self.samples["lon"].to_numpy())
        train_stream = TripletBatches(source, train_rows, self.triplet_cfg, weights=train_w, seed=cfg.seed, xyz=xyz)
        # Channel drop is a training-time augmentation (the article: "during training"); val
        # positives are rotated and shifted re-renders with all channels. Val batches are composed
        # like training's (neighbourhood batches included), so early stopping follows the same task.
        val_cfg = replace(self.triplet_cfg, channel_drop_p=0.0)
        val_stream = TripletBatches(source, val_rows, val_cfg, seed=cfg.seed + 7919, xyz=xyz)
        draw, loss_scale = self._batch_draw(train_stream, len(train_rows), ctx)
        if tracker is not None:
            state.mlflow_run_id = tracker.start(self, model, state.mlflow_run_id)
            if ctx.enabled:
                tracker.mlflow.set_tags({"ddp.world_size": ctx.world_size, "ddp.backend": ctx.backend})
            if state.step == 0:
                tracker.log_triplet_grid(train_stream.batch(0))

        started = time.monotonic()
        pool = ThreadPoolExecutor(max_workers=1)
        pending = {k: pool.submit(draw, k) for k in range(state.step, state.step + cfg.prefetch + 1)}
        bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train", unit="step", disable=not ctx.is_main)
        try:
            while state.step < cfg.max_steps:
                k = state.step
                batch = pending.pop(k).result()
                pending[k + cfg.prefetch + 1] = pool.submit(draw, k + cfg.prefetch + 1)
                trainable.train()
                (a, p, n), coverage = forward_triplets(step_model, batch, device, channels_last)
                loss = triplet_loss = loss_fn(a, p, n)
                cov_loss = None
                if coverage is not None:  # anchors and negatives: the tiles with all their channels
                    b = len(batch.anchor)
                    cov_loss = coverage_loss(
                        torch.cat([coverage[:b], coverage[2 * b :]]), torch.cat([batch.anchor, batch.negative])
                    )
                    loss = triplet_loss + self.loss_cfg.coverage_weight * cov_loss
                optimizer.zero_grad(set_to_none=True)
                # under DDP, each rank's mean weighted by its share of the global batch (1.0 when even)
                (loss if loss_scale == 1.0 else loss * loss_scale).backward()
                optimizer.step()
                scheduler.step()
                state.step += 1
                terms = softpn_terms(a.detach(), p.detach(), n.detach())
                record = {
                    "step": state.step,
                    "loss": float(loss.detach()),
                    **self._coverage_record(coverage, triplet_loss, cov_loss),
                    "d_pos": float(terms["d_pos"]),
                    "d_neg": float(terms["d_neg"]),
                    "triplet_accuracy": float(triplet_accuracy(a.detach(), p.detach(), n.detach())),
                    "lr": scheduler.get_last_lr()[0],
                }
                if ctx.enabled:  # log the global batch's metrics, as a single process would
                    keys = ("loss", "d_pos", "d_neg", "triplet_accuracy")
                    record.update(ddp.weighted_mean({k: record[k] for k in keys}, len(batch.anchor), ctx, device))
                if ctx.is_main and (state.step % cfg.val_every == 0 or state.step == cfg.max_steps):
                    record.update(self._validate(model, val_stream, loss_fn, channels_last))
                    if record["val_triplet_accuracy"] > state.best_val_accuracy + cfg.min_delta:
                        state.best_val_accuracy, state.best_step = record["val_triplet_accuracy"], state.step
                        state.evals_without_improvement = 0
                        best_weights = copy.deepcopy(model.state_dict())
                    else:
                        state.evals_without_improvement += 1
                    if state.evals_without_improvement >= cfg.patience:
                        state.stopped_reason = f"early stopping: no val improvement in {cfg.patience} evaluations"
                    elif record["val_triplet_accuracy"] >= cfg.target_val_accuracy:
                        state.stopped_reason = f"reached target val accuracy {cfg.target_val_accuracy}"
                state.history.append(record)
                if tracker is not None:
                    tracker.log_step(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['triplet_accuracy']:.2f}",
                                val=f"{state.best_val_accuracy:.3f}")  # fmt: skip
                if cfg.max_minutes and (time.monotonic() - started) / 60 > cfg.max_minutes:
                    state.stopped_reason = state.stopped_reason or f"time budget of {cfg.max_minutes} min"
                if state.step == cfg.max_steps:
                    state.stopped_reason = state.stopped_reason or "max_steps"
                if ctx.enabled:  # rank 0 alone validates and owns the clock: every rank follows its decision
                    stop = ddp.broadcast_flag(bool(state.stopped_reason), ctx, device)
                    if not ctx.is_main:
                        state.stopped_reason = "stopped with rank 0" if stop else ""
                if state.step % cfg.checkpoint_every == 0 or state.stopped_reason:
                    self._checkpoint(model, head, optimizer, scheduler, state, best_weights, ctx)
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
            extra["distributed"] = {"world_size": ctx.world_size, "backend": ctx.backend, "ranks_in_sync": in_sync,
                                    "rank_weights_sha256": digests}  # fmt: skip

        if state.best_step < 0:  # never validated (tiny runs): validate the final weights
            state.history[-1].update(self._validate(model, val_stream, loss_fn, channels_last))
            state.best_val_accuracy, state.best_step = state.history[-1]["val_triplet_accuracy"], state.step
            best_weights = copy.deepcopy(model.state_dict())
        model.load_state_dict(best_weights)
        summary = self._write_outputs(model, state, time.monotonic() - started, extra)
        if tracker is not None:
            tracker.finish(self, model.cpu().eval(), summary, self.out_dir)
        return summary

    @staticmethod
    def _coverage_record(coverage, triplet_loss: torch.Tensor, cov_loss) -> dict[str, float]:
        """The two parts of the loss, logged when the coverage read-out is on."""
        if coverage is None:
            return {}
        return {"triplet_loss": float(triplet_loss.detach()), "coverage_loss": float(cov_loss.detach())}

    @torch.no_grad()
    def _validate(self, model, stream: TripletBatches, loss_fn, channels_last: bool) -> dict[str, float]:
        model.eval()
        accs, losses = [], []
        for k in range(self.cfg.val_batches):
            a, p, n = embed_triplets(model, stream.batch(k), self.device, channels_last)
            accs.append(float(triplet_accuracy(a, p, n)))
            losses.append(float(loss_fn(a, p, n)))
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

    def _restore_rng(self, ckpt: dict[str, Any], ctx: ddp.DistContext) -> None:
        """The checkpointed torch RNG state of this rank (exact resume needs the same world size)."""
        written_by = ckpt.get("world_size", 1)
        if written_by != ctx.world_size:
            log.warning(
                "checkpoint written by %d process(es), resumed by %d: training continues, not bit-identically",
                written_by,
                ctx.world_size,
            )
        if not ctx.enabled:
            torch.set_rng_state(ckpt["torch_rng"])  # rank 0's, when a DDP run wrote it
            return
        states = ckpt.get("rank_rng")
        if states is not None and len(states) == ctx.world_size:
            torch.set_rng_state(states[ctx.rank])
        else:
            torch.manual_seed(ddp.rank_seed(self.cfg.seed, ctx.rank) + ckpt["state"].step)

    def _checkpoint(
        self, model, head, optimizer, scheduler, state: TrainState, best_weights, ctx: ddp.DistContext
    ) -> None:
        extra: dict[str, Any] = {}
        if ctx.enabled:  # every rank's dropout RNG, so that a resumed DDP run continues exactly
            rank_rng = ddp.all_gather(torch.get_rng_state(), ctx)
            if not ctx.is_main:
                return
            extra = {"world_size": ctx.world_size, "rank_rng": rank_rng}
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(
                {"signature": self.signature, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "state": state,
                 "best_weights": best_weights, **extra,
                 **({} if head is None else {"coverage_head": head.state_dict()})},
                tmp,
            )  # fmt: skip

    def _write_outputs(
        self, model: Encoder, state: TrainState, seconds: float, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """model.pt + config, training summary (DVC metric) and curve (DVC plot), atomically."""
        from loc2vec.viz import training_curves

        out = self.out_dir
        tmp = out.with_name(out.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), tmp / "model.pt")
        (tmp / "model_config.json").write_text(json.dumps(asdict(self.model_cfg), indent=1))
        history = pd.DataFrame(state.history)
        history.to_csv(tmp / "train_curve.csv", index=False)
        training_curves(history, tmp / "training_curves.png")
        first_val = next((r["val_triplet_accuracy"] for r in state.history if "val_triplet_accuracy" in r), None)
        summary = {
            "regions": self.regions,
            "steps": state.step,
            "best_step": state.best_step,
            "best_val_triplet_accuracy": round(state.best_val_accuracy, 4),
            "first_val_triplet_accuracy": None if first_val is None else round(first_val, 4),
            "final_train_loss": round(float(history["loss"].tail(10).mean()), 5),
            "stopped": state.stopped_reason,
            "wall_s": round(seconds, 1),
            "device": str(self.device),
            "parameters": count_parameters(model),
            "source": self.cfg.source,
            "n_train_locations": int((self.samples["split"] == "train").sum()),
            "n_val_locations": int((self.samples["split"] == "val").sum()),
            "signature": self.signature,
            "mlflow_run_id": state.mlflow_run_id,
            **(extra or {}),
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
        swap_dir(tmp, out)
        log.info("training done: %s", summary)
        return summary


def load_encoder(model_dir: Path | None = None, device: str = "cpu") -> Encoder:
    """The trained encoder from a model directory (default data/model), in eval mode."""
    model_dir = model_dir or load_params().root / "data" / "model"
    if not (model_dir / "model.pt").is_file():
        raise Loc2VecError(f"no trained model in {model_dir}: run `loc2vec train`")
    cfg = ModelConfig(**json.loads((model_dir / "model_config.json").read_text()))
    model = Encoder(cfg)
    model.load_state_dict(torch.load(model_dir / "model.pt", map_location=device, weights_only=True))
    return model.to(device).eval()


def train(regions: list[str], *, resume: bool = True, track: bool = True) -> dict[str, Any]:
    """Train on the regions' samples; returns the training summary (under DDP: rank 0's; see `Trainer.fit`)."""
    trainer = Trainer(regions)
    tracker = None
    if track and ddp.env_context().is_main:
        from loc2vec.tracking import MlflowTracker

        tracker = MlflowTracker()
    return trainer.fit(resume=resume, tracker=tracker)
