"""The model registry (MLflow): which version is `champion` or `candidate`, and loading a version's weights.

Why the model is rebuilt: MLflow's pt2 export may specialise the batch dimension (a champion logged
with a batch-1 example accepts only batch 1) and cannot be switched to eval mode; its state dict is
the Encoder's, so the weights are loaded into a fresh ``Encoder`` and checked against the artifact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch

from loc2vec.core.config import ModelConfig
from loc2vec.core.errors import Loc2VecError
from loc2vec.core.paths import ProjectPaths
from loc2vec.core.tracking import use_store
from loc2vec.training.model import Encoder

log = logging.getLogger(__name__)
CHAMPION = "champion"  # what embedding publishes; moved only by the downstream gate
CANDIDATE = "candidate"  # the newest trained version, waiting for the gate


class RegistryError(Loc2VecError, RuntimeError):
    """No such model version or alias, or a version whose weights do not fit the Encoder."""


@dataclass(frozen=True)
class ModelRef:
    """A registered model version: what the embeddings record about their model."""

    name: str
    version: str
    created: datetime  # registration time (UTC)
    run_id: str | None


def resolve_alias(paths: ProjectPaths, name: str, alias: str = CHAMPION) -> ModelRef:
    """The version `alias` (default: champion) of model `name` points at now (resolved once: it may move later)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = use_store(paths)
    try:
        mv = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise RegistryError(
            f"no '{alias}' version of registered model {name!r} in {uri}: run `loc2vec train` first"
        ) from exc
    created = datetime.fromtimestamp(int(mv.creation_timestamp) / 1000.0, tz=UTC)
    return ModelRef(name=name, version=str(mv.version), created=created, run_id=mv.run_id)


def _model_config(ref: ModelRef, fallback: ModelConfig) -> ModelConfig:
    """The architecture the version was trained with (its run's `model.*` params), else `fallback`."""
    from mlflow import MlflowClient

    if ref.run_id:
        params = MlflowClient().get_run(ref.run_id).data.params
        values = {k.removeprefix("model."): _param_value(v) for k, v in params.items() if k.startswith("model.")}
        if values:
            try:
                return ModelConfig.model_validate(values)
            except (TypeError, ValueError) as exc:
                raise RegistryError(f"{ref.name} v{ref.version}: its run's model.* params are unusable: {exc}") from exc
    return fallback


def _param_value(text: str) -> Any:
    """MLflow params are strings: '[16, 32]', '0.1', '12' → Python values."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_model(paths: ProjectPaths, ref: ModelRef, fallback: ModelConfig | None = None) -> Encoder:
    """The version's weights in a fresh Encoder, eval mode, checked against the registered artifact.

    The architecture is the one its run logged (`model.*` params), else `fallback` (default: the defaults).
    """
    import mlflow.pytorch

    use_store(paths)
    loaded = mlflow.pytorch.load_model(f"models:/{ref.name}/{ref.version}", map_location="cpu")
    if isinstance(loaded, Encoder):
        return loaded.eval()
    encoder = Encoder(_model_config(ref, fallback or ModelConfig()))
    try:
        encoder.load_state_dict(loaded.state_dict(), strict=True)
    except RuntimeError as exc:
        raise RegistryError(f"{ref.name} v{ref.version} does not hold Encoder weights: {exc}") from exc
    encoder.eval()
    x = torch.rand((1, 12, encoder.cfg.input_size, encoder.cfg.input_size), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        try:
            expected = loaded(x)
        except Exception:  # an export specialised to batch 2
            x = x.repeat(2, 1, 1, 1)
            expected = loaded(x)
        got = encoder(x)
    if not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
        raise RegistryError(f"{ref.name} v{ref.version}: rebuilt Encoder differs from the registered model")
    return encoder


def register_candidate(name: str, version: str, val_accuracy: float) -> bool:
    """Point `candidate` at a freshly trained version (and `champion` when there is none yet).

    Training does not crown champions: the downstream gate does (evaluation/gate.py). Returns
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
