"""The concurrency guard: an OS file lock held for a flow's whole run.

Two runs that write the same outputs (two pipelines, a refresh and a pipeline, two publishes) must never
overlap, whoever started them: a schedule, `make run`, or someone at a terminal. Prefect's deployment
concurrency limits only see runs of one deployment through one server, so the guard is an `fcntl.flock`
on the project's data/.locks/<name>.lock (`paths.lock(name)`, loc2vec.core.paths): the kernel drops it
when the holder exits, however it dies (no stale locks), and it works for any process on the machine. The lock file holds who has it (pid, flow run, since), so a
waiting or refused run can say so.

Re-entrant within one call chain (a ContextVar, so a subflow inherits it): refresh_osm holds the pipeline
lock and runs the pipeline flow as a subflow, which takes it again without deadlocking on itself.

(loc2vec.core.atomic.file_lock is the library's lock for writers of one directory: it waits as long as it
takes and says nothing; a flow's lock needs a bounded wait and the holder's name in its error.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path

from loc2vec.core.errors import Loc2VecError

log = logging.getLogger(__name__)
_HELD: ContextVar[frozenset[Path]] = ContextVar("loc2vec_flow_locks", default=frozenset())
POLL_S = 1.0


class LockBusy(Loc2VecError, RuntimeError):
    """Another run holds the lock (and the wait, if any, ran out)."""


def holder(path: Path) -> str:
    """Who holds a lock, as its holder wrote it (best effort: for messages only)."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "unknown holder"
    if not info:
        return "unknown holder"
    run = f", flow run {info['flow_run']}" if info.get("flow_run") else ""
    return f"pid {info.get('pid')} on {info.get('host')}{run}, since {info.get('since')}"


def _flow_run_label() -> str | None:
    try:
        from prefect.context import FlowRunContext
    except ImportError:  # pragma: no cover - prefect is a dependency
        return None
    ctx = FlowRunContext.get()
    return f"{ctx.flow_run.name} ({ctx.flow_run.id})" if ctx and ctx.flow_run else None


@contextlib.contextmanager
def exclusive(lock: Path, *, timeout_s: float | None = None) -> Iterator[Path]:
    """Hold the lock file `lock` (a project's `paths.lock(name)`) for the block.

    timeout_s: None or < 0 waits as long as it takes; 0 fails at once if the lock is busy; > 0 waits
    that long, then fails. A failure is a LockBusy naming the holder.
    """
    held = _HELD.get()
    path = Path(lock).resolve()
    if path in held:  # this call chain holds it already (a subflow of the holder)
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = None if timeout_s is None or timeout_s < 0 else time.monotonic() + timeout_s
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if deadline is not None and time.monotonic() >= deadline:
                raise LockBusy(
                    f"another run holds {path} ({holder(path)}); waited {timeout_s:g} s "
                    "(orchestrate.lock_timeout_s). It ends by itself; if its process is gone, the lock is free."
                )
            if not announced:
                log.warning("waiting for %s, held by %s", path, holder(path))
                announced = True
            time.sleep(POLL_S if deadline is None else max(0.05, min(POLL_S, deadline - time.monotonic())))
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "flow_run": _flow_run_label(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        token = _HELD.set(held | {path})
        try:
            yield path
        finally:
            _HELD.reset(token)
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
