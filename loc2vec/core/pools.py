"""Process pools for work that does not scale with threads (Mapnik rendering).

Spawned, never forked: a parent that already runs torch, Feast or Mapnik threads cannot be forked
safely (seen: forked workers dying in a loop and the pool hanging after other tests had run). Spawned
workers get their settings through the initializer's arguments (configuration objects and connection
settings are picklable), build their own renderer once, and cost ~2 s of start-up.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.pool
import os
from collections.abc import Callable, Iterator
from typing import Any


def worker_count(configured: int, tasks: int | None = None) -> int:
    """`configured` processes (0 = one per core), never more than there are tasks."""
    n = configured or os.cpu_count() or 1
    return max(1, min(n, tasks)) if tasks is not None else n


@contextlib.contextmanager
def spawn_pool(
    workers: int, initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = ()
) -> Iterator[multiprocessing.pool.Pool | None]:
    """A spawned pool of `workers` processes, or None when one process is enough (work runs in-process)."""
    if workers <= 1:
        yield None
        return
    with multiprocessing.get_context("spawn").Pool(workers, initializer=initializer, initargs=initargs) as pool:
        yield pool
