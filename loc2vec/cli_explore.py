"""CLI commands of the metric-space exploration: `loc2vec explore` and `loc2vec similar`.

Heavy imports (torch, mapnik, faiss, feast) happen inside the commands.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def _coordinate(name: str, limit: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value) or abs(value) > limit:
            raise argparse.ArgumentTypeError(f"{name} must be a finite number in [-{limit:g}, {limit:g}]")
        return value

    return parse


def _regions(values: list[str] | None) -> list[str] | None:
    """--regions a b, or --regions a,b: validated region names (None: every published region)."""
    if not values:
        return None
    from loc2vec.osm import check_region_name

    return [check_region_name(r.strip()) for v in values for r in v.split(",") if r.strip()]


def cmd_explore(args: argparse.Namespace) -> int:
    from loc2vec.explore import build_report

    result = build_report(args.region, Path(args.out), track=not args.no_mlflow, preview=args.preview)
    print(json.dumps(result, indent=1, default=str))
    return 0


def format_table(found: pd.DataFrame) -> str:
    """The neighbours as an aligned text table, the query on the first line."""
    q = found.attrs.get("query", {})
    head = (
        f"query ({q.get('lat', float('nan')):.5f}, {q.get('lon', float('nan')):.5f}) → cell {q.get('h3_cell')} "
        f"{q.get('model_name')} v{q.get('model_version')}; searched {', '.join(q.get('regions', []))}; "
        f"{q.get('excluded_cells', 0)} cells within {q.get('exclude_radius_m', 0):g} m left out"
    )
    lines = [
        head,
        f"{'rank':>4}  {'h3_cell':<15}  {'region':<16} {'lat':>9} {'lon':>10} {'distance':>9} {'km':>7}  model_version",
    ]
    for r in found.itertuples(index=False):
        lines.append(
            f"{r.rank:>4}  {r.h3_cell:<15}  {r.region:<16} {r.lat:>9.5f} {r.lon:>10.5f} {r.distance:>9.4f} "
            f"{r.geo_km:>7.2f}  {r.model_version}"
        )
    return "\n".join(lines)


def cmd_similar(args: argparse.Namespace) -> int:
    from loc2vec.similar import ensure_index, similar

    index = ensure_index(rebuild=args.rebuild_index)
    found = similar(
        args.lat,
        args.lon,
        args.k,
        regions=_regions(args.regions),
        exclude_radius_m=args.exclude_radius_m,
        online_store=args.online_store,
        index=index,
    )
    if args.json:
        rows = json.loads(found.to_json(orient="records", double_precision=6))
        print(json.dumps({"query": found.attrs["query"], "results": rows}))
    else:
        print(format_table(found))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's sub-commands to the `loc2vec` parser."""
    s = sub.add_parser("explore", help="HTML report of a region's embedding space (maps, walks, arithmetic)")
    s.add_argument("--region", required=True)
    s.add_argument("--out", required=True, help="report directory (index.html + PNGs); replaced atomically")
    s.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    s.add_argument(
        "--preview", type=Path, help="also write a PNG of the whole rendered page (headless Chromium), e.g. for docs/"
    )
    s.set_defaults(func=cmd_explore)

    s = sub.add_parser("similar", help="the k published cells with the nearest embeddings, across regions")
    s.add_argument("--lat", type=_coordinate("latitude", 90.0), required=True)
    s.add_argument("--lon", type=_coordinate("longitude", 180.0), required=True)
    s.add_argument("-k", type=int, default=None, help="how many cells (default: params explore.similar.k)")
    s.add_argument("--regions", nargs="+", help="only these published regions (default: all)")
    s.add_argument(
        "--exclude-radius-m",
        type=float,
        default=None,
        help="leave out cells this close to the query (default: params, 200 m = overlapping tiles)",
    )
    s.add_argument("--online-store", choices=["sqlite", "postgres"], help="default: params/LOC2VEC_ONLINE_STORE")
    s.add_argument("--rebuild-index", action="store_true", help="rebuild the vector index even if it is current")
    s.add_argument("--json", action="store_true", help="JSON instead of a table")
    s.set_defaults(func=cmd_similar)
