"""MLflow tracking of a training run: params, per-step metrics, pictures, the model and its `candidate` alias.

One experiment per region set (`<train.experiment_prefix>-<regions>`). Each trained version is registered
and becomes `candidate`; the `champion` alias (what embedding publishes) is set on the first version and
afterwards moved only by the downstream gate (evaluation/gate.py). The store is the project's
(core/tracking.py).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from loc2vec.core.paths import ProjectPaths
from loc2vec.core.tracking import flatten_params, git_commit, setup_mlflow
from loc2vec.training.registry import register_candidate

log = logging.getLogger(__name__)


def data_versions(regions: list[str], paths: ProjectPaths) -> dict[str, str]:
    """DVC's md5 of every stage output (dvc.lock), else the md5 of the sample files."""
    out: dict[str, str] = {}
    if paths.dvc_lock.is_file():
        stages = (yaml.safe_load(paths.dvc_lock.read_text()) or {}).get("stages", {})
        for name, stage in stages.items():
            for o in stage.get("outs", []):
                if o.get("md5"):  # MLflow param names allow no '@' (foreach stages are 'ingest@region')
                    out[f"dvc.{name.replace('@', '.')}.{o['path']}"] = o["md5"]
    for region in regions:
        path = paths.samples(region)
        if path.is_file():
            with open(path, "rb") as fh:
                out[f"samples.{region}.md5"] = hashlib.file_digest(fh, "md5").hexdigest()
    return out


class MlflowTracker:
    """Logs one training run; methods are called by the Trainer."""

    def __init__(self, paths: ProjectPaths) -> None:
        self.paths = paths
        self.mlflow: Any = None

    def start(self, trainer, model, run_id: str | None) -> str:
        mlflow = self.mlflow = setup_mlflow(
            f"{trainer.cfg.experiment_prefix}-{'+'.join(sorted(trainer.regions))}", self.paths
        )
        run = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run()
        if run_id is None:
            sections = {
                "train": trainer.cfg.model_dump(mode="json"),
                "model": trainer.model_cfg.model_dump(mode="json"),
                "loss": trainer.loss_cfg.model_dump(mode="json"),
                "triplets": asdict(trainer.triplet_cfg),
            }
            flat = flatten_params("", sections, {})
            flat.update(
                {
                    "git_commit": git_commit(),
                    "regions": ",".join(trainer.regions),
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "device": str(trainer.device),
                }
            )
            flat.update(data_versions(trainer.regions, self.paths))
            mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        return run.info.run_id

    def log_step(self, record: dict[str, float]) -> None:
        step = int(record["step"])
        self.mlflow.log_metrics({k: float(v) for k, v in record.items() if k != "step"}, step=step)

    def log_triplet_grid(self, batch, channels: int) -> None:
        """Six triplets of a batch as a picture; `channels`: the context view's (a centre branch's tiles carry two)."""
        from loc2vec.raster.preview import triplet_grid

        with tempfile.TemporaryDirectory() as d:
            idx = np.arange(0, len(batch.anchor), max(1, len(batch.anchor) // 6))[:6]
            path = triplet_grid(
                batch.anchor[idx, :channels].numpy(),
                batch.positive[idx, :channels].numpy(),
                batch.negative[idx, :channels].numpy(),
                Path(d) / "triplets.png",
                title="training triplets (anchor, positive, negative)",
            )
            self.mlflow.log_artifact(str(path), artifact_path="figures")

    def finish(self, trainer, model, summary: dict[str, Any], out_dir: Path) -> None:
        import torch

        from loc2vec.training.figures import activation_maximization

        mlflow = self.mlflow
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, int | float) and v is not None})
        for name in ("training_curves.png", "train_curve.csv", "summary.json"):
            if (out_dir / name).is_file():
                mlflow.log_artifact(str(out_dir / name), artifact_path="figures" if name.endswith(".png") else None)
        with tempfile.TemporaryDirectory() as d:
            for path in activation_maximization(model, Path(d)):
                mlflow.log_artifact(str(path), artifact_path="figures")
        # batch 2: an example of batch 1 makes torch.export specialise the batch dimension to 1
        example = np.zeros((2, model.cfg.in_channels, model.cfg.input_size, model.cfg.input_size), dtype=np.float32)
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
