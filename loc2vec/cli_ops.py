"""CLI commands of the orchestration layer: champion promotion, params and pipeline runs."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's sub-commands to the `loc2vec` parser."""
    s = sub.add_parser("promote", help="champion gate: score the newest model vs the champion downstream")
    s.add_argument("--regions", help="comma-separated regions (default: params.yaml pipeline.regions)")
    s.set_defaults(func=cmd_promote)


def cmd_promote(args: argparse.Namespace) -> int:
    from loc2vec.promote import promote

    regions = [r.strip() for r in args.regions.split(",") if r.strip()] if args.regions else None
    result = promote(regions)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_tasks")}, indent=1))
    return 0
