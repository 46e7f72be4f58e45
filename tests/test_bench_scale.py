"""`loc2vec bench scale` on one tiny real bbox cut: every stage runs for real and reports positive numbers.

The smallest useful run: a ~1.5 km² cut of the Liechtenstein extract around Vaduz, few training locations and
coarse H3 cells, so the five stage processes, the encoder's registration and the plot fit in well under a minute.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .fixtures.project import load_project
from .fixtures.trained import patched_params

TINY = (9.515, 47.135, 9.530, 47.145)  # Vaduz centre: ~1.3 km²


def test_bench_scale_tiny_bbox(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import scale
    from loc2vec.cli.bench import run
    from loc2vec.osm.db import cursor

    size = scale.Size("li1", "liechtenstein", round(scale.bbox_km2(TINY), 2), TINY)
    monkeypatch.setitem(scale.CATALOGUE, "li1", size)  # a size below the catalogue's: the bench's own data
    monkeypatch.delenv(scale.MODEL_DIR_ENV, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    overrides = {"sample": {"n_locations": 60, "workers": 1}, "embed": {"h3_resolution": 10}}
    with patched_params(project, overrides):
        result = run("scale", load_project(), out=str(tmp_path / "out"), sizes="li1")

    (row,) = result["sizes"]
    assert row["region"] == "bench_li1" and row["synthetic"] is False and row["cells"] > 0 and row["area_km2"] > 0
    assert set(row["stages"]) == set(scale.STAGES)
    for stage, r in row["stages"].items():
        for key in ("wall_s", "cpu_s", "peak_rss_mb", "disk_bytes", "items", "items_per_s", "km2_per_s"):
            assert r[key] > 0, (stage, key, r[key])
        assert r["user_s"] >= 0 and r["sys_s"] >= 0
    assert row["stages"]["embed"]["items"] == row["cells"] == row["stages"]["publish"]["items"]
    for stage in [*scale.STAGES, "total"]:
        assert result["fit"][stage]["s_per_km2"] > 0 and result["fit"][stage]["disk_bytes_per_km2"] > 0
        assert result["fit"][stage]["slope_wall"] is None  # one size: no slope
    assert result["capacity"]["germany"]["hours_this_machine"]["total"] > 0
    assert result["encoder"]["kind"] in ("registered champion", "seeded untrained")
    png = Path(result["png"])
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(Path(result["json"]).read_text())["sizes"][0]["cells"] == row["cells"]
    assert result["mlflow_run_id"]
    # nothing left behind: the schema and its import record are gone, and so is the throwaway project
    with cursor(load_project().info) as cur:
        cur.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'bench\\_%%'")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT count(*) FROM loc2vec_meta.imports WHERE region = 'bench_li1'")
        assert cur.fetchone()[0] == 0
    assert not (tmp_path / "out" / "work").exists()


def test_bench_scale_workspace_copies_the_params_file_given(project: Path, tmp_path: Path) -> None:
    """`loc2vec --params P bench scale`: the stages run with P's settings, not the root's params.yaml's (they did
    until 2026-12-05: a bf16 run of the bench embedded in float32)."""
    import yaml

    from benchmarks import scale
    from loc2vec.cli.project import Project

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw.setdefault("embed", {})["batch_size"] = 77
    other = project / "params.other.yaml"
    other.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        given = Project.load(other)
        assert given.paths.params_file == other.resolve()
        scale.make_workspace(given, tmp_path / "work")
    finally:
        other.unlink()
    copied = yaml.safe_load((tmp_path / "work" / "params.yaml").read_text())
    assert copied["embed"]["batch_size"] == 77
    assert load_project().paths.params_file == (project / "params.yaml").resolve()


def test_bench_scale_bad_size_is_one_line() -> None:
    from benchmarks.scale import ScaleError, parse_sizes

    with pytest.raises(ScaleError, match=r"unknown size 'atlantis'"):
        parse_sizes("li10,atlantis", None)
    assert [s.name for s in parse_sizes(None, 200)] == ["li10", "li40", "liechtenstein"]
    assert parse_sizes("andorra_x3", None)[0].synthetic


def test_bench_scale_failed_stage_is_one_line_and_cleans_up(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty cut (a bbox with no OSM data): a stage fails; one line names it, nothing is left behind."""
    from benchmarks import scale
    from loc2vec.cli.bench import run
    from loc2vec.osm.db import cursor

    empty = (0.0, 0.0, 0.01, 0.01)
    monkeypatch.setitem(scale.CATALOGUE, "nowhere", scale.Size("nowhere", "liechtenstein", 1.2, empty))
    with pytest.raises(scale.ScaleError, match=r"^bench scale: \w+ of bench_nowhere failed \(exit \d+\): \S") as err:
        run("scale", load_project(), out=str(tmp_path / "out"), sizes="nowhere")
    assert "\n" not in str(err.value)
    with cursor(load_project().info) as cur:
        cur.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'bench\\_nowhere%%'")
        assert cur.fetchone()[0] == 0
    assert not (tmp_path / "out" / "work").exists()
