"""`loc2vec train | promote`: the encoder and the champion gate (the `train` stage)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loc2vec.cli.args import regions
from loc2vec.cli.project import Project


def cmd_train(args: argparse.Namespace, project: Project) -> int:
    from loc2vec.training import distributed

    params = project.params
    names = regions(args.regions, params)
    nproc = args.nproc or params.train.nproc
    if nproc > 1 and not distributed.under_launcher():  # re-run this command as nproc DDP processes
        argv = ["-v"] if args.verbose else []
        argv += ["train", "--regions", ",".join(names)]
        for flag, value in (("--samples", args.samples), ("--metatiles", args.metatiles), ("--out", args.out)):
            if value:
                argv += [flag, str(value)]
        argv += ["--no-resume"] if args.no_resume else []
        argv += ["--no-mlflow"] if args.no_mlflow else []
        return distributed.launch(nproc, argv)
    from loc2vec.training.trainer import Trainer, train

    paths = project.paths.overriding(
        samples={r: Path(args.samples) / f"{r}.parquet" for r in names} if args.samples else None,
        metatiles={r: Path(args.metatiles) / r for r in names} if args.metatiles else None,
    )
    trainer = Trainer.from_params(
        params, names, project.info, paths=paths, out_dir=Path(args.out) if args.out else None
    )
    summary = train(trainer, resume=not args.no_resume, track=not args.no_mlflow, paths=paths)
    if "rank" not in summary:  # DDP ranks other than 0 print nothing
        print(json.dumps(summary, indent=1))
    return 0


def cmd_promote(args: argparse.Namespace, project: Project) -> int:
    from loc2vec.evaluation.context import EvaluationContext
    from loc2vec.evaluation.gate import promote

    params = project.params
    result = promote(
        regions(args.regions, params),
        Path(args.out) if args.out else project.paths.promotion,
        model_name=params.train.registered_model,
        cfg=params.promote,
        evaluate_cfg=params.evaluate,
        ctx=EvaluationContext.from_params(params, project.info),
    )
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_tasks")}, indent=1))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("train", help="train the encoder (MLflow-tracked, resumable)")
    s.add_argument("--regions", help="comma-separated regions (default: params pipeline.regions)")
    s.add_argument("--samples", help="directory of the regions' samples, REGION.parquet (default data/samples)")
    s.add_argument("--metatiles", help="directory of the regions' metatile directories (default data/metatiles)")
    s.add_argument("--out", help="model directory (default data/model)")
    s.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    s.add_argument("--no-mlflow", action="store_true", help="do not track in MLflow")
    s.add_argument("--nproc", type=int, help="DDP processes via torchrun (default: params train.nproc)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("promote", help="champion gate: score the newest model vs the champion downstream")
    s.add_argument("--regions", help="comma-separated regions (default: params pipeline.regions)")
    s.add_argument("--out", help="the decision as JSON (default data/model/promotion.json)")
    s.set_defaults(func=cmd_promote)
