"""`loc2vec publish | features | similar`: the feature store and its consumers (the `publish` stage)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from loc2vec.cli.args import add_location, regions
from loc2vec.cli.output import result_stream
from loc2vec.cli.project import Project

if TYPE_CHECKING:
    import pandas as pd

    from loc2vec.serving.store import StoreSettings

STORE_CHOICES = ["sqlite", "postgres", "redis"]


def store_settings(project: Project, kind: str | None) -> StoreSettings:
    from loc2vec.serving.store import StoreSettings

    params = project.params
    return StoreSettings.from_config(
        params.publish, params.embed, project.paths, project.info, kind, reader=project.reader
    )


def cmd_publish(args: argparse.Namespace, project: Project) -> int:
    from loc2vec.serving.publish import materialize_incremental_only, publish, published_record

    settings = store_settings(project, args.online_store)
    files: list[Path] | None = None
    with result_stream() as out:
        if args.incremental:
            result = materialize_incremental_only(settings)
        else:
            if args.embeddings:
                files = [Path(f) for f in args.embeddings]
            elif args.regions:
                files = [project.paths.embeddings(r) for r in regions(args.regions, project.params)]
            else:
                files = None  # every data/embeddings/*.parquet
            result = publish(settings, files, force=args.force)
        if args.record:  # the stage's DVC output: what is served, never how long it took
            from loc2vec.core.atomic import write_text

            record = published_record(settings, None if args.incremental else files)
            write_text(Path(args.record), json.dumps(record, indent=1, default=str) + "\n")
        print(json.dumps(result, indent=1, default=str), file=out)
    return 0


def cmd_pyfunc(args: argparse.Namespace, project: Project) -> int:
    """Log the lookup pyfunc of a version (default: the champion's) to the project's MLflow store."""
    from loc2vec.core.tracking import setup_mlflow
    from loc2vec.serving.pyfunc import log_pyfunc
    from loc2vec.training.registry import resolve_alias

    settings = store_settings(project, args.online_store)
    version = args.version or resolve_alias(project.paths, project.params.train.registered_model).version
    mlflow = setup_mlflow("loc2vec-pyfunc", project.paths)
    with mlflow.start_run(run_name=f"location embeddings v{version} ({settings.kind})"):
        info = log_pyfunc(settings, project.params.db, version)
    print(json.dumps({"model_uri": info.model_uri, "version": version, "online_store": settings.kind}))
    return 0


def cmd_features(args: argparse.Namespace, project: Project) -> int:
    from loc2vec.serving.lookup import lookup_locations

    if (args.csv is None) == (args.lat is None or args.lon is None):
        from loc2vec.core.errors import Loc2VecError

        raise Loc2VecError("give either --lat and --lon, or --csv FILE")
    settings = store_settings(project, args.online_store)
    with result_stream() as out:
        if args.csv:
            import csv

            lats, lons = read_points(Path(args.csv))
            found = lookup_locations(lats, lons, settings, version=args.version)
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(found.COLUMNS)
            for row in found.rows():
                writer.writerow([json.dumps(v) if k == "embedding" else v for k, v in row.items()])
            return 0
        row = lookup_locations([args.lat], [args.lon], settings, version=args.version).rows()[0]
        print(json.dumps(row, default=str), file=out)
    return 0


def read_points(path: Path) -> tuple[list[float], list[float]]:
    """The lat and lon columns of a CSV file (a header row naming them; other columns are ignored).

    Raises:
        Loc2VecError: the file is missing, unreadable, or lacks a lat or lon column.
    """
    import csv

    from loc2vec.core.errors import Loc2VecError

    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise Loc2VecError(f"--csv {path}: {exc}") from None
    if not rows or not {"lat", "lon"} <= set(rows[0]):
        raise Loc2VecError(f"--csv {path}: expected a header with columns lat and lon and at least one row")
    try:
        return [float(r["lat"]) for r in rows], [float(r["lon"]) for r in rows]
    except (TypeError, ValueError) as exc:
        raise Loc2VecError(f"--csv {path}: {exc}") from None


def cmd_services(args: argparse.Namespace, project: Project) -> int:
    from loc2vec.serving.catalog import services
    from loc2vec.serving.store import feature_store

    found = services(feature_store(store_settings(project, args.online_store)))
    with result_stream() as out:
        if args.json:
            print(json.dumps(found, indent=1), file=out)
        else:
            for s in found:
                pinned = f"model version {s['model_version']}" if s["model_version"] else "latest (exploration only)"
                print(f"{s['name']:<24} {pinned}", file=out)
    return 0


def cmd_serve(args: argparse.Namespace, project: Project) -> int:
    from loc2vec.serving.server import serve

    cfg = project.params.serve
    serve(
        store_settings(project, args.online_store),
        args.port or cfg.port,
        registry_ttl_s=cfg.registry_ttl_s,
        workers=cfg.workers,
    )
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


def cmd_similar(args: argparse.Namespace, project: Project) -> int:
    from loc2vec.serving.similar import similar
    from loc2vec.serving.similar_index import ensure_index

    params = project.params
    with result_stream() as out:
        index = ensure_index(params.explore.similar, project.paths, rebuild=args.rebuild_index)
        found = similar(
            args.lat,
            args.lon,
            index,
            store_settings(project, args.online_store),
            args.k,
            regions=regions(args.regions, params, default=[]) or None,
            exclude_radius_m=args.exclude_radius_m,
        )
        if args.json:
            rows = json.loads(found.to_json(orient="records", double_precision=6))
            print(json.dumps({"query": found.attrs["query"], "results": rows}), file=out)
        else:
            print(format_table(found), file=out)
    return 0


def cmd_redis(args: argparse.Namespace, project: Project) -> int:
    from loc2vec.serving import redis_server

    settings = store_settings(project, None)
    if args.if_selected and settings.kind != "redis":
        return 0
    if args.action == "start":
        started = redis_server.start(settings.redis, project.paths.redis_dir)
        print(f"redis {'started' if started else 'already running'} at {settings.redis.split(',')[0]}")
    elif args.action == "stop":
        print("redis stopped" if redis_server.stop(settings.redis) else "redis was not running here")
    else:
        up = redis_server.ping(settings.redis)
        print(f"redis at {settings.redis.split(',')[0]}: {'up' if up else 'down'}")
        return 0 if up else 2
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("publish", help="feast apply + materialize the embeddings (idempotent)")
    s.add_argument("--embeddings", nargs="+", help="embeddings Parquets to publish (default: the regions')")
    s.add_argument("--regions", help="comma-separated regions (default: every data/embeddings/*.parquet)")
    s.add_argument("--online-store", choices=STORE_CHOICES, help="default: params/LOC2VEC_ONLINE_STORE")
    s.add_argument("--incremental", action="store_true", help="materialize-incremental only (scheduled runs)")
    s.add_argument("--force", action="store_true", help="publish even if nothing changed")
    s.add_argument("--record", help="also write what the store serves for these regions (the DVC stage's output)")
    s.set_defaults(func=cmd_publish)

    s = sub.add_parser("features", help="online embedding of a location (JSON) or of a CSV of points (CSV)")
    add_location(s, required=False)
    s.add_argument("--csv", help="a CSV file with lat and lon columns: one output row per point (CSV on stdout)")
    s.add_argument("--version", help="the model version to read (pinned); default: the latest (exploration only)")
    s.add_argument("--online-store", choices=STORE_CHOICES, help="default: params/LOC2VEC_ONLINE_STORE")
    s.set_defaults(func=cmd_features)

    s = sub.add_parser("pyfunc", help="log the MLflow pyfunc model that looks embeddings up by lat/lon")
    s.add_argument("--version", help="the model version it serves (default: the champion's)")
    s.add_argument("--online-store", choices=STORE_CHOICES, help="default: params publish.online_store")
    s.set_defaults(func=cmd_pyfunc)

    s = sub.add_parser("services", help="the feature services and the model version each pins")
    s.add_argument("--json", action="store_true", help="JSON instead of a table")
    s.add_argument("--online-store", choices=STORE_CHOICES, help="default: params/LOC2VEC_ONLINE_STORE")
    s.set_defaults(func=cmd_services)

    s = sub.add_parser("redis", help="a local redis-server for the Redis online store (publish.redis)")
    s.add_argument("action", choices=["start", "stop", "ping"])
    s.add_argument("--if-selected", action="store_true", help="only when the online store is redis (make setup)")
    s.set_defaults(func=cmd_redis)

    s = sub.add_parser("serve", help="Feast's feature server (HTTP) on 127.0.0.1")
    s.add_argument("--port", type=int, help="default: params serve.port")
    s.add_argument("--online-store", choices=STORE_CHOICES, help="default: params/LOC2VEC_ONLINE_STORE")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("similar", help="the k published cells with the nearest embeddings, across regions")
    add_location(s)
    s.add_argument("-k", type=int, default=None, help="how many cells (default: params explore.similar.k)")
    s.add_argument("--regions", nargs="+", help="only these published regions (default: all)")
    s.add_argument(
        "--exclude-radius-m",
        type=float,
        default=None,
        help="leave out cells this close to the query (default: params, 200 m = overlapping tiles)",
    )
    s.add_argument("--online-store", choices=STORE_CHOICES, help="default: params/LOC2VEC_ONLINE_STORE")
    s.add_argument("--rebuild-index", action="store_true", help="rebuild the vector index even if it is current")
    s.add_argument("--json", action="store_true", help="JSON instead of a table")
    s.set_defaults(func=cmd_similar)
