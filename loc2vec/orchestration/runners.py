"""Fan-out over a Prefect task runner chosen by configuration alone; no domain code here.

Which runner is configuration only (params.yaml ``orchestrate.task_runner``, or the environment variable
LOC2VEC_TASK_RUNNER, which wins):

* ``threads``: Prefect's ThreadPoolTaskRunner, ``orchestrate.max_workers`` threads (raster/ hands Mapnik
  renders from its threads to a spawned process pool: Mapnik does not scale with threads).
* ``dask``: prefect-dask's DaskTaskRunner: ``orchestrate.dask_address`` (an existing scheduler) or, when
  null, a LocalCluster of ``dask_n_workers`` processes. A remote cluster must see the project directory
  at the same path (a shared filesystem) and reach the database.
* ``inline``: no Prefect at all: the caller's own loop.
* ``auto`` (the default): ``threads`` when a Prefect API is at hand (inside a flow or task run, or
  PREFECT_API_URL is set: the pipeline flow passes its API to the DVC stages it runs), else ``inline``.
  A bare ``loc2vec embed`` or a test then needs no Prefect server, and several of them never share the
  SQLite database of an ephemeral server (STACK-NOTES: it locks under concurrency).

Callers (raster.metatile_tasks, embedding.encode) split their work so that every runner produces the
same outputs; transient failures are retried (orchestration.transient).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from loc2vec.core.config import TASK_RUNNERS, OrchestrateConfig
from loc2vec.core.errors import ConfigError
from loc2vec.orchestration.transient import retry_options

if TYPE_CHECKING:
    from prefect.task_runners import TaskRunner

RUNNER_ENV = "LOC2VEC_TASK_RUNNER"
DASK_ADDRESS_ENV = "LOC2VEC_DASK_ADDRESS"
RunnerKind = Literal["inline", "threads", "dask"]


def _prefect_at_hand() -> bool:
    """Inside a flow or task run, or an API configured in the environment (never a harness's settings:
    a test harness left open must not switch other tests' library calls to Prefect)."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    if "prefect" not in sys.modules:  # not imported: certainly not inside a run; don't pay the import
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def runner_kind(cfg: OrchestrateConfig) -> RunnerKind:
    """The runner that fans out now: LOC2VEC_TASK_RUNNER, else orchestrate.task_runner; auto resolved."""
    kind = os.environ.get(RUNNER_ENV) or cfg.task_runner
    if kind not in TASK_RUNNERS:
        raise ConfigError(f"{RUNNER_ENV} must be one of {TASK_RUNNERS}, got {kind!r}")
    if kind == "auto":
        return "threads" if _prefect_at_hand() else "inline"
    return kind  # type: ignore[return-value]


def make_task_runner(cfg: OrchestrateConfig, kind: RunnerKind | None = None) -> TaskRunner:
    """The configured Prefect task runner (a fresh one: task runners are entered once)."""
    kind = kind or runner_kind(cfg)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        address = os.environ.get(DASK_ADDRESS_ENV) or cfg.dask_address
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": cfg.dask_n_workers,
                "threads_per_worker": cfg.dask_threads_per_worker,
                "processes": True,
                "dashboard_address": None,  # no Bokeh server: nothing to look at for a local pass
            }
        )
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    raise ConfigError(f"no Prefect task runner for {kind!r}")


# ---------------------------------------------------------------- map over a task runner


def map_tasks(
    fn: Callable[..., Any],
    calls: Sequence[dict[str, Any]],
    on_result: Callable[[int, Any], None],
    *,
    flow_name: str,
    run_name: str,
    task_name: str,
    task_run_name: str,
    cfg: OrchestrateConfig,
    kind: RunnerKind | None = None,
) -> None:
    """Run `fn(**call)` as one Prefect task per call on the configured runner, inside a flow of its own
    (a subflow when called inside a flow: the runner is this configuration's, not the caller's).

    `on_result(i, result)` runs in the calling process as each task completes (in completion order), so
    the caller can save progress as it goes; the first failure (after its retries) is raised as is.
    """
    kind = kind or runner_kind(cfg)
    if kind == "inline":
        for i, call in enumerate(calls):
            on_result(i, fn(**call))
        return
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.futures import as_completed

    # No cache policy: inputs are arrays and models (hashing them costs, and nothing is reused across runs).
    prefect_task = task(
        fn,
        name=task_name,
        task_run_name=task_run_name,
        cache_policy=NO_CACHE,
        persist_result=False,
        **retry_options(cfg),
    )

    def fan_out() -> None:
        futures = [prefect_task.submit(**call) for call in calls]
        position = {f.task_run_id: i for i, f in enumerate(futures)}
        for future in as_completed(futures):
            on_result(position[future.task_run_id], future.result())

    fan_out.__name__ = flow_name.replace("-", "_")
    runner_flow = flow(
        fan_out,
        name=flow_name,
        flow_run_name=run_name,
        task_runner=make_task_runner(cfg, kind),
        persist_result=False,
        validate_parameters=False,
    )
    runner_flow()
