"""Which failures are worth retrying: a database connection refused or dropped, DVC's repo lock held.

Anything else (bad configuration, a checksum mismatch, a bug) fails at once. Matched on the exception
chain, or on a subprocess's output text: a stage run by DVC reports only through its output.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from loc2vec.core.config import OrchestrateConfig
from loc2vec.core.errors import ConfigError

log = logging.getLogger(__name__)

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
        log.info(
            "%s failed (%s: %s): %s",
            task_run.name,
            type(exc).__name__,
            str(exc)[:200],
            "transient, retrying" if transient else "not transient, no retry",
        )
        return transient
    return False


def retry_delays(cfg: OrchestrateConfig) -> list[float]:
    """Exponential backoff, as `prefect.tasks.exponential_backoff` computes it."""
    from prefect.tasks import exponential_backoff

    return exponential_backoff(backoff_factor=cfg.retry_backoff_s)(cfg.retries) if cfg.retries else []


def retry_options(cfg: OrchestrateConfig) -> dict[str, Any]:
    """Task options: `cfg.retries` retries of transient failures, exponential backoff with jitter."""
    return {
        "retries": cfg.retries,
        "retry_delay_seconds": retry_delays(cfg) or 0,
        "retry_jitter_factor": cfg.retry_jitter_factor if cfg.retries else None,
        "retry_condition_fn": retry_transient,
    }
