"""Process-group plumbing for DDP training (torchrun), kept apart so the Trainer reads as one loop.

torchrun (or `loc2vec train --nproc N`, which starts torchrun itself) runs N copies of the same
command with RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in the environment. Outside
torchrun every helper here is a no-op and torch.distributed is never initialised, so a
single-process run executes exactly the code it always did.

Design (see also training/trainer.py):
* Sharding: rank r trains on its contiguous slice of the *locations* of the one global batch k
  (`shard_bounds`), i.e. the L×P batch a single process would draw at step k. The global batch
  size, its locations, pairs and negatives (tiles of other locations of the global batch) and
  therefore lr/warm-up/schedule keep their meaning whatever the world size; SoftPN is a
  per-triplet mean, so slicing triplets changes nothing but BatchNorm's batch statistics (and,
  for triplet_margin with mining, the candidates: a rank mines within its slice). Slices differ
  by at most one location; `shard_loss_scale` keeps the gradient the global batch mean's then.
  (Batch k·world+r per rank was the alternative: world× the batch size, with lr and schedule
  silently meaning something else per world size.)
* Every rank builds the whole global batch in its prefetch thread and keeps its slice: cutting
  ~120 tiles takes tens of ms on CPU against ~1.4 s of forward/backward (STACK-NOTES), and it
  keeps batch k a pure function of (seed, k). Should data preparation ever dominate (fast GPUs),
  cut only the slice's tiles instead.
* Ranks seed dropout apart (`rank_seed`); checkpoints keep every rank's RNG state, so a DDP run
  killed and resumed with the same world size continues bit-identically (another world size
  resumes too, reseeded). Rank 0's decision to stop (validation, clock) is broadcast each step.
* No SyncBatchNorm: it runs on CUDA only (not on gloo/CPU), costs an all-reduce per BN layer in
  both passes, and each rank's slice is still 3·L·P/world tiles per forward (150 at the defaults
  on 2 ranks), plenty for batch statistics. DDP broadcasts rank 0's BN running statistics before
  every forward (its default), so the saved model carries rank 0's, as a checkpoint does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loc2vec.core.errors import Loc2VecError

if TYPE_CHECKING:  # torch is imported where used: the launcher (`loc2vec train --nproc N`) stays light
    import torch

log = logging.getLogger(__name__)
BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job: rank 0 of 1 outside torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone validates, checkpoints, writes outputs and talks to MLflow."""
        return self.rank == 0


def env_context() -> DistContext:
    """What torchrun's environment says this process is (nothing set: a plain single process)."""
    return DistContext(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def under_launcher() -> bool:
    """True inside a torchrun worker: `loc2vec train` must not launch torchrun again."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_backend(name: str, device: torch.device) -> str:
    """auto → nccl for CUDA ranks, gloo for CPU; nccl cannot reduce CPU tensors."""
    if name not in BACKENDS:
        raise Loc2VecError(f"train.backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise Loc2VecError("train.backend is 'nccl' but training runs on the CPU: use gloo (or auto)")
    return name


def rank_device(device: torch.device, ctx: DistContext) -> torch.device:
    """One GPU per LOCAL_RANK under DDP; the device unchanged otherwise."""
    import torch

    if not ctx.enabled or device.type != "cuda":
        return device
    if ctx.local_rank >= torch.cuda.device_count():
        raise Loc2VecError(
            f"LOCAL_RANK {ctx.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
            "start at most one process per GPU"
        )
    return torch.device("cuda", ctx.local_rank)


@contextmanager
def process_group(backend: str, device: torch.device) -> Iterator[DistContext]:
    """The job's process group for the duration of a fit (created here unless the caller made one)."""
    import torch
    import torch.distributed as dist

    ctx = env_context()
    if not ctx.enabled:
        yield ctx
        return
    if dist.is_initialized():  # the caller owns it
        yield DistContext(dist.get_rank(), dist.get_world_size(), ctx.local_rank, str(dist.get_backend()))
        return
    name = resolve_backend(backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=name)
    try:
        yield DistContext(dist.get_rank(), dist.get_world_size(), ctx.local_rank, name)
    finally:
        dist.destroy_process_group()


def shard_bounds(n_locations: int, ctx: DistContext) -> tuple[int, int]:
    """This rank's contiguous [lo, hi) of the global batch's locations (sizes differ by at most 1)."""
    if n_locations < ctx.world_size:
        raise Loc2VecError(
            f"a batch of {n_locations} locations cannot be shared by {ctx.world_size} processes: "
            "raise triplets.locations_per_batch or start fewer processes"
        )
    return n_locations * ctx.rank // ctx.world_size, n_locations * (ctx.rank + 1) // ctx.world_size


def shard_loss_scale(n_locations: int, ctx: DistContext) -> float:
    """Factor for this rank's mean loss so that DDP's gradient average is the global batch mean's.

    DDP averages gradients over ranks with equal weight; a rank holding a share s of the triplets
    must count s·world times. 1.0 exactly when the locations split evenly.
    """
    lo, hi = shard_bounds(n_locations, ctx)
    return (hi - lo) * ctx.world_size / n_locations


def _collective_device(device: torch.device, ctx: DistContext) -> torch.device | str:
    # nccl reduces CUDA tensors only; gloo takes CPU tensors.
    return device if ctx.backend == "nccl" else "cpu"


def weighted_mean(values: dict[str, float], weight: float, ctx: DistContext, device: torch.device) -> dict[str, float]:
    """Means over all ranks weighted by each rank's triplet count: the global batch's metrics."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([*(v * weight for v in values.values()), weight], dtype=torch.float64)
    t = t.to(_collective_device(device, ctx))
    dist.all_reduce(t)
    total = t.cpu().tolist()
    return {k: s / total[-1] for k, s in zip(values, total[:-1], strict=True)}


def broadcast_flag(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """Rank 0's flag on every rank (early stop, wall-clock cap: all ranks leave the loop together)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)], dtype=torch.int32, device=_collective_device(device, ctx))
    dist.broadcast(t, src=0)
    return bool(t.item())


def all_gather(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's object, in rank order (picklable, small: RNG states, digests)."""
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def parameters_digest(model: torch.nn.Module) -> str:
    """sha256 of the parameters: equal on every rank iff the ranks stayed in sync."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def rank_seed(seed: int, rank: int) -> int:
    """Each rank's seed for the global torch RNG (dropout): distinct per rank, fixed per (seed, rank)."""
    return seed * 1_000_003 + 104_729 * (rank + 1)


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run `python -m loc2vec.cli ARGV` as nproc DDP processes under torchrun; returns its exit status.

    Each worker gets cpu_count // nproc threads unless OMP_NUM_THREADS is set (torchrun's own
    default is 1). A SIGTERM or Ctrl-C of this process reaches torchrun, which stops its workers.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "loc2vec.cli",
        *argv,
    ]
    log.info("launching %d DDP processes: %s", nproc, " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def launch_train(nproc: int, *, regions: str | None, resume: bool, track: bool, verbose: bool = False) -> int:
    """`loc2vec train` with the same options, as nproc DDP processes."""
    argv = ["-v"] if verbose else []
    argv.append("train")
    if regions:
        argv += ["--regions", regions]
    if not resume:
        argv.append("--no-resume")
    if not track:
        argv.append("--no-mlflow")
    return launch(nproc, argv)
