"""Does context beyond the tile say more about the leak-free tasks? (issue 17 item 2, 'more than one scale').

Before building a second, coarser input into the encoder, this measures whether the information is there at all:
each leak-free label's masked scene is rendered again at a larger radius (the same 128 px, so 2·R/128 m per px),
its object hidden as in the suite, and three summaries of it (`hist_far`: the 12-channel histogram; `rw_far`:
random_wide's 1,024 features; `tags_far`: the tag counts in an R-metre disc) are scored by the suite's own folds
and fits beside the stored 100 m featuresets: alone, added to the fold's best baseline (a lift with its
block-bootstrap interval, as for loc2vec), and added to loc2vec (an optimistic stand-in for an encoder that also
saw the far context). Liechtenstein only (options are chosen there).

Usage (after `make run`, which stores the suite inputs):
    python scripts/probe_context_scale.py --model data/model --radius 400 --out probe.context400.json
writes the JSON (the suite's shape: tasks.<task>.<featureset>.<classifier>.macro_f1 and the lift_* rows) and, beside
it, the suite's chart of it (.png).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from loc2vec.core.config import load_params
from loc2vec.core.numerics import pin_cpu_numerics

TASKS = ("venue_context", "transport_context", "building_type")
FAR = ("hist_far", "rw_far", "tags_far")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="a model directory (model.pt + model_config.json)")
    ap.add_argument("--radius", type=float, default=400.0, help="the far scene's radius in metres")
    ap.add_argument("--region", default="liechtenstein")
    ap.add_argument("--out", type=Path, required=True, help="the JSON written")
    args = ap.parse_args()
    pin_cpu_numerics(load_params(None).compute)  # before numpy and torch load their kernels, as the CLI does

    import numpy as np

    from loc2vec.cli.project import Project
    from loc2vec.core.atomic import write_text
    from loc2vec.evaluation.added_value import REFERENCE, WIDE, score_added_value
    from loc2vec.evaluation.chart import suite_chart
    from loc2vec.evaluation.context import EvaluationContext
    from loc2vec.evaluation.scene import histogram, scene_tag_counts, tile_features
    from loc2vec.evaluation.suite import task_baselines
    from loc2vec.evaluation.suite_inputs import SuiteInputs
    from loc2vec.evaluation.tilefeatures import RandomWide
    from loc2vec.training.outputs import load_encoder

    project = Project.load()
    ctx = EvaluationContext.from_params(project.params, project.info)
    cfg = project.params.evaluate
    encoder = load_encoder(args.model)
    inputs = SuiteInputs.open(project.paths.suite_inputs(args.region), args.region, cfg, ctx)
    far_render = (ctx.render or project.params.render).model_copy(update={"radius_m": args.radius})
    tasks: dict = {}
    meta: dict = {
        "region": args.region,
        "train_regions": [],
        "suite": f"far-context probe ({args.radius:.0f} m)",
        "radius_m": args.radius,
        "model": str(args.model),
        "tasks": {},
    }
    for task in TASKS:
        data, fits = inputs.leakfree(task, encoder, {})
        t0 = time.perf_counter()
        fns = {"hist_far": histogram, "rw_far": RandomWide(cfg.suite.random_wide_features, cfg.suite.random_wide_seed)}
        far = tile_features(data.labels, fns, far_render, ctx.info, cfg.suite.tile_batch)
        far["tags_far"] = np.log1p(scene_tag_counts(data.labels, ctx.info, args.radius))
        meta["tasks"][task] = {"seconds_far_scenes": round(time.perf_counter() - t0, 1)}
        extra = {k: v.astype(float) for k, v in far.items()}
        for base in (REFERENCE, WIDE):
            for name in ("hist_far", "tags_far"):
                extra[f"{base}+{name}"] = np.hstack([data.historical[base], far[name]])
        for k, v in extra.items():  # the scenes are the labels' own: historical and online rows are the same
            data.historical[k] = data.online[k] = v
        names = [n for n in data.historical if n != "latlon"]
        table, _, lifts = score_added_value(
            data, names, task_baselines(task, cfg), cfg, ctx.radius_m, fits=fits, added=(REFERENCE, *FAR)
        )
        tasks[task] = {**table, **lifts}  # the suite's JSON shape, so that its chart draws it
        print(task, json.dumps(lifts), flush=True)
    result = {"tasks": tasks, "meta": meta}
    write_text(args.out, json.dumps(result, indent=1))  # atomically: an earlier probe's file is never half-replaced
    suite_chart(result, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
