"""`loc2vec flow pipeline | refresh | publish | serve`: the Prefect flows (top-level flows/ of the checkout).

The flows run the DVC pipeline of a checkout, so they live beside dvc.yaml, not in the installed package;
deployments import them from there too (prefect.yaml, flows/deployments.py). `pipeline`, `refresh` and
`publish` run one flow now; `serve` registers the deployments (weekly refresh, daily publish, on-demand
pipeline) with the Prefect API of PREFECT_API_URL and runs their schedules until stopped. Like every
command, a flow loads params.yaml itself when it starts (a deployment's run has no command line around it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from loc2vec.cli.args import split_regions
from loc2vec.cli.project import Project
from loc2vec.core.config import PARAMS_ENV
from loc2vec.core.errors import Loc2VecError

CHECKOUT = Path(__file__).resolve().parents[2]


def _flows_importable() -> None:
    if not (CHECKOUT / "flows" / "pipeline.py").is_file():
        raise Loc2VecError(
            f"the Prefect flows are part of a loc2vec checkout (flows/ beside dvc.yaml), not in {CHECKOUT}"
        )
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))


def _serve(project: Project) -> None:
    """Serve the deployments; their runs (subprocesses) import flows/ from the checkout and read this project."""
    from flows.deployments import serve_deployments

    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(CHECKOUT) + (os.pathsep + path if path else "")
    os.environ.setdefault(PARAMS_ENV, str(project.paths.params_file))
    os.chdir(CHECKOUT)
    serve_deployments(project.params)


def cmd_flow(args: argparse.Namespace, project: Project) -> int:
    _flows_importable()
    if args.flow == "pipeline":
        from flows.pipeline import pipeline, print_report

        summary = pipeline(
            regions=split_regions(args.regions) or None,
            stages=split_regions(args.stages) or None,
            from_stage=args.from_stage,
            force=args.force,
            push=args.push,
        )
        print_report(summary, project, lookup=not args.no_lookup)
    elif args.flow == "refresh":
        from flows.refresh import refresh_osm

        result = refresh_osm(
            region=args.region,
            source=args.source,
            sha256=args.sha256,
            run_pipeline=not args.no_pipeline,
            push=not args.no_push,
            git_commit=args.git_commit,
        )
        print(json.dumps({k: v for k, v in result.items() if k != "pipeline"}, indent=1, default=str))
    elif args.flow == "publish":
        from flows.publish import publish

        print(json.dumps(publish(online_store=args.online_store), indent=1, default=str))
    else:
        _serve(project)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("flow", help="run a Prefect flow: pipeline (make run), refresh (refresh_osm) or publish; serve")
    flows = s.add_subparsers(dest="flow", required=True)

    f = flows.add_parser("pipeline", help="every DVC stage as a Prefect task, then the summary and one lookup")
    f.add_argument("--regions", help="comma-separated regions; written to params.yaml pipeline.regions")
    f.add_argument("--stages", help="comma-separated stages or base names (embed = every embed@R)")
    f.add_argument("--from-stage", help="this stage and everything downstream of it")
    f.add_argument("--force", action="store_true", help="run the selected stages even if DVC finds them unchanged")
    f.add_argument("--push", action="store_true", help="dvc push the outputs at the end")
    f.add_argument("--no-lookup", action="store_true", help="skip the example online feature lookup")
    f.set_defaults(func=cmd_flow)

    f = flows.add_parser("refresh", help="fetch and verify a new extract, version it, re-run the pipeline if changed")
    f.add_argument("--region", help="default: params.yaml regions.default")
    f.add_argument("--source", help="URL or path of the new extract (default: the registered source)")
    f.add_argument("--sha256", help="its sha256 (required for a new source)")
    f.add_argument("--no-pipeline", action="store_true", help="do not run the pipeline even if the data changed")
    f.add_argument("--no-push", action="store_true", help="do not dvc push the extract")
    f.add_argument("--git-commit", action="store_true", help="commit params.yaml and dvc.lock when they changed")
    f.set_defaults(func=cmd_flow)

    f = flows.add_parser("publish", help="Feast materialize-incremental only (the daily schedule)")
    f.add_argument("--online-store", choices=["sqlite", "postgres"], help="default: params/LOC2VEC_ONLINE_STORE")
    f.set_defaults(func=cmd_flow)

    f = flows.add_parser(
        "serve", help="serve the deployments (weekly refresh, daily publish, on-demand pipeline) on PREFECT_API_URL"
    )
    f.set_defaults(func=cmd_flow)
