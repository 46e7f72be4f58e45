"""When training stops: the best validation so far, patience, a target accuracy, the step and time budgets.

The state lives in `TrainState`, which checkpoints persist, so a resumed run stops exactly where an
uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

from loc2vec.core.config import TrainConfig


@dataclass
class TrainState:
    """Where a run stands: its step, best validation, stop decision, history and MLflow run."""

    step: int = 0
    best_val_accuracy: float = -1.0
    best_step: int = -1
    evals_without_improvement: int = 0
    stopped_reason: str = ""
    history: list[dict[str, float]] | None = None
    mlflow_run_id: str | None = None


def record_validation(state: TrainState, accuracy: float, cfg: TrainConfig) -> bool:
    """Account for a validation at `state.step`; returns whether it is the new best (keep its weights).

    An improvement must exceed `cfg.min_delta`; `cfg.patience` evaluations without one stop the run, as
    does reaching `cfg.target_val_accuracy`.
    """
    improved = accuracy > state.best_val_accuracy + cfg.min_delta
    if improved:
        state.best_val_accuracy, state.best_step = accuracy, state.step
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
    if state.evals_without_improvement >= cfg.patience:
        state.stopped_reason = f"early stopping: no val improvement in {cfg.patience} evaluations"
    elif accuracy >= cfg.target_val_accuracy:
        state.stopped_reason = f"reached target val accuracy {cfg.target_val_accuracy}"
    return improved


def record_budgets(state: TrainState, cfg: TrainConfig, elapsed_s: float) -> None:
    """Stop at the wall-clock cap (if any) or at max_steps, unless another reason came first."""
    if cfg.max_minutes and elapsed_s / 60 > cfg.max_minutes:
        state.stopped_reason = state.stopped_reason or f"time budget of {cfg.max_minutes} min"
    if state.step == cfg.max_steps:
        state.stopped_reason = state.stopped_reason or "max_steps"
