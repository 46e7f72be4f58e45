"""The `loc2vec` command line: one entry point, one sub-command per pipeline stage.

Heavy libraries (torch, mapnik, feast) are imported inside the commands that need
them, so `loc2vec --help` and light commands start fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("loc2vec")


def _finite(name: str, lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value) or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{name} must be a finite number in [{lo}, {hi}], got {text!r}")
        return value

    return parse


LAT = _finite("latitude", -90.0, 90.0)
LON = _finite("longitude", -180.0, 180.0)


def _metres(text: str) -> float:
    return _finite("shift", -1e4, 1e4)(text)


# ---------------------------------------------------------------- commands


def cmd_db(args: argparse.Namespace) -> int:
    from loc2vec import dbadmin

    if args.action == "setup":
        dbadmin.setup_cluster()
    else:
        dbadmin.stop_cluster()
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from loc2vec.osm import ingest, write_record

    result = ingest(args.region, args.pbf, force=args.force)
    print(result.message)
    if args.record:
        write_record(args.region, Path(args.record))
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from loc2vec.osm import fetch_to

    print(fetch_to(args.region, Path(args.out)))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from loc2vec.render import render_tile, write_preview

    tile = render_tile(args.region, args.lat, args.lon, angle_deg=args.angle, shift_m=tuple(args.shift_m))
    from loc2vec.atomic import save_npy

    save_npy(Path(args.out), tile)
    if args.png:
        write_preview(tile, Path(args.png))
    if args.channels_png:
        from loc2vec.viz import channel_grid

        channel_grid(tile, Path(args.channels_png), title=f"{args.region} {args.lat:.5f}, {args.lon:.5f}")
    nonzero = {name: float(v) for name, v in zip(_channel_names(), (tile > 0).mean(axis=(1, 2)), strict=True)}
    print(
        json.dumps(
            {
                "out": args.out,
                "shape": list(tile.shape),
                "dtype": str(tile.dtype),
                "nonzero_fraction": {k: round(v, 4) for k, v in nonzero.items()},
            },
            indent=1,
        )
    )
    return 0


def _channel_names() -> list[str]:
    from loc2vec.channels import CHANNELS

    return [c.name for c in CHANNELS]


def _regions(text: str | None) -> list[str]:
    from loc2vec.config import load_params
    from loc2vec.osm import check_region_name

    default = ",".join(load_params().section("pipeline").get("regions") or [load_params().regions.default])
    names = [r.strip() for r in (text or default).split(",") if r.strip()]
    return [check_region_name(r) for r in names]


def cmd_sample(args: argparse.Namespace) -> int:
    from loc2vec.sampling import write_samples

    for region in _regions(args.region):
        print(write_samples(region, args.out))
    return 0


def cmd_metatiles(args: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd

    from loc2vec.embed import select_cells
    from loc2vec.metatiles import ensure_metatiles
    from loc2vec.train import samples_path

    for region in _regions(args.region):
        # where training samples and the cells to embed need them: nothing else is rendered
        samples = pd.read_parquet(samples_path(region))
        _, cell_lats, cell_lons = select_cells(region)
        lats = np.concatenate([samples["lat"].to_numpy(), cell_lats])
        lons = np.concatenate([samples["lon"].to_numpy(), cell_lons])
        index = ensure_metatiles(region, lats, lons)
        print(f"{region}: {len(index)} metatiles in {index.path.parent}")
    return 0


def cmd_render_tiles(args: argparse.Namespace) -> int:
    import pandas as pd

    from loc2vec.tiles import render_direct_tiles
    from loc2vec.train import samples_path

    for region in _regions(args.region):
        print(render_direct_tiles(region, pd.read_parquet(samples_path(region))))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from loc2vec import distributed

    nproc = args.nproc or distributed.configured_nproc()
    if nproc > 1 and not distributed.under_launcher():  # re-run this command as nproc DDP processes
        return distributed.launch_train(
            nproc, regions=args.regions, resume=not args.no_resume, track=not args.no_mlflow, verbose=args.verbose
        )
    from loc2vec.train import train

    summary = train(_regions(args.regions), resume=not args.no_resume, track=not args.no_mlflow)
    if "rank" not in summary:  # DDP ranks other than 0 print nothing
        print(json.dumps(summary, indent=1))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from loc2vec.embed import embed_region

    for region in _regions(args.region):
        path = embed_region(region)
        print(json.dumps({"region": region, "out": str(path), **getattr(path, "stats", {})}, default=str))
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from loc2vec.publish import materialize_incremental_only, publish

    if args.incremental:
        result = materialize_incremental_only(online_store=args.online_store)
    else:
        result = publish(_regions(args.regions), online_store=args.online_store, force=args.force)
    text = json.dumps(result, indent=1, default=str)
    if args.record:
        from loc2vec.atomic import write_text

        write_text(Path(args.record), text + "\n")
    print(text)
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from loc2vec.features import get_location_embeddings

    row = get_location_embeddings([args.lat], [args.lon], online_store=args.online_store).iloc[0]
    out = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()}
    print(json.dumps(out, default=str))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from loc2vec.evaluate import evaluate

    train_regions = _regions(args.train_regions) if args.train_regions else None
    result = evaluate(_regions(args.region)[0], train_regions=train_regions, out=Path(args.out) if args.out else None)
    print(json.dumps(result.get("tasks", result), indent=1, default=str))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from loc2vec import bench

    result = bench.run(args.what, region=args.region, n=args.n)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loc2vec", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("db", help="start/stop the project's PostgreSQL cluster")
    s.add_argument("action", choices=["setup", "stop"])
    s.set_defaults(func=cmd_db)

    s = sub.add_parser("ingest", help="import a region's OSM extract into PostGIS")
    s.add_argument("--region", required=True)
    s.add_argument("--pbf", type=Path, help="use this extract (registers a new region if needed)")
    s.add_argument("--force", action="store_true", help="re-import even if the extract is unchanged")
    s.add_argument("--record", help="also write the import's metadata as JSON (a DVC output)")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("fetch", help="copy or download a region's extract, verified by sha256")
    s.add_argument("--region", required=True)
    s.add_argument("--out", required=True, help="where to put the verified extract (DVC versions it)")
    s.set_defaults(func=cmd_fetch)

    s = sub.add_parser("render", help="render one 12-channel tile")
    s.add_argument("--region", required=True)
    s.add_argument("--lat", type=LAT, required=True)
    s.add_argument("--lon", type=LON, required=True)
    s.add_argument("--angle", type=_finite("angle", -3600, 3600), default=0.0, help="rotation, degrees CCW")
    s.add_argument(
        "--shift-m",
        type=_metres,
        nargs=2,
        default=[0.0, 0.0],
        metavar=("DX", "DY"),
        help="move the tile centre DX metres east and DY metres north",
    )
    s.add_argument("--out", required=True, help="output .npy (uint8, shape 12×size×size)")
    s.add_argument("--png", help="also write an RGB preview PNG")
    s.add_argument("--channels-png", help="also write a grid of the 12 channels")
    s.set_defaults(func=cmd_render)

    s = sub.add_parser("sample", help="draw training locations of a region (Parquet)")
    s.add_argument("--region", help="region or comma-separated regions (default: params)")
    s.add_argument("--out", help="output Parquet (default data/samples/REGION.parquet)")
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("metatiles", help="render the metatiles the sampled locations need (fast path)")
    s.add_argument("--region", help="region or comma-separated regions (default: params)")
    s.set_defaults(func=cmd_metatiles)

    s = sub.add_parser("render-tiles", help="render anchor + K positives per sampled location (zarr shards)")
    s.add_argument("--region", help="region or comma-separated regions (default: params)")
    s.set_defaults(func=cmd_render_tiles)

    s = sub.add_parser("train", help="train the encoder (MLflow-tracked, resumable)")
    s.add_argument("--regions", help="comma-separated regions (default: params)")
    s.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    s.add_argument("--no-mlflow", action="store_true", help="do not track in MLflow")
    s.add_argument("--nproc", type=int, help="DDP processes via torchrun (default: params train.nproc)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("embed", help="embed every H3 cell on the region's mapped land with the champion model")
    s.add_argument("--region", help="region or comma-separated regions (default: params)")
    s.set_defaults(func=cmd_embed)

    s = sub.add_parser("publish", help="feast apply + materialize the embeddings (idempotent)")
    s.add_argument("--regions", help="comma-separated regions (default: params)")
    s.add_argument("--online-store", choices=["sqlite", "postgres"], help="default: params/LOC2VEC_ONLINE_STORE")
    s.add_argument("--incremental", action="store_true", help="materialize-incremental only (scheduled runs)")
    s.add_argument("--force", action="store_true", help="publish even if nothing changed")
    s.add_argument("--record", help="also write the result as JSON (the DVC stage's output)")
    s.set_defaults(func=cmd_publish)

    s = sub.add_parser("features", help="online feature lookup for one location (JSON)")
    s.add_argument("--lat", type=LAT, required=True)
    s.add_argument("--lon", type=LON, required=True)
    s.add_argument("--online-store", choices=["sqlite", "postgres"], help="default: params/LOC2VEC_ONLINE_STORE")
    s.set_defaults(func=cmd_features)

    s = sub.add_parser("evaluate", help="transport and venue classifiers on loc2vec vs baseline featuresets")
    s.add_argument("--region", required=True, help="the region to test on")
    s.add_argument("--train-regions", help="train the classifiers on these regions (cross-region transfer)")
    s.add_argument("--out", help="metrics JSON (default data/evaluate/REGION.json)")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("bench", help="benchmarks (JSON)")
    s.add_argument("what", help="render | tiles | train | serve | similar")
    s.add_argument("--region", default=None)
    s.add_argument("--n", type=int, default=None, help="number of tiles/items")
    s.add_argument("--json", action="store_true", help="compact JSON on one line")
    s.set_defaults(func=cmd_bench)

    # Commands that live beside their concern (each module's `register` adds its sub-commands).
    from loc2vec import cli_explore, cli_ops

    cli_explore.register(sub)
    cli_ops.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from loc2vec.errors import USER_ERRORS

    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"loc2vec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
