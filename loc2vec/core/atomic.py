"""Atomic writes and file locks: readers see the old file (or directory) or the new one, never half of one.

Every output of the pipeline goes through here: write to a temporary sibling, then
`os.replace` it into place (a rename within one filesystem is atomic).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> Path:
    """Write a text file atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def save_npy(path: Path, array: np.ndarray) -> Path:
    """Write a .npy file atomically; returns the path."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)
    return path


def swap_dir(tmp: Path, out: Path) -> None:
    """Replace directory `out` by the finished directory `tmp`; the old one goes only after."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on path (created with its directory) for the block; waits for the holder.

    For writers of one shared directory in several processes (publish, metatiles, similar indexes).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
