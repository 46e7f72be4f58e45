"""`loc2vec explore` on the real test region embedded with the trained encoder fixture: the report's files,
its MLflow run, what its PCA map separates, and the page in headless Chromium (Debian's `chromium`)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .fixtures.project import load_project
from .fixtures.trained import patched_params, trained_params

SMALL = {
    "explore": {
        "pca_points": 800,
        "tsne_points": 500,
        "thumbnail_grid": 5,
        "walks": 3,
        "walk_steps": 5,
        "interpolation_steps": 6,
        "experiment": "loc2vec-explore-test",
    },
    "evaluate": {"labels": {"transport_per_class": 60, "jitter_m": 15.0, "seed": 0}},
}
PNGS = [
    "map_base.png",
    "map_pca.png",
    "pca_map.png",
    "pca_2d.png",
    "pca_3d.png",
    "tsne.png",
    "walks.png",
    "interpolation.png",
    "arithmetic.png",
    "transport_lda.png",
]


@pytest.fixture(scope="module")
def report(project: Path, region: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    """The test region embedded with the trained fixture, and its report (logged to MLflow)."""
    from loc2vec.explore.report import ReportInputs, build_report

    from .fixtures.trained import embed_with_fixture

    with patched_params(project, trained_params(SMALL)):
        shutil.rmtree(project / "data" / "embeddings", ignore_errors=True)
        embed_with_fixture(region)
        out = tmp_path_factory.mktemp("explore") / "report"
        p = load_project()
        inputs = ReportInputs(
            embeddings=p.paths.embeddings(region),
            render=p.params.render,
            labels=p.params.evaluate.labels,
            info=p.info,
            paths=p.paths,
        )
        summary = build_report(region, out, p.params.explore, inputs, track=True)
        yield out, summary


def test_report_files_are_complete_and_offline(report: tuple[Path, dict]) -> None:
    out, summary = report
    page = (out / "index.html").read_text()
    for name in PNGS:
        with Image.open(out / name) as img:
            assert img.width > 100 and img.height > 100, name
        assert f'"{name}"' in page, f"{name} is referenced by the page"
    assert "© OpenStreetMap contributors" in page
    assert not re.search(r'<(script|link|img)[^>]+(src|href)="(https?:)?//', page), "nothing from the network"
    assert "L.imageOverlay" in page and "Leaflet 1.9.3" in page, "Leaflet is inlined"
    with Image.open(out / "map_base.png") as base, Image.open(out / "map_pca.png") as pca:
        assert base.size == pca.size and pca.mode == "RGBA"
    assert json.loads((out / "report.json").read_text())["cells"] == summary["cells"] > 500
    assert summary["results"]["transport"]["cv_accuracy"] > 1 / len(summary["results"]["transport"]["modes"])
    assert summary["results"]["walks"]["median_step_km"] >= 0.4, "walk steps leave the overlapping tiles"


def test_report_is_logged_to_mlflow(report: tuple[Path, dict]) -> None:
    from mlflow import MlflowClient

    _, summary = report
    client = MlflowClient()
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["region"] == "test_li" and "timings.total_s" in run.data.metrics
    names = {f.path for f in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/index.html", "report/pca_map.png", "report/walks.png"} <= names


def test_pca_colours_separate_built_up_from_forest(report: tuple[Path, dict]) -> None:
    """The map's point: town and forest cells get clearly different colours."""
    from loc2vec.explore.space import load_space

    space = load_space("test_li", load_project().paths.embeddings("test_li"))
    forest = (space.hist[:, 7] >= 0.9) & (space.hist[:, 6] == 0)
    town = space.hist[:, 6] >= 0.25
    assert forest.sum() > 20 and town.sum() > 20
    gap = np.linalg.norm(space.rgb[forest].mean(axis=0) - space.rgb[town].mean(axis=0))
    assert gap > 0.3, f"mean PCA colours of forest and town differ by {gap:.2f} (of √3)"


def test_report_loads_in_headless_chromium(report: tuple[Path, dict]) -> None:
    from loc2vec.explore.browser import Browser

    out, _ = report
    with Browser(width=1280) as browser:
        page = browser.open((out / "index.html").as_uri(), ready="window.loc2vecMapReady === true")
        images = browser.evaluate(
            "Array.from(document.images).map(i => [i.getAttribute('src').slice(0, 40), i.complete, i.naturalWidth])"
        )
        overlays = browser.evaluate(
            "Array.from(document.querySelectorAll('#map img.leaflet-image-layer')).map(i => i.naturalWidth)"
        )
        stack = browser.evaluate(
            "Array.from(document.querySelectorAll('#map img.leaflet-image-layer'))"
            ".map(i => [i.getAttribute('src'), +getComputedStyle(i).zIndex])"
        )
        attribution = browser.evaluate("document.querySelector('.leaflet-control-attribution').textContent")
        map_size = browser.evaluate(
            "[document.getElementById('map').clientWidth, document.getElementById('map').clientHeight]"
        )
    assert page.ready, "both map images loaded (window.loc2vecMapReady)"
    assert page.console_errors == [] and page.failed_requests == []
    assert all(u.startswith(("file:", "data:")) for u in page.requests), [u[:80] for u in page.requests]
    assert len(images) >= 10 and all(ok and w > 0 for _, ok, w in images), images
    assert len(overlays) == 2 and min(overlays) > 100, "base map and PCA overlay are drawn by Leaflet"
    z = dict(stack)
    assert z["map_pca.png"] > z["map_base.png"], f"the PCA colours are drawn over the base map: {stack}"
    assert "© OpenStreetMap contributors" in attribution
    assert map_size[0] > 600 and map_size[1] > 400


def test_preview_png_of_the_whole_page(report: tuple[Path, dict], tmp_path: Path) -> None:
    from loc2vec.explore.report import write_preview

    out, _ = report
    result = write_preview(out, tmp_path / "explore.png")
    assert result["ready"] and result["console_errors"] == [] and result["failed_requests"] == []
    with Image.open(tmp_path / "explore.png") as img:
        assert img.mode == "P" and img.width == 768 and img.height > 1500, (img.mode, img.size)


def test_explore_refuses_to_replace_a_directory_that_is_not_a_report(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from loc2vec.cli import main

    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["explore", "--region", "test_li", "--out", str(tmp_path), "--no-mlflow"]) == 2
    assert "not an explore report" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"
