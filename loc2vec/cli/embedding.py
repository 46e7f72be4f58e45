"""`loc2vec embed`: every H3 cell of a region with the champion model (the `embed` stage)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loc2vec.cli.args import regions
from loc2vec.cli.project import Project
from loc2vec.core.errors import ConfigError


def cmd_embed(args: argparse.Namespace, project: Project) -> int:
    from loc2vec.embedding.run import embed_region
    from loc2vec.raster.metatiles import MetatileSpec
    from loc2vec.training.registry import resolve_alias

    params = project.params
    names = regions(args.region, params)
    if (args.metatiles or args.out) and len(names) != 1:
        raise ConfigError("--metatiles and --out need exactly one --region")
    paths = project.paths
    if args.metatiles:
        paths = paths.overriding(metatiles={names[0]: Path(args.metatiles)})
    spec = MetatileSpec.from_config(params.render, params.augment, params.tiles)
    model = resolve_alias(paths, params.train.registered_model)  # the champion, resolved once for every region
    for region in names:
        out = Path(args.out) if args.out else paths.embeddings(region)
        path = embed_region(
            region,
            model,
            out,
            cfg=params.embed,
            spec=spec,
            paths=paths,
            info=project.info,
            orchestrate=params.orchestrate,
        )
        print(json.dumps({"region": region, "out": str(path), **getattr(path, "stats", {})}, default=str))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("embed", help="embed every H3 cell on the region's mapped land with the champion model")
    s.add_argument("--region", help="region or comma-separated regions (default: params pipeline.regions)")
    s.add_argument("--metatiles", help="the region's metatile directory (default data/metatiles/REGION)")
    s.add_argument("--out", help="the embeddings Parquet (default data/embeddings/REGION.parquet)")
    s.set_defaults(func=cmd_embed)
