"""DVC from the flows: the stage graph, one stage at a time, and failures classified for retries.

The flows drive DVC through its command line, as a person would: `dvc dag --dot` gives the stages
(foreach stages expanded for params.yaml's pipeline.regions) and their edges, read into a networkx
DiGraph (with pydot, as DVC writes it; both come with DVC), and each stage runs as
`dvc repro --single-item <stage>`: DVC decides whether it is stale, runs it, and records it in dvc.lock.
Serially: DVC holds a repo lock, so concurrent repros in one repository fail.

A stage runs in a subprocess, so its failure arrives as an exit status and output: the output's tail
decides whether it is transient (loc2vec.orchestration.transient.is_transient_text: the database refused
or dropped a connection, another DVC process held the repo lock) and worth a retry, or deterministic and
final.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import networkx as nx

from loc2vec.core.errors import Loc2VecError
from loc2vec.orchestration.transient import is_transient_text

log = logging.getLogger(__name__)
TAIL_LINES = 60  # output lines kept for the error message and the classification
PROGRESS_EVERY_S = 30.0  # a stage's progress bar reaches the (Prefect) log at most this often


class StageFailed(Loc2VecError, RuntimeError):
    """A DVC stage (or dvc command) failed; `transient` says whether a retry may succeed."""

    def __init__(self, what: str, returncode: int, tail: str, transient: bool):
        self.what, self.returncode, self.tail, self.transient = what, returncode, tail, transient
        kind = "transient failure" if transient else "failed"
        super().__init__(f"{what} {kind} (exit {returncode}):\n{tail}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable with its fields (Prefect stores the exception)
        return (type(self), (self.what, self.returncode, self.tail, self.transient))


def stage_env(api_url: str | None = None) -> dict[str, str]:
    """The environment of stage commands: this interpreter's bin first on PATH (DVC runs `loc2vec …` through
    the shell) and, when known, the Prefect API of the calling flow, so the fan-out inside a stage reports to
    the same server instead of starting an ephemeral one per stage (loc2vec.orchestration.runners, `auto`)."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    if api_url and not env.get("PREFECT_API_URL"):
        env["PREFECT_API_URL"] = api_url
    return env


def dvc_exe() -> str:
    """The dvc next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


def run_dvc(
    args: Sequence[str], root: Path, env: dict[str, str] | None = None, *, what: str | None = None, echo: bool = True
) -> str:
    """Run `dvc ARGS` in root, echoing its output to the log line by line (a stage can run for many minutes);
    returns the output, or raises StageFailed with its tail."""
    cmd = [dvc_exe(), *args]
    what = what or "dvc " + " ".join(args)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    lines: list[str] = []
    # Bytes, not text=True: text mode's universal newlines turn every '\r' of a progress bar into a line.
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    for line in output_lines(proc.stdout):
        lines.append(line)
        tail.append(line)
        if echo:
            _logger().info("%s", line)
    code = proc.wait()
    if code != 0:
        text = "\n".join(tail)
        raise StageFailed(what, code, text, is_transient_text(text))
    return "\n".join(lines)


def output_lines(
    stream: BinaryIO, progress_every_s: float = PROGRESS_EVERY_S, clock: Callable[[], float] = time.monotonic
) -> Iterator[str]:
    """A command's output as a log wants it: every line ended by a newline, and of the carriage-return
    redraws of a progress bar (tqdm rewrites its line several times a second) one every progress_every_s
    at most; the bar's final state, ended by its newline, is always kept. Blank lines are dropped."""
    buffer = b""
    last_progress = -math.inf
    while chunk := stream.read1(65536):
        buffer += chunk
        # A '\r' ends a redraw unless a '\n' follows (CRLF); one ending the chunk waits for the next byte.
        *segments, buffer = re.split(rb"(\r\n|\n|\r(?=[^\n]))", buffer)
        for text, end in zip(segments[::2], segments[1::2], strict=True):
            line = text.decode(errors="replace").rstrip()
            if not line:
                continue
            if end == b"\r":  # a redraw: the bar's line so far, overwritten by the next one
                now = clock()
                if now - last_progress < progress_every_s:
                    continue
                last_progress = now
            yield line
    redraws = [part for part in buffer.split(b"\r") if part.strip()]
    if redraws:  # output not ended by a newline: its last state
        yield redraws[-1].decode(errors="replace").rstrip()


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task run (shown in the UI), else this module's."""
    try:
        from prefect import get_run_logger
        from prefect.exceptions import MissingContextError

        try:
            return get_run_logger()
        except MissingContextError:
            return log
    except ImportError:  # pragma: no cover
        return log


# ---------------------------------------------------------------- the stage graph


class StageGraph:
    """The DVC stages (nodes, in dvc.yaml order: foreach items in params order) and their dependencies
    (an edge a → b: b depends on a), as `dvc dag --dot` writes them."""

    def __init__(self, graph: nx.DiGraph):
        self.graph = graph

    @classmethod
    def from_dot(cls, dot: str) -> StageGraph:
        import pydot

        with warnings.catch_warnings():  # pydot's grammar uses pyparsing names pyparsing now calls deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            parsed = pydot.graph_from_dot_data(dot) if dot.strip() else None
        if not parsed:
            raise Loc2VecError(f"`dvc dag --dot` gave no readable graph:\n{dot[:500]}")
        return cls(nx.DiGraph(nx.nx_pydot.from_pydot(parsed[0])))  # nodes in the order the dot lists them

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(self.graph)

    def deps(self, stage: str) -> set[str]:
        """The stages `stage` depends on directly."""
        return set(self.graph.predecessors(stage))

    def topological(self) -> list[str]:
        """Every stage after the stages it depends on; ties in dvc.yaml order (stable, readable)."""
        rank = {s: i for i, s in enumerate(self.graph)}
        try:
            return list(nx.lexicographical_topological_sort(self.graph, key=rank.__getitem__))
        except nx.NetworkXUnfeasible:
            edges = nx.find_cycle(self.graph)
            cycle = " → ".join([a for a, _ in edges] + [edges[0][0]])
            raise Loc2VecError(f"the DVC stages depend on each other in a cycle: {cycle}") from None

    def descendants(self, names: Iterable[str]) -> set[str]:
        """The stages and every stage that depends on them, directly or not."""
        out = set(names)
        for name in list(out):
            out |= nx.descendants(self.graph, name)
        return out

    def resolve(self, name: str) -> set[str]:
        """A stage name ("embed@liechtenstein") or a base name ("embed": every embed@<region>)."""
        if name in self.graph:
            return {name}
        hits = {s for s in self.stages if s.split("@", 1)[0] == name}
        if not hits:
            raise Loc2VecError(f"no DVC stage {name!r}; stages: {', '.join(self.stages)}")
        return hits

    def select(self, stages: Sequence[str] | None = None, from_stage: str | None = None) -> list[str]:
        """The stages to run, in dependency order: `stages` (names or base names) and/or `from_stage` and
        everything downstream of it (like `dvc repro --downstream`); all when neither is given."""
        chosen = set(self.stages)
        if from_stage:
            chosen &= self.descendants(self.resolve(from_stage))
        if stages:
            chosen &= set().union(*(self.resolve(s) for s in stages))
        return [s for s in self.topological() if s in chosen]


def stage_graph(root: Path, env: dict[str, str] | None = None) -> StageGraph:
    """The pipeline's stages now (after any params change: foreach expands pipeline.regions)."""
    graph = StageGraph.from_dot(run_dvc(["dag", "--dot"], root, env, echo=False))
    if not graph.stages:
        raise Loc2VecError(f"`dvc dag` found no stages in {root}")
    return graph


# ---------------------------------------------------------------- one stage


def repro_stage(stage: str, root: Path, env: dict[str, str], *, force: bool = False) -> dict[str, Any]:
    """`dvc repro --single-item STAGE` (DVC skips it when nothing it depends on changed)."""
    started = time.perf_counter()
    args = ["repro", "--single-item", stage] + (["--force"] if force else [])
    out = run_dvc(args, root, env, what=f"stage {stage}")
    ran = bool(re.search(r"^Running stage ", out, re.MULTILINE))
    return {"stage": stage, "ran": ran, "seconds": round(time.perf_counter() - started, 1)}
