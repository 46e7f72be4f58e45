"""Scale-out: metatile rendering and embedding fan out over a Prefect task runner.

Which runner is configuration only (params.yaml ``orchestrate.task_runner``, or the environment variable
LOC2VEC_TASK_RUNNER, which wins):

* ``threads``: Prefect's ThreadPoolTaskRunner, ``orchestrate.max_workers`` threads. Mapnik does not scale
  with threads (STACK-NOTES), so a metatile task running in the calling process hands the render to a
  spawned pool of ``tiles.render_processes`` Mapnik processes (the pool the inline path uses), and the
  thread only waits; embedding chunks are torch work, which already uses every core.
* ``dask``: prefect-dask's DaskTaskRunner: ``orchestrate.dask_address`` (an existing scheduler) or, when
  null, a LocalCluster of ``dask_n_workers`` processes. Worker processes render metatiles themselves
  (one Mapnik map set per worker thread) and encode chunks. A remote cluster must see the project
  directory at the same path (a shared filesystem: metatiles are written there, read by memory map)
  and reach the database.
* ``inline``: no Prefect at all: the stage's own process pool (metatiles) and one pass (embedding).
* ``auto`` (the default): ``threads`` when a Prefect API is at hand (inside a flow or task run, or
  PREFECT_API_URL is set: the pipeline flow passes its API to the DVC stages it runs), else ``inline``.
  A bare ``loc2vec embed`` or a test then needs no Prefect server, and several of them never share the
  SQLite database of an ephemeral server (STACK-NOTES: it locks under concurrency).

Outputs are identical whichever runner runs: a metatile is the same render wherever it is drawn, and
embedding chunks are whole ``embed.batch_size`` batches of the same cell order, so every forward pass
sees exactly the tiles the one-pass path gives it (tests/test_fanout.py compares the bytes).

Transient failures (a database connection refused or dropped, DVC's repo lock) are retried with
exponential backoff; anything else fails at once: see `is_transient`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from loc2vec.config import ConfigError, section_config

if TYPE_CHECKING:
    from prefect.task_runners import TaskRunner

    from loc2vec.metatiles import Metatile, MetatileGrid, MetatileIndex
    from loc2vec.model import Encoder

log = logging.getLogger(__name__)

RUNNER_ENV = "LOC2VEC_TASK_RUNNER"
DASK_ADDRESS_ENV = "LOC2VEC_DASK_ADDRESS"
RunnerKind = Literal["inline", "threads", "dask"]
RUNNERS = ("auto", "inline", "threads", "dask")


@dataclass(frozen=True)
class OrchestrateConfig:
    """params.yaml `orchestrate:` — Prefect flows (flows/) and the fan-out of this module."""

    task_runner: str = "auto"  # auto | inline | threads | dask (env LOC2VEC_TASK_RUNNER wins)
    max_workers: int = 0  # Prefect threads; 0 = one per core
    dask_address: str | None = None  # tcp://host:8786; null = a temporary LocalCluster (env LOC2VEC_DASK_ADDRESS)
    dask_n_workers: int = 2  # LocalCluster worker processes
    dask_threads_per_worker: int = 1
    embed_chunk_batches: int = 32  # embed.batch_size batches per embedding task
    retries: int = 3  # transient failures only
    retry_backoff_s: float = 10.0  # exponential: backoff, 2·backoff, 4·backoff, …
    retry_jitter_factor: float = 0.2  # each delay ± up to this fraction, so retries do not stampede
    lock_timeout_s: float = 3600.0  # wait this long for a flow's lock (0: fail at once; < 0: wait forever)
    timezone: str = "UTC"  # of the cron schedules
    refresh_cron: str = "0 3 * * 1"  # refresh_osm: weekly
    publish_cron: str = "30 5 * * *"  # publish (materialize-incremental): daily
    mlflow_ui: str = "http://127.0.0.1:5000"  # `mlflow ui --backend-store-uri sqlite:///mlflow.db`
    prefect_ui: str = "http://127.0.0.1:4200"  # `prefect server start`

    def __post_init__(self) -> None:
        if self.task_runner not in RUNNERS:
            raise ConfigError(f"orchestrate.task_runner must be one of {RUNNERS}, got {self.task_runner!r}")
        if self.max_workers < 0 or self.dask_n_workers < 1 or self.dask_threads_per_worker < 1:
            raise ConfigError("orchestrate.max_workers must be ≥ 0, dask_n_workers and dask_threads_per_worker ≥ 1")
        if self.embed_chunk_batches < 1:
            raise ConfigError("orchestrate.embed_chunk_batches must be ≥ 1")
        if self.retries < 0 or self.retry_backoff_s < 0 or not 0 <= self.retry_jitter_factor <= 1:
            raise ConfigError("orchestrate.retries and retry_backoff_s must be ≥ 0, retry_jitter_factor in [0, 1]")

    @property
    def workers(self) -> int:
        return self.max_workers or os.cpu_count() or 1

    def retry_delays(self) -> list[float]:
        """Exponential backoff, as `prefect.tasks.exponential_backoff` computes it."""
        from prefect.tasks import exponential_backoff

        return exponential_backoff(backoff_factor=self.retry_backoff_s)(self.retries) if self.retries else []


def orchestrate_config() -> OrchestrateConfig:
    return section_config(OrchestrateConfig, "orchestrate")


# ---------------------------------------------------------------- runners


def _prefect_at_hand() -> bool:
    """Inside a flow or task run, or an API configured in the environment (never a harness's settings:
    a test harness left open must not switch other tests' library calls to Prefect)."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    if "prefect" not in sys.modules:  # not imported: certainly not inside a run; don't pay the import
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def runner_kind(cfg: OrchestrateConfig | None = None) -> RunnerKind:
    """The runner that fans out now: LOC2VEC_TASK_RUNNER, else orchestrate.task_runner; auto resolved."""
    cfg = cfg or orchestrate_config()
    kind = os.environ.get(RUNNER_ENV) or cfg.task_runner
    if kind not in RUNNERS:
        raise ConfigError(f"{RUNNER_ENV} must be one of {RUNNERS}, got {kind!r}")
    if kind == "auto":
        return "threads" if _prefect_at_hand() else "inline"
    return kind  # type: ignore[return-value]


def make_task_runner(cfg: OrchestrateConfig | None = None, kind: RunnerKind | None = None) -> TaskRunner:
    """The configured Prefect task runner (a fresh one: task runners are entered once)."""
    cfg = cfg or orchestrate_config()
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


# ---------------------------------------------------------------- transient failures

# libpq / psycopg / DVC messages of failures that a later attempt can outlive. Matched on the text of an
# exception chain or a subprocess's output: a stage run by DVC reports only through its output.
TRANSIENT_PATTERNS: tuple[str, ...] = (
    r"OperationalError",
    r"could not connect to server",
    r"cannot connect to PostgreSQL",
    r"connection to server at .{0,120}failed",
    r"Connection refused",
    r"connection (?:is |was |already )?closed",
    r"server closed the connection unexpectedly",
    r"terminating connection due to administrator command",
    r"connection .{0,40}terminated",
    r"the database system is (?:starting up|shutting down|in recovery mode|not yet accepting connections)",
    r"SSL SYSCALL error",
    r"Connection reset by peer",
    r"could not receive data from server",
    r"remaining connection slots are reserved",
    r"too many clients already",
    r"Unable to acquire lock",  # DVC: another dvc process holds the repo lock
)
_TRANSIENT_RE = re.compile("|".join(f"(?:{p})" for p in TRANSIENT_PATTERNS), re.IGNORECASE)
# Never retried, even if the text also mentions a connection: the input itself is wrong.
_DETERMINISTIC = ("ConfigError", "checksum mismatch", "unknown region", "invalid region name")


def is_transient_text(text: str) -> bool:
    """True when a failure's text names a transient cause and no deterministic one."""
    return bool(_TRANSIENT_RE.search(text)) and not any(d in text for d in _DETERMINISTIC)


def is_transient(exc: BaseException) -> bool:
    """A database connection refused/dropped (psycopg2/psycopg OperationalError or its message anywhere in
    the exception chain), a ConnectionError, or an exception that says so itself (`transient = True`)."""
    seen: set[int] = set()
    chain: BaseException | None = exc
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if getattr(chain, "transient", None) is not None:
            return bool(chain.transient)  # type: ignore[attr-defined]
        if isinstance(chain, ConfigError):
            return False
        if isinstance(chain, ConnectionError) or type(chain).__name__ == "OperationalError":
            return True
        if is_transient_text(f"{type(chain).__name__}: {chain}"):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry a failed run only when its exception is transient.

    A plain function on purpose: Prefect calls the condition only if `inspect.isfunction` is true for it
    (a functools.partial or callable object would silently mean "never retry").
    """
    try:
        state.result()
    except Exception as exc:  # the run's own exception, re-raised by the state
        transient = is_transient(exc)
        log.info("%s failed (%s: %s): %s", task_run.name, type(exc).__name__, str(exc)[:200],
                 "transient, retrying" if transient else "not transient, no retry")  # fmt: skip
        return transient
    return False


def retry_options(cfg: OrchestrateConfig | None = None) -> dict[str, Any]:
    """Task options: `cfg.retries` retries of transient failures, exponential backoff with jitter."""
    cfg = cfg or orchestrate_config()
    return {
        "retries": cfg.retries,
        "retry_delay_seconds": cfg.retry_delays() or 0,
        "retry_jitter_factor": cfg.retry_jitter_factor if cfg.retries else None,
        "retry_condition_fn": retry_transient,
    }


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
    cfg: OrchestrateConfig | None = None,
    kind: RunnerKind | None = None,
) -> None:
    """Run `fn(**call)` as one Prefect task per call on the configured runner, inside a flow of its own
    (a subflow when called inside a flow: the runner is this configuration's, not the caller's).

    `on_result(i, result)` runs in the calling process as each task completes (in completion order), so
    the caller can save progress as it goes; the first failure (after its retries) is raised as is.
    """
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.futures import as_completed

    cfg = cfg or orchestrate_config()
    kind = kind or runner_kind(cfg)
    if kind == "inline":
        for i, call in enumerate(calls):
            on_result(i, fn(**call))
        return
    # No cache policy: inputs are arrays and models (hashing them costs, and nothing is reused across runs).
    prefect_task = task(fn, name=task_name, task_run_name=task_run_name, cache_policy=NO_CACHE,
                        persist_result=False, **retry_options(cfg))  # fmt: skip

    def fan_out() -> None:
        futures = [prefect_task.submit(**call) for call in calls]
        position = {f.task_run_id: i for i, f in enumerate(futures)}
        for future in as_completed(futures):
            on_result(position[future.task_run_id], future.result())

    fan_out.__name__ = flow_name.replace("-", "_")
    runner_flow = flow(fan_out, name=flow_name, flow_run_name=run_name, task_runner=make_task_runner(cfg, kind),
                       persist_result=False, validate_parameters=False)  # fmt: skip
    runner_flow()


# ---------------------------------------------------------------- metatiles


_RENDER_POOLS: dict[int, Any] = {}  # pid → the Mapnik process pool of an ensure_metatiles call in that process


def render_metatile(region: str, grid: MetatileGrid, key: str) -> Metatile:
    """Render and store one metatile; returns its index entry.

    In the process that called `render_missing` (the threads runner, or a Dask cluster in that process),
    the render goes to its Mapnik process pool: threads only orchestrate. Elsewhere (a Dask worker) it
    renders right here, with the worker thread's own maps.
    """
    from loc2vec.metatiles import _render_one

    pool = _RENDER_POOLS.get(os.getpid())
    if pool is not None:
        return pool.apply(_render_one, ((region, grid, key),))
    return _render_one((region, grid, key))


def render_missing(
    index: MetatileIndex, missing: Iterable[str], on_done: Callable[[Metatile], None], *, kind: RunnerKind
) -> None:
    """Render the `missing` metatiles of an index, one task each; `on_done` records each as it lands."""
    from loc2vec.metatiles import _pool, tiles_config

    cfg = orchestrate_config()
    keys = list(missing)
    # Threads hand renders to Mapnik processes; Dask workers are processes already (no pool here).
    processes = min(tiles_config().render_processes or os.cpu_count() or 1, len(keys)) if kind == "threads" else 0
    with _pool(processes) as pool:
        if pool is not None:
            _RENDER_POOLS[os.getpid()] = pool
        try:
            map_tasks(
                render_metatile,
                [{"region": index.region, "grid": index.grid, "key": k} for k in keys],
                lambda _i, meta: on_done(meta),
                flow_name="loc2vec-metatiles",
                run_name=f"{index.region}-{len(keys)}",
                task_name="render-metatile",
                task_run_name="{region}-{key}",
                cfg=cfg,
                kind=kind,
            )
        finally:
            _RENDER_POOLS.pop(os.getpid(), None)


# ---------------------------------------------------------------- embedding


def encode_chunk(
    index: MetatileIndex, model: Encoder, lats: np.ndarray, lons: np.ndarray, batch_size: int, start: int
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and histograms of cells [start, start + len(lats)) of the encoding order (see embed.encode).

    `start` names the task run; `index` travels without its memory maps (metatiles are re-opened here).
    """
    from loc2vec.embed import encode

    return encode(model, index, lats, lons, batch_size, progress=False)


def chunk_bounds(n: int, batch_size: int, batches_per_chunk: int) -> list[tuple[int, int]]:
    """[start, end) of consecutive chunks of whole batches: chunk edges fall on batch edges, so each forward
    pass of a chunk is a forward pass of the one-pass encoding (same tiles, same batch)."""
    step = batch_size * batches_per_chunk
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def encode_cells(
    model: Encoder,
    index: MetatileIndex,
    lats: np.ndarray,
    lons: np.ndarray,
    batch_size: int,
    progress: bool = True,
    kind: RunnerKind | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """embed.encode over the configured runner: chunks of whole batches, assembled in order."""
    import torch
    from tqdm import tqdm

    from loc2vec.channels import N_CHANNELS
    from loc2vec.embed import encode

    cfg = orchestrate_config()
    kind = kind or runner_kind(cfg)
    if kind == "inline":
        return encode(model, index, lats, lons, batch_size, progress)
    n = len(lats)
    bounds = chunk_bounds(n, batch_size, cfg.embed_chunk_batches)
    emb = np.empty((n, model.cfg.embedding_dim), dtype=np.float32)
    hist = np.empty((n, N_CHANNELS), dtype=np.float32)
    bar = tqdm(total=n, desc=f"embed ({kind})", unit="cell", disable=not progress)

    def store(i: int, result: tuple[np.ndarray, np.ndarray]) -> None:
        s, e = bounds[i]
        emb[s:e], hist[s:e] = result
        bar.update(e - s)

    # Converted here, once: embed.encode's own `.to(channels_last)` then finds nothing to change. Done in each
    # task instead, one thread would swap a parameter's storage while another's forward pass reads it.
    model = model.eval().to(memory_format=torch.channels_last)
    with bar:
        map_tasks(
            encode_chunk,
            [
                {
                    "index": index,
                    "model": model,
                    "lats": lats[s:e],
                    "lons": lons[s:e],
                    "batch_size": batch_size,
                    "start": s,
                }
                for s, e in bounds
            ],  # fmt: skip
            store,
            flow_name="loc2vec-embed",
            run_name=f"{index.region}-{n}",
            task_name="encode-chunk",
            task_run_name=index.region + "-{start}",
            cfg=cfg,
            kind=kind,
        )
    return emb, hist
