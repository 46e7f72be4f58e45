"""Checkpoints that make a killed run resume bit-identically: model, optimizer, scheduler, RNG of every rank.

Hand-written rather than a library's (Lightning, torch.distributed.checkpoint): the guarantee tested here
is that a run killed at any step and resumed ends with the same bytes as one that never stopped, which
needs the torch RNG state of every DDP rank and the exact `TrainState`; a checkpoint is resumed only for
the same run signature (inputs and trajectory settings).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from loc2vec.core.atomic import atomic_path
from loc2vec.training import distributed as ddp
from loc2vec.training.early_stopping import TrainState

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves and restores one run's checkpoint file (rank 0 writes; every rank restores its own RNG)."""

    def __init__(self, path: Path, signature: str, seed: int):
        self.path, self.signature, self.seed = path, signature, seed

    def load(self, device: torch.device) -> dict[str, Any] | None:
        """The checkpoint of this run (same signature, not finished), or None."""
        if not self.path.is_file():
            return None
        try:
            ckpt = torch.load(self.path, map_location=device, weights_only=False)
        except Exception as exc:  # written by other code (a moved class), or damaged: start afresh
            log.warning("ignoring unreadable checkpoint %s: %s", self.path, exc)
            return None
        if ckpt.get("signature") == self.signature and not ckpt["state"].stopped_reason:
            return ckpt
        log.info("ignoring checkpoint %s (other inputs, or a finished run)", self.path)
        return None

    def restore(
        self, ckpt: dict[str, Any], model, optimizer, scheduler, ctx: ddp.DistContext
    ) -> tuple[TrainState, dict[str, Any]]:
        """Load a checkpoint into the run's objects; returns its state and best weights."""
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        self._restore_rng(ckpt, ctx)
        log.info("resuming from %s at step %d", self.path, ckpt["state"].step)
        return ckpt["state"], ckpt["best_weights"]

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
            torch.manual_seed(ddp.rank_seed(self.seed, ctx.rank) + ckpt["state"].step)

    def save(self, model, optimizer, scheduler, state: TrainState, best_weights, ctx: ddp.DistContext) -> None:
        """Write the checkpoint atomically (a collective under DDP: every rank's RNG goes to rank 0)."""
        extra: dict[str, Any] = {}
        if ctx.enabled:  # every rank's dropout RNG, so that a resumed DDP run continues exactly
            rank_rng = ddp.all_gather(torch.get_rng_state(), ctx)
            if not ctx.is_main:
                return
            extra = {"world_size": ctx.world_size, "rank_rng": rank_rng}
        content = {
            "signature": self.signature,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "state": state,
            "best_weights": best_weights,
            **extra,
        }
        with atomic_path(self.path) as tmp:
            torch.save(content, tmp)
