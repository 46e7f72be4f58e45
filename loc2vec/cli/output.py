"""Machine-readable output: a command's result is the only thing on stdout.

`loc2vec publish | jq` used to break: Feast prints its own lines (and progress) with `print`, ahead of
the JSON. Commands whose stdout is data run their work with `sys.stdout` pointed at stderr, and write the
result to the real stdout they are handed.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TextIO


@contextlib.contextmanager
def result_stream() -> Iterator[TextIO]:
    """Yield the real stdout; inside the block, everything printed to sys.stdout goes to stderr."""
    real = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        yield real
