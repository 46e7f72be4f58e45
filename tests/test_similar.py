"""`loc2vec similar` on the real test region embedded with the *trained* encoder fixture and published to Feast.

The quality assertion: from Vaduz centre, the most similar cells are built-up places (among them Schaan's
centre, 3 km away), far ahead of any forest cell.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from .conftest import VADUZ
from .fixtures.project import load_project, publish, store_settings
from .fixtures.trained import patched_params, trained_params

BUILDINGS, GREEN = 6, 7  # histogram channels (loc2vec.channels)


def _clean(project: Path) -> None:
    from loc2vec.osm.db import cursor
    from loc2vec.serving.store import forget_stores

    for sub in ("feast", "index", "embeddings"):
        shutil.rmtree(project / "data" / sub, ignore_errors=True)
    with cursor(load_project().info) as cur:
        cur.execute("DROP SCHEMA IF EXISTS feast CASCADE")
    forget_stores()


@pytest.fixture(scope="module")
def clean(project: Path, region: str) -> Iterator[Path]:
    """Coarse H3 and the fixture model's name in params; nothing embedded, published or indexed."""
    with patched_params(project, trained_params()):
        _clean(project)
        yield project
    _clean(project)


@pytest.fixture(scope="module")
def published(clean: Path, region: str) -> pd.DataFrame:
    """The test region embedded with the trained fixture and published (SQLite online store); its cells."""
    from .fixtures.trained import embed_with_fixture

    path = embed_with_fixture(region)
    publish([region], kind="sqlite")
    df = pd.read_parquet(path)
    hist = np.stack(df["histogram"].to_numpy())
    return df.assign(buildings=hist[:, BUILDINGS], green=hist[:, GREEN]).set_index("h3_cell")


def _index():
    """The similar index of the test project's publication (built when missing or stale)."""
    from loc2vec.serving.similar_index import ensure_index

    p = load_project()
    return ensure_index(p.params.explore.similar, p.paths, progress=False)


def test_nothing_published_is_a_clear_error(clean: Path, capsys: pytest.CaptureFixture) -> None:
    from loc2vec.cli import main
    from loc2vec.serving.similar_index import NothingPublishedError, ensure_index

    p = load_project()
    with pytest.raises(NothingPublishedError, match="loc2vec publish"):
        ensure_index(p.params.explore.similar, p.paths)
    assert main(["similar", "--lat", str(VADUZ[0]), "--lon", str(VADUZ[1])]) == 2
    assert "nothing published" in capsys.readouterr().err


def test_vaduz_centre_finds_built_up_centres_before_forest(published: pd.DataFrame) -> None:
    from loc2vec.serving.similar import similar

    found = similar(VADUZ[0], VADUZ[1], _index(), store_settings("sqlite"), k=10)
    q = found.attrs["query"]
    assert list(found["rank"]) == list(range(1, 11)) and found["distance"].is_monotonic_increasing
    assert q["h3_cell"] not in set(found["h3_cell"]), "the query cell itself is left out"
    assert (found["geo_km"] > 0.2).all(), "cells whose tiles overlap the query's are left out"
    assert (found["model_version"] == q["model_version"]).all()

    cells = published.loc[found["h3_cell"]]
    forest = published[(published["green"] >= 0.9) & (published["buildings"] == 0)]
    assert len(forest) >= 20, "the test bbox holds forest"
    assert (cells["buildings"] >= 0.1).all(), f"top-10 are built-up: {cells['buildings'].round(2).tolist()}"
    assert cells["buildings"].mean() > 0.2 and cells["buildings"].mean() > 10 * forest["buildings"].mean() + 0.1
    assert (found["geo_km"] > 2.0).any(), "another town centre (Schaan, 3 km north) is among them"

    # every forest cell ranks after the built-up ones: farther in embedding space than the 10th result
    query = np.asarray(published.loc[q["h3_cell"], "embedding"], dtype=np.float32)
    forest_d = np.linalg.norm(np.stack(forest["embedding"].to_numpy()) - query, axis=1)
    assert forest_d.min() > found["distance"].max() * 1.5


def test_index_matches_brute_force(published: pd.DataFrame) -> None:
    from loc2vec.serving.similar import nearby_cells, similar

    index = _index()
    sqlite = store_settings("sqlite")
    assert index.regions == ["test_li"] and index.n_cells == len(published)
    vectors = np.stack(published["embedding"].to_numpy()).astype(np.float32)
    rng = np.random.default_rng(1)
    for cell in rng.choice(published.index.to_numpy(), 5, replace=False):
        lat, lon = published.loc[cell, ["lat", "lon"]]
        found = similar(lat, lon, index, sqlite, k=8)
        near = nearby_cells(cell, 200.0)
        keep = ~published.index.isin(list(near))
        d = np.linalg.norm(vectors[keep] - vectors[published.index.get_loc(cell)], axis=1)
        np.testing.assert_allclose(found["distance"], np.sort(d)[:8], rtol=1e-5, atol=1e-5)


def test_index_is_persisted_and_rebuilt_when_the_publication_changes(published: pd.DataFrame, clean: Path) -> None:
    import pyarrow.parquet as pq

    first = _index()
    stamp = (first.directory / "manifest.json").stat().st_mtime_ns
    again = _index()
    assert again.directory == first.directory and (again.directory / "manifest.json").stat().st_mtime_ns == stamp
    assert (clean / "data" / "index" / ".gitignore").read_text() == "*\n"

    source = load_project().paths.offline_store
    assert source.is_symlink() and source.is_dir(), "a generation of partition files (serving/offline.py)"
    target = os.readlink(source)
    try:
        table = pq.read_table(source)
        source.unlink()
        pq.write_table(table.slice(1), source)  # a new publication (as one file, the older layout): one cell fewer
        changed = _index()
        assert changed.directory != first.directory and changed.n_cells == first.n_cells - 1
        assert not first.directory.exists(), "the stale index is removed"
        assert [p.name for p in changed.directory.parent.glob(".similar-*")] == [], "no temporary left"
    finally:
        source.unlink()
        source.symlink_to(target)
    assert _index().manifest["key"] == first.manifest["key"]


def test_cli_similar(published: pd.DataFrame, capsys: pytest.CaptureFixture) -> None:
    from loc2vec.cli import main

    args = ["similar", "--lat", str(VADUZ[0]), "--lon", str(VADUZ[1]), "--online-store", "sqlite"]
    assert main([*args, "-k", "5", "--regions", "test_li", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in out["results"]] == [1, 2, 3, 4, 5]
    assert set(out["results"][0]) == {"rank", "h3_cell", "region", "lat", "lon", "distance", "geo_km", "model_version"}
    assert out["query"]["regions"] == ["test_li"]

    assert main([*args, "-k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:3] == ["rank", "h3_cell", "region"] and len(table) == 5

    assert main([*args, "--regions", "nowhere"]) == 2
    assert "not published" in capsys.readouterr().err
    assert main(["similar", "--lat", "0", "--lon", "0", "--online-store", "sqlite"]) == 2
    assert "no published embedding" in capsys.readouterr().err


def test_bench_similar_reports_index_and_brute_force(published: pd.DataFrame) -> None:
    from loc2vec.cli.bench import run

    result = run("similar", load_project(), n=30)
    assert result["index_query"]["n"] == 30 and result["brute_force"]["n"] == 30
    assert result["index_query"]["p50_ms"] > 0 and result["brute_force"]["p99_ms"] > 0
    assert result["recall_at_k"] == 1.0
