"""`loc2vec db | fetch | ingest`: the project's database and OSM extracts (the `ingest` stage)."""

from __future__ import annotations

import argparse
from pathlib import Path

from loc2vec.cli.args import one_region
from loc2vec.cli.project import Project


def cmd_db(args: argparse.Namespace, project: Project) -> int:
    from loc2vec.osm import cluster

    if args.action == "setup":
        cluster.setup_cluster(project.params.db)
    else:
        cluster.stop_cluster(project.params.db)
    return 0


def cmd_fetch(args: argparse.Namespace, project: Project) -> int:
    from loc2vec.osm.extracts import IngestError, fetch_to

    params, paths = project.params, project.paths
    region = one_region(args.region, params)
    if region not in params.regions.registry:
        raise IngestError(f"unknown region {region!r}; add it to params.yaml regions.registry")
    print(fetch_to(params.regions.registry[region], Path(args.out), paths.root, paths.download_dir))
    return 0


def cmd_ingest(args: argparse.Namespace, project: Project) -> int:
    from loc2vec.osm.ingest import ingest, write_record

    params = project.params
    region = one_region(args.region, params)
    result = ingest(
        region,
        args.pbf,
        info=project.info,
        cfg=params.ingest,
        regions=params.regions,
        paths=project.paths,
        reserved=params.reserved_schemas,
        force=args.force,
    )
    print(result.message)
    if args.record:
        write_record(region, Path(args.record), project.info)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("db", help="start/stop the project's PostgreSQL cluster")
    s.add_argument("action", choices=["setup", "stop"])
    s.set_defaults(func=cmd_db)

    s = sub.add_parser("fetch", help="copy or download a region's extract, verified by sha256")
    s.add_argument("--region", required=True)
    s.add_argument("--out", required=True, help="where to put the verified extract (DVC versions it)")
    s.set_defaults(func=cmd_fetch)

    s = sub.add_parser("ingest", help="import a region's OSM extract into PostGIS")
    s.add_argument("--region", required=True)
    s.add_argument("--pbf", type=Path, help="use this extract (registers a new region if needed)")
    s.add_argument("--force", action="store_true", help="re-import even if the extract is unchanged")
    s.add_argument("--record", help="also write the import's metadata as JSON (a DVC output)")
    s.set_defaults(func=cmd_ingest)
