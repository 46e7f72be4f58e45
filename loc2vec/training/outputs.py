"""What a training run leaves behind: model.pt + its config, the curve (DVC plot) and the summary (DVC metric).

Everything is written to a temporary directory and swapped in, so the model directory is always one
run's complete output.

The summary is a DVC metric (git-tracked, its hash in dvc.lock), so it holds only what the data and
params determine: no wall-clock time, no MLflow run id. Those describe one run, not its result; they go
to run.json beside it (git-ignored, not a DVC output) and to MLflow, so re-running the same training
leaves `git status` clean.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from loc2vec.core.atomic import swap_dir
from loc2vec.core.config import ModelConfig
from loc2vec.core.errors import Loc2VecError
from loc2vec.training.early_stopping import TrainState
from loc2vec.training.model import Encoder, count_parameters

log = logging.getLogger(__name__)
RUN_FILE = "run.json"  # this run's provenance (wall-clock time, MLflow run): not a DVC output


def write_outputs(
    out: Path,
    model: Encoder,
    model_cfg: ModelConfig,
    state: TrainState,
    run: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """model.pt + model_config.json, train_curve.csv, training_curves.png and summary.json in `out`, atomically.

    `run` describes the run (regions, wall_s, device, cpu_bf16, source, n_train_locations, n_val_locations, signature);
    returns the summary as written: that, what the state says (steps, best and first validation, final loss,
    why it stopped), the parameter count and `extra`; plus this run's provenance (wall_s, the MLflow run),
    which is written to run.json instead.
    """
    from loc2vec.training.figures import training_curves

    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), tmp / "model.pt")
    (tmp / "model_config.json").write_text(json.dumps(model_cfg.model_dump(mode="json"), indent=1))
    history = pd.DataFrame(state.history)
    history.to_csv(tmp / "train_curve.csv", index=False)
    training_curves(history, tmp / "training_curves.png")
    first_val = next((r["val_triplet_accuracy"] for r in state.history or [] if "val_triplet_accuracy" in r), None)
    full = {
        "regions": run["regions"],
        "steps": state.step,
        "best_step": state.best_step,
        "best_val_triplet_accuracy": round(state.best_val_accuracy, 4),
        "first_val_triplet_accuracy": None if first_val is None else round(first_val, 4),
        "final_train_loss": round(float(history["loss"].tail(10).mean()), 5),
        "stopped": state.stopped_reason,
        "device": run["device"],
        "parameters": count_parameters(model),
        # cpu_bf16: the numerics it trained with (train.cpu_bf16: auto decides by CPU; README, "Same bytes")
        **{k: run[k] for k in ("source", "cpu_bf16", "n_train_locations", "n_val_locations", "signature")},
        **(extra or {}),
    }
    provenance = {"wall_s": run["wall_s"], "mlflow_run_id": state.mlflow_run_id}
    (tmp / "summary.json").write_text(json.dumps(full, indent=1))
    (tmp / RUN_FILE).write_text(json.dumps(provenance, indent=1))
    swap_dir(tmp, out)
    log.info("training done: %s", {**full, **provenance})
    return {**full, **provenance}


def load_encoder(model_dir: Path, device: str = "cpu") -> Encoder:
    """The trained encoder of a model directory (model.pt + model_config.json), in eval mode."""
    if not (model_dir / "model.pt").is_file():
        raise Loc2VecError(f"no trained model in {model_dir}: run `loc2vec train`")
    cfg = ModelConfig.model_validate(json.loads((model_dir / "model_config.json").read_text()))
    model = Encoder(cfg)
    model.load_state_dict(torch.load(model_dir / "model.pt", map_location=device, weights_only=True))
    return model.to(device).eval()
