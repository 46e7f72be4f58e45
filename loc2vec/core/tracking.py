"""Where MLflow keeps runs and models for a project, shared by training, evaluation and exploration.

The store is local by default (sqlite:///<project>/mlflow.db, artifacts in <project>/mlruns);
MLFLOW_TRACKING_URI selects a server instead. MLflow is imported only by the functions that need it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from loc2vec.core.paths import ProjectPaths

SOURCE_ROOT = Path(__file__).resolve().parents[2]

# Stores this process derived from a project root. `mlflow.set_tracking_uri` copies its argument into
# MLFLOW_TRACKING_URI, so the variable alone cannot tell a user's choice from our own earlier call
# (which would pin every later project root of the process to the first one's store).
_DERIVED: set[str] = set()


def user_tracking_uri() -> str | None:
    """MLFLOW_TRACKING_URI when the user set it (a server, another store), else None."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return env if env and env not in _DERIVED else None


def tracking_uri(paths: ProjectPaths) -> str:
    """The user's MLFLOW_TRACKING_URI, else the project's sqlite:///<root>/mlflow.db."""
    user = user_tracking_uri()
    if user:
        return user
    uri = f"sqlite:///{paths.mlflow_db}"
    _DERIVED.add(uri)
    return uri


def use_store(paths: ProjectPaths) -> str:
    """Point MLflow (its fluent API and new MlflowClients) at the project's store; returns the URI."""
    import mlflow

    uri = tracking_uri(paths)
    mlflow.set_tracking_uri(uri)
    return uri


def setup_mlflow(experiment: str, paths: ProjectPaths) -> Any:
    """Point MLflow at the project's store and select (creating if needed) the experiment; returns `mlflow`."""
    import mlflow

    use_store(paths)
    if mlflow.get_experiment_by_name(experiment) is None:
        # the project's own store keeps artifacts in <root>/mlruns (not in whatever the cwd is)
        artifacts = None if user_tracking_uri() else paths.mlruns.as_uri()
        mlflow.create_experiment(experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment)
    return mlflow


def flatten_params(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    """Nested mappings → dotted keys (MLflow params and metrics are flat)."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten_params(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value
    return out


def git_commit() -> str:
    """The source checkout's commit, with "-dirty" when tracked files differ; "unknown" outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=SOURCE_ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=SOURCE_ROOT, capture_output=True, text=True
        ).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
