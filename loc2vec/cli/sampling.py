"""`loc2vec sample`: training locations (the `sample` stage)."""

from __future__ import annotations

import argparse
from pathlib import Path

from loc2vec.cli.args import regions
from loc2vec.cli.project import Project
from loc2vec.core.errors import ConfigError


def cmd_sample(args: argparse.Namespace, project: Project) -> int:
    from loc2vec.sampling.samples import write_samples

    params = project.params
    names = regions(args.region, params)
    if args.out and len(names) != 1:
        raise ConfigError("--out needs exactly one --region")
    for region in names:
        out = Path(args.out) if args.out else project.paths.samples(region)
        print(write_samples(region, out, params.sample, render=params.render, info=project.info))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sample", help="draw training locations of a region (Parquet)")
    s.add_argument("--region", help="region or comma-separated regions (default: params pipeline.regions)")
    s.add_argument("--out", help="output Parquet (default data/samples/REGION.parquet)")
    s.set_defaults(func=cmd_sample)
