"""MLflow tracking for training: params, per-step metrics, pictures, the model and its registry alias.

The store is local by default (sqlite:///<project>/mlflow.db, artifacts in <project>/mlruns);
MLFLOW_TRACKING_URI selects a server instead. One experiment per region set. Each trained version
is registered with the alias `candidate`; the `champion` alias (what embed publishes) is set on the
first version and afterwards moved only by the downstream gate (loc2vec/promote.py).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from loc2vec.config import load_params

log = logging.getLogger(__name__)
SOURCE_ROOT = Path(__file__).resolve().parents[1]
CHAMPION = "champion"
CANDIDATE = "candidate"  # the newest trained version, waiting for the downstream gate


# Stores this process derived from a project root. `mlflow.set_tracking_uri` copies its argument into
# MLFLOW_TRACKING_URI, so the variable alone cannot tell a user's choice from our own earlier call
# (which would pin every later project root of the process to the first one's store).
_DERIVED: set[str] = set()


def user_tracking_uri() -> str | None:
    """MLFLOW_TRACKING_URI when the user set it (a server, another store), else None."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return env if env and env not in _DERIVED else None


def tracking_uri() -> str:
    """The user's MLFLOW_TRACKING_URI, else the project's sqlite:///<root>/mlflow.db."""
    user = user_tracking_uri()
    if user:
        return user
    uri = f"sqlite:///{load_params().root / 'mlflow.db'}"
    _DERIVED.add(uri)
    return uri


def setup_mlflow(experiment: str):
    """Point MLflow at the configured store and select (creating if needed) the experiment."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    if mlflow.get_experiment_by_name(experiment) is None:
        # the project's own store keeps artifacts in <root>/mlruns (not in whatever the cwd is)
        artifacts = None if user_tracking_uri() else (load_params().root / "mlruns").as_uri()
        mlflow.create_experiment(experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment)
    return mlflow


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=SOURCE_ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=SOURCE_ROOT,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def data_versions(regions: list[str]) -> dict[str, str]:
    """DVC's md5 of every stage output (dvc.lock), else the md5 of the sample files."""
    import hashlib

    import yaml

    root = load_params().root
    lock = root / "dvc.lock"
    out: dict[str, str] = {}
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for name, stage in stages.items():
            for o in stage.get("outs", []):
                if o.get("md5"):  # MLflow param names allow no '@' (foreach stages are 'ingest@region')
                    out[f"dvc.{name.replace('@', '.')}.{o['path']}"] = o["md5"]
    for region in regions:
        path = root / "data" / "samples" / f"{region}.parquet"
        if path.is_file():
            out[f"samples.{region}.md5"] = hashlib.md5(path.read_bytes()).hexdigest()
    return out


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


class MlflowTracker:
    """Logs one training run; methods are called by the Trainer."""

    def __init__(self) -> None:
        self.mlflow = None
        self._pending: list[dict[str, float]] = []

    def start(self, trainer, model, run_id: str | None) -> str:
        params = load_params()
        mlflow = self.mlflow = setup_mlflow(f"{trainer.cfg.experiment_prefix}-{'+'.join(sorted(trainer.regions))}")
        run = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run()
        if run_id is None:
            flat: dict[str, Any] = {}
            for section in ("train", "model", "loss", "triplets"):
                _flatten(section, params.section(section), flat)
            flat.update({"git_commit": git_commit(), "regions": ",".join(trainer.regions),
                         "parameters": sum(p.numel() for p in model.parameters()), "device": str(trainer.device)})  # fmt: skip
            flat.update(data_versions(trainer.regions))
            mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        return run.info.run_id

    def log_step(self, record: dict[str, float]) -> None:
        step = int(record["step"])
        self.mlflow.log_metrics({k: float(v) for k, v in record.items() if k != "step"}, step=step)

    def log_triplet_grid(self, batch) -> None:
        from loc2vec.viz import triplet_grid

        with tempfile.TemporaryDirectory() as d:
            idx = np.arange(0, len(batch.anchor), max(1, len(batch.anchor) // 6))[:6]
            path = triplet_grid(batch.anchor[idx].numpy(), batch.positive[idx].numpy(), batch.negative[idx].numpy(),
                                Path(d) / "triplets.png", title="training triplets (anchor, positive, negative)")  # fmt: skip
            self.mlflow.log_artifact(str(path), artifact_path="figures")

    def finish(self, trainer, model, summary: dict[str, Any], out_dir: Path) -> None:
        mlflow = self.mlflow
        from loc2vec.viz import activation_maximization

        mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, int | float) and v is not None})
        for name in ("training_curves.png", "train_curve.csv", "summary.json"):
            if (out_dir / name).is_file():
                mlflow.log_artifact(str(out_dir / name), artifact_path="figures" if name.endswith(".png") else None)
        with tempfile.TemporaryDirectory() as d:
            for path in activation_maximization(model, Path(d)):
                mlflow.log_artifact(str(path), artifact_path="figures")
        # batch 2: an example of batch 1 makes torch.export specialise the batch dimension to 1
        example = np.zeros((2, model.cfg.in_channels, model.cfg.input_size, model.cfg.input_size), dtype=np.float32)
        import torch

        info = mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=example,  # MLflow infers the signature (B, 12, 128, 128) float32 → (B, 16)
            registered_model_name=trainer.cfg.registered_model,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "loc2vec"],
        )
        version = info.registered_model_version
        register_candidate(trainer.cfg.registered_model, str(version), summary["best_val_triplet_accuracy"])
        mlflow.end_run()


def register_candidate(name: str, version: str, val_accuracy: float) -> bool:
    """Point `candidate` at a freshly trained version (and `champion` when there is none yet).

    Training does not crown champions: the downstream gate does (loc2vec/promote.py). Returns
    whether the version became champion because none existed.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    client.set_model_version_tag(name, version, "val_triplet_accuracy", str(val_accuracy))
    client.set_registered_model_alias(name, CANDIDATE, version)
    try:
        client.get_model_version_by_alias(name, CHAMPION)
        return False
    except MlflowException:  # no champion yet: the first model serves until a better one passes the gate
        client.set_registered_model_alias(name, CHAMPION, version)
        log.info("model %s version %s is the first %s", name, version, CHAMPION)
        return True


def summary_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
