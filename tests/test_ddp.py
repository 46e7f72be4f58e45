"""DDP training: a real 2-process gloo run on CPU through the user's entry points, and exact resume under DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from .fixtures.project import load_project
from .fixtures.trained import patched_params

TINY = {
    "sample": {"n_locations": 160, "block_m": 400.0, "seed": 7},
    "triplets": {"locations_per_batch": 4, "pairs_per_location": 2},
    # rank 0 reaches the (trivial) target at its first validation: every rank must stop there with it
    "train": {
        "max_steps": 20,
        "checkpoint_every": 2,
        "val_every": 10,
        "val_batches": 1,
        "max_minutes": 0.0,
        "target_val_accuracy": 0.0,
        "warmup_steps": 2,
        "prefetch": 1,
        "nproc": 1,
        "backend": "auto",
    },
}
STEPS = TINY["train"]["val_every"]  # the early stop
TIMEOUT_S = 150


@pytest.fixture(scope="module")
def ddp_project(project: Path, region: str) -> Iterator[Path]:
    """The test project with tiny sampling/training params, sampled once for the module."""
    from .fixtures.project import write_samples

    with patched_params(project, {**TINY, "pipeline": {"regions": [region]}}):
        write_samples(region)
        yield project


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 ranks on 2 cores


def _checkpoint(project: Path) -> Path:
    return project / "data" / "checkpoints" / "train.pt"


def _digest(state_dict: dict[str, torch.Tensor]) -> str:
    from loc2vec.training.distributed import parameters_digest
    from loc2vec.training.model import Encoder

    model = Encoder(load_project().params.model)
    model.load_state_dict(state_dict)
    return parameters_digest(model)


@pytest.fixture(scope="module")
def reference(ddp_project: Path) -> dict:
    """`loc2vec train --nproc 2` (it starts torchrun itself): the uninterrupted run.

    Without MLflow: its model logging would double this test's time; `test_rank0_alone_tracks` covers who tracks.
    """
    _checkpoint(ddp_project).unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "loc2vec.cli", "train", "--nproc", "2", "--no-resume", "--no-mlflow"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"stdout": proc.stdout, "checkpoint": torch.load(_checkpoint(ddp_project), weights_only=False)}


def test_two_gloo_processes_train_in_sync_and_rank0_alone_writes(ddp_project: Path, reference: dict) -> None:
    out = ddp_project / "data" / "model"
    summary = json.loads((out / "summary.json").read_text())
    provenance = json.loads((out / "run.json").read_text())  # wall-clock time and MLflow run: not a DVC output
    assert json.loads(reference["stdout"]) == {**summary, **provenance}, "rank 0 alone prints what it wrote"
    assert summary["steps"] == STEPS and summary["stopped"].startswith("reached target val accuracy")
    dist = summary["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo" and dist["ranks_in_sync"]
    # each rank hashed its own final parameters; both equal the final weights rank 0 checkpointed
    ckpt = reference["checkpoint"]
    assert len(dist["rank_weights_sha256"]) == 2
    assert set(dist["rank_weights_sha256"]) == {_digest(ckpt["model"])}
    assert ckpt["world_size"] == 2 and len(ckpt["rank_rng"]) == 2
    assert not torch.equal(ckpt["rank_rng"][0], ckpt["rank_rng"][1]), "each rank draws its own dropout masks"

    # outputs: a loadable model and a finite loss curve with every step once
    from loc2vec.training.outputs import load_encoder

    assert load_encoder(out)(torch.zeros(2, 12, 128, 128)).shape == (2, 16)
    curve = pd.read_csv(out / "train_curve.csv")
    assert curve["step"].tolist() == list(range(1, STEPS + 1))
    assert np.isfinite(curve["loss"]).all() and math.isfinite(summary["final_train_loss"])
    assert 0 <= summary["best_val_triplet_accuracy"] <= 1


def test_rank0_alone_tracks(monkeypatch: pytest.MonkeyPatch, proj) -> None:
    """`train` gives an MLflow tracker to rank 0 only (ranks > 0 log nothing)."""
    from loc2vec.training.tracking import MlflowTracker
    from loc2vec.training.trainer import train

    seen: dict[int, object] = {}

    class Recorder:  # stands in for the Trainer `train` fits
        def fit(self, resume: bool = True, tracker: object = None) -> dict:
            seen[int(os.environ["RANK"])] = tracker
            return {}

    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        train(Recorder(), paths=proj.paths)  # type: ignore[arg-type]
    assert isinstance(seen[0], MlflowTracker) and seen[1] is None


def test_killed_ddp_run_resumes_exactly(ddp_project: Path, reference: dict) -> None:
    """Raw torchrun, SIGKILLed (launcher and both ranks) mid-run, resumed: ends bit-identical to the reference."""
    import psutil

    ckpt_path = _checkpoint(ddp_project)
    ckpt_path.unlink()
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "loc2vec.cli",
        "train",
        "--no-mlflow",
    ]
    proc = subprocess.Popen(
        [*torchrun, "--no-resume"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline, killed_at = time.monotonic() + TIMEOUT_S, None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt_path.is_file():
                step = torch.load(ckpt_path, weights_only=False)["state"].step
                if 4 <= step < STEPS:
                    tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
                    for pid in tree:  # the workers run in their own sessions: kill each, like a crash
                        os.kill(pid, signal.SIGKILL)
                    killed_at = step
                    break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait()
    assert killed_at is not None, f"the run was not killed mid-training: {proc.stderr.read() if proc.stderr else ''}"
    interrupted = torch.load(ckpt_path, weights_only=False)["state"].step
    assert killed_at <= interrupted < STEPS

    done = subprocess.run(torchrun, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"resuming from {ckpt_path} at step {interrupted}" in done.stderr
    resumed, ref = torch.load(ckpt_path, weights_only=False), reference["checkpoint"]
    assert [r["step"] for r in resumed["state"].history] == list(range(1, STEPS + 1)), "no step lost or repeated"
    for key in ref["model"]:
        torch.testing.assert_close(resumed["model"][key], ref["model"][key], rtol=0, atol=0)
    for pid, state in ref["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(resumed["optimizer"]["state"][pid][name], state[name], rtol=0, atol=0)
    for a, b in zip(resumed["rank_rng"], ref["rank_rng"], strict=True):
        assert torch.equal(a, b)


def test_rank_slices_partition_the_global_batch() -> None:
    """Slices of locations cover the batch once, in order; scaled per-rank means average to the global mean."""
    from loc2vec.core.errors import Loc2VecError
    from loc2vec.training.distributed import DistContext, shard_bounds, shard_loss_scale
    from loc2vec.training.losses import softpn_loss

    n_loc, pairs, world = 5, 3, 2  # an uneven split: 2 and 3 locations
    ranks = [DistContext(rank=r, world_size=world) for r in range(world)]
    assert [shard_bounds(n_loc, c) for c in ranks] == [(0, 2), (2, 5)]
    assert shard_loss_scale(4, ranks[0]) == shard_loss_scale(4, ranks[1]) == 1.0
    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(n_loc * pairs, 16, generator=g, dtype=torch.float64) for _ in range(3))
    scaled = []
    for c in ranks:  # what DDP averages: each rank's scaled mean loss (gradients alike, by linearity)
        lo, hi = (b * pairs for b in shard_bounds(n_loc, c))
        scaled.append(softpn_loss(a[lo:hi], p[lo:hi], n[lo:hi]) * shard_loss_scale(n_loc, c))
    torch.testing.assert_close(sum(scaled) / world, softpn_loss(a, p, n))
    with pytest.raises(Loc2VecError, match="cannot be shared"):
        shard_bounds(1, DistContext(rank=0, world_size=2))
