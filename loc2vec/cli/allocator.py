"""Run the command under tcmalloc: glibc's malloc maps and unmaps every large tensor afresh.

Measured on these machines (shared/STACK-NOTES.md, `loc2vec bench train`): with glibc's default malloc a
CPU training step page-faults its activations anew and a third of the machine's time goes to the kernel
(3,575 ms/step, 21 s of system time in a 29 s run); under tcmalloc the same step takes 1,731 ms with 1.4 s
of system time. The allocator has to be chosen before the Python process starts, so `loc2vec` started as
a program re-executes itself once with tcmalloc preloaded (Debian's libtcmalloc-minimal4, installed by
`make setup`); every process it starts — DVC stage commands, spawned Mapnik workers, torchrun's DDP
workers — inherits LD_PRELOAD. The Makefile sets it for `make test`, `make run` and `make repro` too.

Lookups (`features`, `services`) compute nothing and are not re-executed: a second interpreter start is
~0.1 s of a lookup that should take well under a second.

Set LOC2VEC_ALLOCATOR=system to keep glibc's allocator (e.g. to measure the difference). Nothing changes
numerically: an allocator decides where memory lives, not what is computed.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

ALLOCATOR_ENV = "LOC2VEC_ALLOCATOR"
LOOKUP_COMMANDS = frozenset({"features", "services"})  # what runs as is: no tensors, nothing to gain
LIBRARY_GLOBS = ("/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")


def tcmalloc_path() -> str | None:
    """The installed tcmalloc library, or None."""
    for pattern in LIBRARY_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def preloaded() -> bool:
    """Whether this process runs under tcmalloc already."""
    return "tcmalloc" in os.environ.get("LD_PRELOAD", "")


def command_of(argv: list[str]) -> str | None:
    """The sub-command an argument list runs (the first word that is not an option or --params' value)."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--params":
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


# The second interpreter's program: this package's CLI as `python -m loc2vec.cli` runs it, found at argv[1].
_RUN_CLI = (
    "import runpy, sys; sys.path.insert(0, sys.argv.pop(1));"
    " runpy.run_module('loc2vec.cli', run_name='__main__', alter_sys=True)"
)


def reexec_under_tcmalloc(argv: list[str]) -> None:
    """Replace this process by this package's CLI on ARGV with tcmalloc preloaded, when it is installed,
    not loaded yet, not declined (LOC2VEC_ALLOCATOR=system) and the command computes (not a lookup);
    otherwise return and run as is."""
    if os.environ.get(ALLOCATOR_ENV, "tcmalloc") == "system" or preloaded() or command_of(argv) in LOOKUP_COMMANDS:
        return
    library = tcmalloc_path()
    if library is None:  # not installed (`make setup` installs it): glibc's malloc, slower on CPU training
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    # Not `python -m loc2vec.cli`: -m puts the working directory first on sys.path, so run from inside another
    # checkout (or any folder holding a loc2vec/) the second interpreter would import that code instead of this.
    # -P adds no such entry; the folder holding the package this process runs goes first.
    package_parent = str(Path(__file__).resolve().parents[2])
    os.execve(sys.executable, [sys.executable, "-P", "-c", _RUN_CLI, package_parent, *argv], env)
