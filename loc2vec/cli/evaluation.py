"""`loc2vec evaluate`: transport and venue classifiers on loc2vec vs the baselines (the `evaluate` stage)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loc2vec.cli.args import one_region, regions
from loc2vec.cli.project import Project


def cmd_evaluate(args: argparse.Namespace, project: Project) -> int:
    from loc2vec.evaluation.context import EvaluationContext
    from loc2vec.evaluation.run import evaluate

    params = project.params
    region = one_region(args.region, params)
    result = evaluate(
        region,
        Path(args.out) if args.out else project.paths.evaluation(region),
        params.evaluate,
        EvaluationContext.from_params(params, project.info),
        train_regions=regions(args.train_regions, params, default=[]) or None,
        registered_model=params.train.registered_model,
    )
    print(json.dumps(result.get("tasks", result), indent=1, default=str))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("evaluate", help="transport and venue classifiers on loc2vec vs baseline featuresets")
    s.add_argument("--region", required=True, help="the region to test on")
    s.add_argument("--train-regions", help="train the classifiers on these regions (cross-region transfer)")
    s.add_argument("--out", help="metrics JSON (default data/evaluate/REGION.json)")
    s.set_defaults(func=cmd_evaluate)
