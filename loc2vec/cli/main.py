"""The `loc2vec` command line: one entry point, one sub-command per pipeline stage and tool.

params.yaml is loaded here, once, into a `Project` (cli/project.py) whose parts every command passes
down. Heavy libraries (torch, mapnik, feast) are imported inside the commands that need them, so
`loc2vec --help` and light commands start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

from loc2vec import __version__

log = logging.getLogger("loc2vec")
# Libraries whose INFO lines are not news for a loc2vec user (-v shows them).
QUIET_LOGGERS = ("httpx", "httpcore", "urllib3", "feast", "mlflow", "alembic", "prefect", "distributed", "faiss")


def build_parser() -> argparse.ArgumentParser:
    from loc2vec.cli import bench, embedding, evaluation, explore, flows, osm, raster, sampling, serving, training

    p = argparse.ArgumentParser(prog="loc2vec", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"loc2vec {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, third-party INFO lines too")
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure (default: one line)")
    p.add_argument("--params", help="params.yaml to use (default: $LOC2VEC_PARAMS, else the project root's)")
    sub = p.add_subparsers(dest="command", required=True)
    for module in (osm, raster, sampling, training, embedding, serving, evaluation, explore, flows, bench):
        module.register(sub)
    return p


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; as a program (argv None) under tcmalloc (cli/allocator.py). Returns the exit status."""
    if argv is None:
        from loc2vec.cli.allocator import reexec_under_tcmalloc

        reexec_under_tcmalloc(sys.argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from loc2vec.cli.errors import report
    from loc2vec.cli.project import Project
    from loc2vec.core.numerics import pin_cpu_numerics, resolve_cpu_bf16

    try:
        if args.params:  # DDP workers and other subprocesses read the same file
            import os

            from loc2vec.core.config import PARAMS_ENV

            os.environ[PARAMS_ENV] = str(args.params)
        project = Project.load(args.params)
        # train.cpu_bf16 / embed.cpu_bf16: auto, resolved for this machine by the command that uses it (it may lift
        # our own ISA pin)
        embeds = args.command == "embed" or (args.command == "bench" and args.what == "embed")
        section: Literal["train", "embed"] | None = "train" if args.command == "train" else "embed" if embeds else None
        if section is not None:
            project = replace(project, params=resolve_cpu_bf16(project.params, section=section, lift_own_pin=True))
        pin_cpu_numerics(project.params.compute)  # before torch or numpy is imported
        return int(args.func(args, project) or 0)
    except (Exception, KeyboardInterrupt) as exc:
        if args.debug:
            raise
        return report(args.command, exc)


if __name__ == "__main__":
    sys.exit(main())
