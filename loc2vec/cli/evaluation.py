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
    if args.suite:
        return cmd_suite(args, project, region)
    if args.inputs:
        from loc2vec.core.errors import ConfigError

        raise ConfigError("--inputs are the added-value suite's: give --suite leakfree|consumer|all")
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


def cmd_suite(args: argparse.Namespace, project: Project, region: str) -> int:
    """`evaluate --suite S`: the added-value suite (evaluation/suite.py) with the given or champion encoder."""
    from loc2vec.evaluation.context import EvaluationContext
    from loc2vec.evaluation.suite import run_suite
    from loc2vec.evaluation.suite_inputs import SuiteInputs

    params = project.params
    ctx = EvaluationContext.from_params(params, project.info)
    encoder, model = None, {}
    if args.suite != "consumer":
        if args.model:
            from loc2vec.training.outputs import load_encoder

            encoder, model = load_encoder(Path(args.model)), {"path": str(Path(args.model).resolve())}
        else:
            from loc2vec.training.registry import load_model, resolve_alias

            ref = resolve_alias(project.paths, params.train.registered_model)
            encoder, model = load_model(project.paths, ref, params.model), {"name": ref.name, "version": ref.version}
    default = project.paths.evaluation(region)
    train = regions(args.train_regions, params, default=[]) or []
    stem = f"{region}.{args.suite}" + (f".from-{'-'.join(train)}" if train else "")
    result = run_suite(
        args.suite,
        region,
        Path(args.out) if args.out else default.with_name(f"{stem}.json"),
        params.evaluate,
        ctx,
        encoder=encoder,
        train_regions=train,
        model=model,
        track=not args.no_track,
        inputs=SuiteInputs.open(Path(args.inputs), region, params.evaluate, ctx) if args.inputs else None,
    )
    print(json.dumps(result["tasks"], indent=1, default=str))
    return 0


def cmd_suite_inputs(args: argparse.Namespace, project: Project) -> int:
    """`suite-inputs`: a region's model-independent suite inputs (the suite_inputs stage)."""
    from loc2vec.evaluation.context import EvaluationContext
    from loc2vec.evaluation.suite_inputs import build_suite_inputs

    params = project.params
    region = one_region(args.region, params)
    out = Path(args.out) if args.out else project.paths.suite_inputs(region)
    ctx = EvaluationContext.from_params(params, project.info)
    manifest = build_suite_inputs(region, out, params.evaluate, ctx, args.suite)
    print(json.dumps({t: m["seconds"] for t, m in manifest["tasks"].items()} | {"seconds": manifest["seconds"]}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("evaluate", help="transport and venue classifiers on loc2vec vs baseline featuresets")
    s.add_argument("--region", required=True, help="the region to test on")
    s.add_argument("--train-regions", help="train the classifiers on these regions (cross-region transfer)")
    s.add_argument("--out", help="metrics JSON (default data/evaluate/REGION.json, REGION.SUITE.json with --suite)")
    s.add_argument(
        "--suite",
        choices=("leakfree", "consumer", "all"),
        help="the added-value suite: leak-free tasks and/or the consumer tasks, baselines, lift (a PNG chart beside)",
    )
    s.add_argument("--model", help="--suite: a model directory (model.pt + model_config.json); default: the champion")
    s.add_argument("--no-track", action="store_true", help="--suite: do not log to MLflow")
    s.add_argument(
        "--inputs",
        help="--suite, in-region: the region's suite inputs (`loc2vec suite-inputs`): only what depends on the model"
        " is computed",
    )
    s.set_defaults(func=cmd_evaluate)
    s = sub.add_parser(
        "suite-inputs",
        help="the suite's model-independent inputs of a region: labels, masked tiles, baselines and their fits, peers",
    )
    s.add_argument("--region", required=True, help="the region")
    s.add_argument("--out", help="the directory to write (default data/suite/REGION)")
    s.add_argument(
        "--suite",
        choices=("leakfree", "consumer", "all"),
        default="all",
        help="the tasks whose inputs are built (default all; evaluate --inputs refuses a suite they lack)",
    )
    s.set_defaults(func=cmd_suite_inputs)
