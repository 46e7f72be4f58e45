"""`loc2vec render | metatiles | render-tiles`: tiles (the `render` stage)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loc2vec.cli.args import add_location, finite, one_region, regions
from loc2vec.cli.project import Project
from loc2vec.core.errors import ConfigError


def cmd_render(args: argparse.Namespace, project: Project) -> int:
    from loc2vec.core.atomic import save_npy
    from loc2vec.raster.channels import CHANNEL_NAMES
    from loc2vec.raster.preview import channel_grid, write_preview
    from loc2vec.raster.render import render_tile

    region = one_region(args.region, project.params)
    tile = render_tile(
        region,
        args.lat,
        args.lon,
        render=project.params.render,
        info=project.info,
        angle_deg=args.angle,
        shift_m=tuple(args.shift_m),
    )
    save_npy(Path(args.out), tile)
    if args.png:
        write_preview(tile, Path(args.png))
    if args.channels_png:
        channel_grid(tile, Path(args.channels_png), title=f"{region} {args.lat:.5f}, {args.lon:.5f}")
    nonzero = {name: float(v) for name, v in zip(CHANNEL_NAMES, (tile > 0).mean(axis=(1, 2)), strict=True)}
    report = {
        "out": args.out,
        "shape": list(tile.shape),
        "dtype": str(tile.dtype),
        "nonzero_fraction": {k: round(v, 4) for k, v in nonzero.items()},
    }
    print(json.dumps(report, indent=1))
    return 0


def cmd_metatiles(args: argparse.Namespace, project: Project) -> int:
    import numpy as np
    import pandas as pd

    from loc2vec.embedding.cells import select_cells
    from loc2vec.raster.metatiles import MetatileSpec, ensure_metatiles

    params = project.params
    names = regions(args.region, params)
    if (args.samples or args.out) and len(names) != 1:
        raise ConfigError("--samples and --out need exactly one --region")
    paths = project.paths
    if args.samples or args.out:
        name = names[0]
        paths = paths.overriding(
            samples={name: Path(args.samples)} if args.samples else None,
            metatiles={name: Path(args.out)} if args.out else None,
        )
    spec = MetatileSpec.from_config(params.render, params.augment, params.tiles)
    for region in names:
        # where training samples and the cells to embed need them: nothing else is rendered
        samples = pd.read_parquet(paths.samples(region))
        _, cell_lats, cell_lons = select_cells(region, params.embed, params.render.radius_m, project.info)
        lats = np.concatenate([samples["lat"].to_numpy(), cell_lats])
        lons = np.concatenate([samples["lon"].to_numpy(), cell_lons])
        index = ensure_metatiles(
            region,
            lats,
            lons,
            spec=spec,
            paths=paths,
            info=project.info,
            orchestrate=params.orchestrate,
        )
        print(f"{region}: {len(index)} metatiles in {index.directory}")
    return 0


def cmd_render_tiles(args: argparse.Namespace, project: Project) -> int:
    import pandas as pd

    from loc2vec.raster.stored import render_direct_tiles

    params, paths = project.params, project.paths
    for region in regions(args.region, params):
        out = render_direct_tiles(
            region,
            pd.read_parquet(paths.samples(region)),
            paths.tile_store(region),
            cfg=params.shards,
            render_cfg=params.render,
            max_shift_m=params.augment.max_shift_m,
            info=project.info,
        )
        print(out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("render", help="render one 12-channel tile (params render: radius and size)")
    s.add_argument("--region", required=True)
    add_location(s)
    s.add_argument("--angle", type=finite("angle", -3600, 3600), default=0.0, help="rotation, degrees CCW")
    s.add_argument(
        "--shift-m",
        type=finite("shift", -1e4, 1e4),
        nargs=2,
        default=[0.0, 0.0],
        metavar=("DX", "DY"),
        help="move the tile centre DX metres east and DY metres north (it must stay inside the region)",
    )
    s.add_argument("--out", required=True, help="output .npy (uint8, shape 12×size×size)")
    s.add_argument("--png", help="also write an RGB preview PNG")
    s.add_argument("--channels-png", help="also write a grid of the 12 channels")
    s.set_defaults(func=cmd_render)

    s = sub.add_parser("metatiles", help="render the metatiles the sampled locations and embedded cells need")
    s.add_argument("--region", help="region or comma-separated regions (default: params pipeline.regions)")
    s.add_argument("--samples", help="the region's samples Parquet (default data/samples/REGION.parquet)")
    s.add_argument("--out", help="the region's metatile directory (default data/metatiles/REGION)")
    s.set_defaults(func=cmd_metatiles)

    s = sub.add_parser("render-tiles", help="render anchor + K positives per sampled location (zarr shards)")
    s.add_argument("--region", help="region or comma-separated regions (default: params pipeline.regions)")
    s.set_defaults(func=cmd_render_tiles)
