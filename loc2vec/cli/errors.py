"""How the command line reports a failure: one line for what the user can fix, a traceback only for bugs.

Expected failures are the ones a user causes or can fix — configuration (`ConfigError`), input and state
(`Loc2VecError`), files and directories (`OSError`: a missing file, an unwritable `--out`), the database
(`psycopg2.Error`) and the validators' `ValueError`s. Each becomes one line on stderr that names the key,
path or value, with exit status 2, like argparse's own errors. Anything else is a bug: one line that says
so and how to see more (exit 1); `--debug` shows the traceback of every failure.
"""

from __future__ import annotations

import sys
from typing import TextIO

from loc2vec.core.errors import Loc2VecError

EXIT_EXPECTED = 2  # argparse's status for a usage error
EXIT_UNEXPECTED = 1
EXIT_INTERRUPTED = 130


def one_line(text: str) -> str:
    """A possibly multi-line message on one line (its lines joined by ' | ')."""
    return " | ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def _os_error(exc: OSError) -> str:
    """`strerror: path` (and the second path of a rename), e.g. `Permission denied: /data/out.npy`."""
    what = exc.strerror or type(exc).__name__
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    return f"{what}: {' → '.join(str(p) for p in paths)}" if paths else one_line(str(exc) or what)


def describe_expected(exc: BaseException) -> str | None:
    """The one-line message of an expected failure, or None when `exc` is unexpected (a bug)."""
    if isinstance(exc, Loc2VecError):
        return one_line(str(exc))
    if isinstance(exc, OSError):
        return _os_error(exc)
    psycopg2 = sys.modules.get("psycopg2")  # imported by whoever talked to the database
    if psycopg2 is not None and isinstance(exc, psycopg2.Error):
        return f"database error: {one_line(str(exc)) or type(exc).__name__}"
    if isinstance(exc, ValueError):
        return one_line(str(exc)) or type(exc).__name__
    return None


def report(command: str, exc: BaseException, stream: TextIO | None = None) -> int:
    """Print the failure of `loc2vec COMMAND` on one line; returns the exit status."""
    stream = stream or sys.stderr
    if isinstance(exc, KeyboardInterrupt):
        print(f"loc2vec {command}: interrupted", file=stream)
        return EXIT_INTERRUPTED
    message = describe_expected(exc)
    if message is not None:
        print(f"loc2vec {command}: error: {message}", file=stream)
        return EXIT_EXPECTED
    print(
        f"loc2vec {command}: unexpected error (a bug): {type(exc).__name__}: {one_line(str(exc))} "
        "(run again with --debug for the traceback)",
        file=stream,
    )
    return EXIT_UNEXPECTED
