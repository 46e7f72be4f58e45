"""`loc2vec explore`: an HTML report of a region's embedding space."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loc2vec.cli.args import one_region
from loc2vec.cli.project import Project


def cmd_explore(args: argparse.Namespace, project: Project) -> int:
    from loc2vec.explore.report import ReportInputs, build_report

    params = project.params
    region = one_region(args.region, params)
    inputs = ReportInputs(
        embeddings=project.paths.embeddings(region),
        render=params.render,
        labels=params.evaluate.labels,
        info=project.info,
        paths=project.paths,
    )
    result = build_report(
        region, Path(args.out), params.explore, inputs, track=not args.no_mlflow, preview=args.preview
    )
    print(json.dumps(result, indent=1, default=str))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("explore", help="HTML report of a region's embedding space (maps, walks, arithmetic)")
    s.add_argument("--region", required=True)
    s.add_argument("--out", required=True, help="report directory (index.html + PNGs); replaced atomically")
    s.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    s.add_argument(
        "--preview", type=Path, help="also write a PNG of the whole rendered page (headless Chromium), e.g. for docs/"
    )
    s.set_defaults(func=cmd_explore)
