"""One Prefect test server for the whole session, shared by the modules that run flows.

`prefect_test_harness` starts a server on a temporary SQLite database; a fresh PREFECT_HOME's first
start can take a minute (shared/STACK-NOTES.md), hence the generous timeout. Test modules import the
fixture (`from .prefect_harness import prefect_harness`); pytest then makes one fixture per module, so
the harness itself is started once and kept in this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest

STARTUP_TIMEOUT_S = 240
_STACK: ExitStack | None = None


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    global _STACK
    owner = _STACK is None
    if owner:
        from prefect.testing.utilities import prefect_test_harness

        _STACK = ExitStack()
        _STACK.enter_context(prefect_test_harness(server_startup_timeout=STARTUP_TIMEOUT_S))
    yield
    if owner and _STACK is not None:
        _STACK.close()
        _STACK = None
