"""`loc2vec explore`: a browsable, self-contained HTML report of a region's embedding space.

The article's "Exploring the metric space" (figures 15–22) for our embeddings: a PCA map (PCA → RGB over the
region, as a PNG and an interactive Leaflet map), PCA and t-SNE projections with tile thumbnails, random walks
through nearest neighbours, interpolation and arithmetic mapped back to real tiles, and an LDA of the
embeddings at transport points by mode.

Self-contained: nothing is fetched from the network (Leaflet is inlined, the base map is rendered from our
own PostGIS import); images are PNG files beside index.html, referenced by relative paths. The report is
built in a temporary sibling directory and swapped in (core.atomic.swap_dir); a directory that is not a
previous report is never replaced. The run is logged to MLflow (experiment ``explore.experiment``).
"""

from __future__ import annotations

import html
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from loc2vec.core.atomic import atomic_path, swap_dir
from loc2vec.core.config import ExploreConfig, LabelConfig, RenderConfig
from loc2vec.core.names import validate_region_name
from loc2vec.core.paths import ProjectPaths
from loc2vec.core.tracking import flatten_params, git_commit, setup_mlflow
from loc2vec.evaluation.labels import LabelSource
from loc2vec.explore.space import CONCEPTS, ExploreError, Space, Tiles, load_space
from loc2vec.osm.db import ConnInfo

log = logging.getLogger(__name__)
MARKER = "report.json"  # marks a directory as an explore report (safe to replace)
FIGURES = {  # file → caption
    "pca_map.png": "Embeddings reduced to 3-D by PCA, used as RGB, one hexagon per H3 cell over the region's own "
    "OSM data (article figures 18–19).",
    "pca_2d.png": "PCA 2-D of distinct embeddings with the tiles of points nearest a grid (figure 15).",
    "pca_3d.png": "PCA 3-D of the same points (figure 15).",
    "tsne.png": "t-SNE 2-D: local neighbourhoods that PCA flattens (figure 16).",
    "walks.png": "Random walks: each step jumps to one of the k nearest embeddings whose tile does not overlap the "
    "walk so far (figure 20).",
    "interpolation.png": "Interpolation between two embeddings; every step shows the nearest real tile (figure 21).",
    "arithmetic.png": "Sums and differences of embeddings (a + c − b, so the weights sum to 1), mapped to the nearest "
    "real tile that is not an operand (figure 22).",
    "transport_lda.png": "LDA of the embeddings at the evaluation's transport points, coloured by mode (figure 17). "
    "Accuracy is a random (not spatially blocked) K-fold.",
}


@dataclass(frozen=True)
class ReportInputs:
    """Where a report's data come from: the region's embeddings, its map, the transport labels, the MLflow store."""

    embeddings: Path
    render: RenderConfig
    labels: LabelConfig
    info: ConnInfo
    paths: ProjectPaths


# ---------------------------------------------------------------- sections


def _map_section(space: Space, out: Path, cfg: ExploreConfig, inputs: ReportInputs) -> dict[str, Any]:
    from loc2vec.explore.map import map_grid, pca_overlay, render_base, static_map

    grid = map_grid(space, cfg.map_m_per_px, cfg.map_max_px)
    base = render_base(space.region, grid, inputs.info)
    overlay = pca_overlay(space, grid)
    Image.fromarray(base).save(out / "map_base.png")
    overlay.save(out / "map_pca.png")
    ev = space.explained
    static_map(
        base,
        overlay,
        cfg.overlay_opacity,
        f"{space.region}: embeddings as colours (PCA → RGB)",
        f"{space.model_name} v{space.model_version}, {space.n:,} H3 cells; R, G, B = PC1–3 "
        f"({ev[0]:.0%}, {ev[1]:.0%}, {ev[2]:.0%} of the variance)",
    ).save(out / "pca_map.png")
    metres = grid.upp * _cos_lat(grid)
    return {
        "grid": {"width": grid.width, "height": grid.height, "m_per_px": round(metres, 2)},
        "legend": concept_colours(space),
        "_grid": grid,
    }


def concept_colours(space: Space, n: int = 50) -> dict[str, str]:
    """The mean PCA colour of each concept's n best tiles, as #rrggbb: what the map's colours mean."""
    out = {}
    for concept in CONCEPTS:
        r, g, b = (space.rgb[space.top(concept, n)].mean(axis=0) * 255).round().astype(int).tolist()
        out[concept] = f"#{r:02x}{g:02x}{b:02x}"
    return out


def _cos_lat(grid) -> float:
    south, _, north, _ = grid.bounds
    return math.cos(math.radians((south + north) / 2))


def _sections(
    space: Space, tiles: Tiles, out: Path, cfg: ExploreConfig, inputs: ReportInputs
) -> list[tuple[str, Callable[[], Any]]]:
    from loc2vec.explore import figures as f

    seed = cfg.seed
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("map", lambda: _map_section(space, out, cfg, inputs)),
        ("pca", lambda: f.pca_figures(space, tiles, out, cfg.pca_points, cfg.thumbnail_grid, seed)),
        (
            "tsne",
            lambda: f.tsne_figure(space, tiles, out, cfg.tsne_points, cfg.tsne_perplexity, cfg.thumbnail_grid, seed),
        ),
        (
            "walks",
            lambda: f.walks_figure(space, tiles, out, cfg.walks, cfg.walk_steps, cfg.walk_k, cfg.walk_min_m, seed),
        ),
        ("interpolation", lambda: f.interpolation_figure(space, tiles, out, cfg.interpolation_steps)),
        ("arithmetic", lambda: f.arithmetic_figure(space, tiles, out)),
    ]
    if cfg.transport_lda:
        source = LabelSource(inputs.info, inputs.render.radius_m, space.h3_resolution)
        steps.append(("transport", lambda: f.lda_figure(space, out, seed, inputs.labels, source)))
    return steps


# ---------------------------------------------------------------- the page


def _figure(name: str, alt: str, css_class: str = "") -> str:
    caption = FIGURES[name]
    return (
        f'<figure class="{css_class}"><a href="{name}"><img src="{name}" alt="{html.escape(alt)}" loading="eager"></a>'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


CSS = """
body { font-family: "DejaVu Sans", Verdana, sans-serif; max-width: 1240px; margin: 0 auto; padding: 12px 18px;
       color: #222; line-height: 1.45; }
h1 { margin-bottom: 4px; } h2 { margin-top: 34px; border-bottom: 1px solid #ccc; }
.meta, figcaption, footer, .map-tools { color: #555; font-size: 0.9em; }
nav a { margin-right: 14px; } figure { margin: 14px 0 26px; } img { max-width: 100%; border: 1px solid #ddd; }
#map { border: 1px solid #bbb; margin: 6px 0 18px; } .pair { display: flex; gap: 12px; align-items: flex-start; }
.pair figure { flex: 1; } code { background: #f3f3f3; padding: 1px 4px; } .note { background: #fff8e0; padding: 6px; }
figure.narrow { flex: 0 0 560px; } .legend li { list-style: none; margin: 3px 0; }
.swatch { display: inline-block; width: 28px; height: 14px; border: 1px solid #888; margin-right: 8px; }
"""


def render_html(space: Space, results: dict[str, Any], map_html: str, built: str) -> str:
    """The report page: sections in the article's order, numbers from the results, images beside it."""
    e = html.escape
    r = results
    ev = space.explained
    walks, tr = r.get("walks", {}), r.get("transport", {})
    if "skipped" in tr or not tr:
        transport = f'<p class="note">{e(str(tr.get("skipped", "transport points are switched off (explore.transport_lda)")))}</p>'  # noqa: E501
    else:
        modes = ", ".join(f"{k} {v}" for k, v in tr["modes"].items())
        transport = (
            f"<p>{tr['points']:,} transport points of the evaluation labels (jittered GPS-like fixes on "
            f"ways of each mode: {e(modes)}); 5-fold LDA accuracy {tr['cv_accuracy']:.0%}.</p>"
            + _figure("transport_lda.png", "LDA of transport points")
        )
    legend = "".join(
        f'<li><span class="swatch" style="background:{c}"></span>{e(name)}</li>'
        for name, c in r.get("map", {}).get("legend", {}).items()
    )
    arith = "".join(
        f"<li><code>{e(x['expression'])}</code> → {e(x['h3_cell'])} (d = {x['distance']:.2f})</li>"
        for x in r.get("arithmetic", {}).get("expressions", [])
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>loc2vec · {e(space.region)} · the metric space</title><link rel="icon" href="data:,"><style>{CSS}</style></head>
<body>
<h1>The metric space of {e(space.region)}</h1>
<p class="meta">model <b>{e(space.model_name)} v{e(space.model_version)}</b> · {space.n:,} H3 cells (resolution
{space.h3_resolution}) · {len(space.distinct):,} distinct embeddings · {len(space.emb[0])}-D · built {e(built)}</p>
<nav><a href="#map-section">PCA map</a><a href="#projections">projections</a><a href="#walks">walks</a>
<a href="#calculus">interpolation &amp; arithmetic</a><a href="#transport">transport points</a></nav>

<section id="map-section"><h2>PCA map</h2>
<p>Each embedding is reduced to three principal components (fit on the distinct embeddings: {ev[0]:.0%}, {ev[1]:.0%}
and {ev[2]:.0%} of the variance), scaled to 0–255 and used as the colour of its H3 cell. Similar surroundings get
similar colours: town centres, residential streets, forests, farmland, rivers and main roads stand apart.
The base layer is our own PostGIS data drawn with the 12 channels' preview colours.</p>
{map_html}
<div class="pair">{_figure("pca_map.png", "PCA colours over the region", "narrow")}
<div class="legend"><p>What the colours mean: the mean colour of the 50 tiles that best match each kind of place
(by the channels they draw):</p><ul>{legend}</ul>
<p>Click the interactive map to get the <code>loc2vec similar</code> command for a location: the most similar
places of every published region.</p></div></div>
</section>

<section id="projections"><h2>Projections</h2>
<div class="pair">{_figure("pca_2d.png", "PCA 2-D")}{_figure("pca_3d.png", "PCA 3-D")}</div>
{_figure("tsne.png", "t-SNE")}
</section>

<section id="walks"><h2>Random walks</h2>
<p>{walks.get("walks", 0)} walks, {walks.get("steps", 0)} steps: median embedding distance per step
{walks.get("median_step_distance") or 0:.2f}, median {walks.get("median_step_km") or 0:.1f} km on the ground.
Semantically close, geographically far.</p>
{_figure("walks.png", "random walks")}
</section>

<section id="calculus"><h2>Interpolation and arithmetic</h2>
{_figure("interpolation.png", "interpolation")}
{_figure("arithmetic.png", "arithmetic")}
<ul>{arith}</ul>
</section>

<section id="transport"><h2>Transport points</h2>
{transport}
</section>

<footer><p>Map data © OpenStreetMap contributors, available under the Open Database License (ODbL). Interactive map:
Leaflet 1.9.3 © Vladimir Agafonkin, CloudMade (BSD-2-Clause), inlined. Made by <code>loc2vec explore --region
{e(space.region)}</code>.</p></footer>
</body></html>
"""


# ---------------------------------------------------------------- building


def _check_out(out: Path) -> None:
    """Refuse to replace a directory that is not an explore report (e.g. `--out docs`)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise ExploreError(f"{out} exists and is not an explore report: choose a new or empty directory")


def build_report(
    region: str,
    out: Path,
    cfg: ExploreConfig,
    inputs: ReportInputs,
    *,
    track: bool = True,
    preview: Path | None = None,
) -> dict[str, Any]:
    """Build the report for a region into `out` (atomically replaced); returns its summary."""
    from tqdm import tqdm

    from loc2vec.explore.map import leaflet_map

    validate_region_name(region)
    out = Path(out).resolve()
    _check_out(out)
    started = time.perf_counter()
    space = load_space(region, inputs.embeddings)
    tiles = Tiles(space, inputs.render, inputs.info)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    results: dict[str, Any] = {}
    timings: dict[str, float] = {"load_s": round(time.perf_counter() - started, 2)}
    try:
        steps = _sections(space, tiles, tmp, cfg, inputs)
        for name, step in tqdm(steps, desc=f"explore {region}", unit="section"):
            t0 = time.perf_counter()
            results[name] = step()
            timings[f"{name}_s"] = round(time.perf_counter() - t0, 2)
            log.info("explore %s: %s in %.1f s", region, name, timings[f"{name}_s"])
        grid = results["map"].pop("_grid")
        map_html = leaflet_map(grid, "map_base.png", "map_pca.png", cfg.overlay_opacity)
        built = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        (tmp / "index.html").write_text(render_html(space, results, map_html, built))
        timings["total_s"] = round(time.perf_counter() - started, 2)
        summary = _summary(space, results, timings, cfg, out, tiles)
        (tmp / MARKER).write_text(json.dumps(summary, indent=1, default=str))
        tmp.chmod(0o755)  # mkdtemp makes 0700
        swap_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if preview is not None:
        summary["preview"] = write_preview(out, Path(preview))
    if track:
        summary["mlflow_run_id"] = log_to_mlflow(summary, out, cfg, inputs.paths)
    log.info("explore %s: report in %s (%.1f s)", region, out / "index.html", timings["total_s"])
    return summary


def _summary(
    space: Space, results: dict[str, Any], timings: dict[str, float], cfg: ExploreConfig, out: Path, tiles: Tiles
) -> dict[str, Any]:
    return {
        "region": space.region,
        "report": str(out / "index.html"),
        "model_name": space.model_name,
        "model_version": space.model_version,
        "cells": space.n,
        "distinct_embeddings": int(len(space.distinct)),
        "h3_resolution": space.h3_resolution,
        "tiles_rendered": len(tiles),
        "results": results,
        "timings": timings,
        "config": cfg.model_dump(mode="json", exclude={"similar"}),
        "git_commit": git_commit(),
    }


def write_preview(out: Path, path: Path, scale: float = 0.6, colours: int = 256) -> dict[str, Any]:
    """A full-page PNG of the report as headless Chromium draws it (60% size, 256 colours: ~0.4 MB, small
    enough for docs/), and what the browser complained about while loading it."""
    from loc2vec.explore.browser import check_page

    with tempfile.TemporaryDirectory(prefix="loc2vec-preview-") as tmp:
        shot = Path(tmp) / "page.png"
        page = check_page(out / "index.html", screenshot=shot, scale=scale)
        with Image.open(shot) as img:
            small = img.convert("RGB").quantize(colours, method=Image.Quantize.FASTOCTREE)
        with atomic_path(path) as part:
            small.save(part, format="PNG", optimize=True)
    if page.console_errors or page.failed_requests or not page.ready:
        log.warning(
            "report page: ready=%s, errors %s, failed %s", page.ready, page.console_errors, page.failed_requests
        )
    return {
        "path": str(path),
        "ready": page.ready,
        "console_errors": page.console_errors,
        "failed_requests": page.failed_requests,
    }


def log_to_mlflow(summary: dict[str, Any], out: Path, cfg: ExploreConfig, paths: ProjectPaths) -> str:
    """One run in the explore experiment: params, numbers, and the whole report as artifacts."""
    mlflow = setup_mlflow(cfg.experiment, paths)
    with mlflow.start_run(run_name=f"explore-{summary['region']}") as run:
        params = {
            k: summary[k] for k in ("region", "model_name", "model_version", "cells", "h3_resolution", "git_commit")
        }
        flatten_params("explore", summary["config"], params)
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        metrics: dict[str, Any] = flatten_params(
            "",
            {
                "timings": summary["timings"],
                "distinct_embeddings": summary["distinct_embeddings"],
                "tiles_rendered": summary["tiles_rendered"],
            },
            {},
        )
        for key in ("cv_accuracy", "points"):
            value = summary["results"].get("transport", {}).get(key)
            if isinstance(value, int | float):
                metrics[f"transport.{key}"] = value
        mlflow.log_metrics({k.replace("@", "."): float(v) for k, v in metrics.items() if isinstance(v, int | float)})
        mlflow.log_artifacts(str(out), artifact_path="report")
        return run.info.run_id
