"""The 12-channel rasterizer against the real PostGIS import and Mapnik."""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from psycopg2 import sql

from loc2vec.cli.project import Project
from loc2vec.core.config import RenderConfig
from loc2vec.osm.db import ConnInfo, DatabaseError, cursor
from loc2vec.raster.channels import CHANNEL_NAMES, channel_index
from loc2vec.raster.preview import write_preview
from loc2vec.raster.render import RenderError, render_tile

from .conftest import TEST_BBOX, VADUZ
from .fixtures.project import load_project
from .fixtures.trained import patched_params

INSIDE = " AND ST_Within(ST_PointOnSurface(way), ST_Transform(ST_MakeEnvelope(%s, %s, %s, %s, 4326), 3857))"
INNER_BBOX = (TEST_BBOX[0] + 0.003, TEST_BBOX[1] + 0.003, TEST_BBOX[2] - 0.003, TEST_BBOX[3] - 0.003)


Draw = Callable[..., np.ndarray]


@pytest.fixture()
def draw(proj: Project) -> Draw:
    """render_tile with the test project's tile geometry (params render) and database."""
    return functools.partial(render_tile, render=proj.params.render, info=proj.info)


def _lookup(info: ConnInfo, region: str, query: str, *args: object) -> tuple[float, float]:
    """(lat, lon) of a feature found in the imported data, not a hand-typed coordinate."""
    with cursor(info) as cur:
        cur.execute(sql.SQL(query).format(schema=sql.Identifier(region)), args)
        row = cur.fetchone()
    assert row is not None, f"no feature for {query}"
    return float(row[1]), float(row[0])


def _point(expr: str) -> str:
    return f"SELECT ST_X(p), ST_Y(p) FROM (SELECT ST_Transform({expr}, 4326) AS p"


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_vaduz_centre_has_buildings_and_roads(region: str, draw: Draw) -> None:
    tile = draw(region, *VADUZ)
    assert tile.shape == (12, 128, 128) and tile.dtype == np.uint8
    for name in ("buildings", "roads_major", "roads_minor"):
        assert (tile[channel_index(name)] > 0).mean() > 0.02, name


def test_the_rhine_is_water(region: str, draw: Draw, proj: Project) -> None:
    lat, lon = _lookup(
        proj.info,
        region,
        _point("ST_PointOnSurface(way)") + " FROM {schema}.planet_osm_polygon WHERE name = %s AND \"natural\" = 'water'"
        " ORDER BY way_area DESC LIMIT 1) q",
        "Rhein",
    )
    tile = draw(region, lat, lon)
    water = tile[channel_index("water_areas")]
    assert water[60:68, 60:68].min() == 255, "the centre of the Rhine is fully water"
    assert (tile[channel_index("buildings")] > 0).mean() < 0.05


def test_the_railway_through_schaan_is_rail(region: str, draw: Draw, proj: Project) -> None:
    lat, lon = _lookup(
        proj.info,
        region,
        _point("ST_LineInterpolatePoint(ST_LineMerge(way), 0.5)")
        + " FROM {schema}.planet_osm_line WHERE railway = 'rail' AND name LIKE %s ORDER BY osm_id LIMIT 1) q",
        "ÖBB%",
    )
    tile = draw(region, lat, lon)
    rail = tile[channel_index("rail")]
    assert rail[62:66, 62:66].max() > 0, "the railway passes through the tile centre"
    assert 0.005 < (rail > 0).mean() < 0.2, "a railway is a thin line, not an area"


def test_forest_is_green_and_building_is_building(region: str, draw: Draw, proj: Project) -> None:
    lat, lon = _lookup(
        proj.info,
        region,
        _point("ST_PointOnSurface(way)")
        + " FROM {schema}.planet_osm_polygon WHERE landuse = 'forest'"
        + INSIDE
        + " ORDER BY way_area DESC LIMIT 1) q",
        *INNER_BBOX,
    )
    assert draw(region, lat, lon)[channel_index("green"), 64, 64] == 255
    lat, lon = _lookup(
        proj.info,
        region,
        _point("ST_PointOnSurface(way)") + " FROM {schema}.planet_osm_polygon WHERE building IS NOT NULL"
        " AND way_area > 2000" + INSIDE + " ORDER BY way_area DESC LIMIT 1) q",
        *INNER_BBOX,
    )
    assert draw(region, lat, lon)[channel_index("buildings"), 64, 64] == 255


def test_rotation_by_90_degrees(region: str, draw: Draw) -> None:
    base = draw(region, *VADUZ)
    rotated = draw(region, *VADUZ, angle_deg=90)
    checked = 0
    for c, name in enumerate(CHANNEL_NAMES):
        if base[c].any() or rotated[c].any():
            assert _iou(np.rot90(base[c]), rotated[c]) >= 0.8, name
            checked += 1
    assert checked >= 5


def test_rotation_is_drawn_not_resampled(region: str, draw: Draw) -> None:
    """A 30° tile still has full coverage in its corners (the window covers the rotated square)."""
    tile = draw(region, *VADUZ, angle_deg=30)
    landuse = tile[channel_index("commercial_industrial")] | tile[channel_index("residential")]
    assert landuse[:8, :8].any() or landuse[-8:, -8:].any() or tile[channel_index("roads_minor")].any()
    assert not np.array_equal(tile, draw(region, *VADUZ))


@pytest.mark.parametrize("dx_px,dy_px", [(10, 0), (0, 7), (-12, 5)])
def test_shift_moves_content_by_matching_pixels(region: str, dx_px: int, dy_px: int, draw: Draw, proj: Project) -> None:
    mpp = proj.params.render.metres_per_pixel
    assert mpp == 200.0 / 128
    base = draw(region, *VADUZ)
    shifted = draw(region, *VADUZ, shift_m=(dx_px * mpp, dy_px * mpp))
    # the centre moves east by dx → content moves left by dx columns; north by dy → down by dy rows
    expected = np.roll(base, shift=(dy_px, -dx_px), axis=(1, 2))
    m = 16  # ignore the border that rolled around
    for c, name in enumerate(CHANNEL_NAMES):
        if base[c, m:-m, m:-m].any():
            assert _iou(expected[c, m:-m, m:-m], shifted[c, m:-m, m:-m]) >= 0.97, name


@pytest.mark.parametrize(
    "lat,lon,match",
    [
        (float("nan"), 9.52, "latitude"),
        (47.14, float("inf"), "longitude"),
        (91.0, 9.52, "latitude"),
        (47.14, -181.0, "longitude"),
        (0.0, 0.0, "outside region"),
        (47.30, 9.52, "outside region"),
    ],
)
def test_bad_coordinates(region: str, lat: float, lon: float, match: str, draw: Draw) -> None:
    with pytest.raises(RenderError, match=match):
        draw(region, lat, lon)


def test_shift_out_of_the_region_is_an_error(region: str, draw: Draw) -> None:
    """The moved centre must stay inside the region: a tile of nothing is an error, not an empty array."""
    with pytest.raises(RenderError, match=r"shift \(10000.0, 10000.0\) m moves the tile centre out of the region"):
        draw(region, *VADUZ, shift_m=(10000.0, 10000.0))


def test_tile_geometry_is_the_render_config(region: str, draw: Draw, proj: Project) -> None:
    """render_tile draws the window and size its RenderConfig says (params render by default)."""
    small = render_tile(region, *VADUZ, render=RenderConfig(radius_m=50.0, size=64), info=proj.info)
    assert small.shape == (12, 64, 64) and small.dtype == np.uint8
    # half the radius at half the size: the same metres per pixel, so the centre of the full tile
    full = draw(region, *VADUZ)
    assert _iou(small, full[:, 32:96, 32:96]) >= 0.9


def test_region_not_ingested(proj: Project) -> None:
    with pytest.raises(DatabaseError, match="loc2vec ingest --region monaco"):
        render_tile("monaco", 43.73, 7.42, render=proj.params.render, info=proj.info)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loc2vec.cli", *args], capture_output=True, text=True)


def test_cli_render_writes_tile_and_preview(region: str, tmp_path: Path, draw: Draw) -> None:
    out, png = tmp_path / "t.npy", tmp_path / "t.png"
    proc = _cli(
        "render",
        "--region",
        region,
        "--lat",
        str(VADUZ[0]),
        "--lon",
        str(VADUZ[1]),
        "--angle",
        "90",
        "--out",
        str(out),
        "--png",
        str(png),
    )
    assert proc.returncode == 0, proc.stderr
    tile = np.load(out)
    assert tile.shape == (12, 128, 128) and tile.dtype == np.uint8
    np.testing.assert_array_equal(tile, draw(region, *VADUZ, angle_deg=90))
    from PIL import Image

    img = Image.open(png)
    assert img.size == (512, 512) and img.mode == "RGB"


@pytest.mark.parametrize(
    "lat,lon,message",
    [
        ("nan", "9.52", "latitude"),
        ("47.1", "200", "longitude"),
        ("0", "0", "outside region"),
        ("abc", "9.5", "latitude"),
    ],
)
def test_cli_bad_coordinates_exit_nonzero_and_write_nothing(
    region: str, tmp_path: Path, lat: str, lon: str, message: str
) -> None:
    out = tmp_path / "bad.npy"
    proc = _cli("render", "--region", region, "--lat", lat, "--lon", lon, "--out", str(out))
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_render_shift_out_of_the_region_exits_2(region: str, tmp_path: Path) -> None:
    out = tmp_path / "far.npy"
    proc = _cli(
        "render",
        "--region",
        region,
        "--lat",
        str(VADUZ[0]),
        "--lon",
        str(VADUZ[1]),
        "--shift-m",
        "10000",
        "10000",
        "--out",
        str(out),
    )
    assert proc.returncode == 2, proc.stderr
    assert "loc2vec render: error:" in proc.stderr and "shift (10000.0, 10000.0) m" in proc.stderr
    assert "out of the region" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_render_uses_params_render(project: Path, region: str, tmp_path: Path) -> None:
    """`loc2vec render` draws the tile geometry of params.yaml's render section."""
    out = tmp_path / "small.npy"
    with patched_params(project, {"render": {"radius_m": 50.0, "size": 64}}):
        p = load_project()
        assert (p.params.render.radius_m, p.params.render.size) == (50.0, 64)
        proc = _cli("render", "--region", region, "--lat", str(VADUZ[0]), "--lon", str(VADUZ[1]), "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        expected = render_tile(region, *VADUZ, render=p.params.render, info=p.info)
    tile = np.load(out)
    assert tile.shape == (12, 64, 64) and tile.dtype == np.uint8
    np.testing.assert_array_equal(tile, expected)


def test_cli_render_unknown_region_says_ingest(project: Path, tmp_path: Path) -> None:
    proc = _cli("render", "--region", "andorra", "--lat", "42.5", "--lon", "1.5", "--out", str(tmp_path / "a.npy"))
    assert proc.returncode != 0
    assert "loc2vec ingest --region andorra" in proc.stderr


def test_preview_png_for_people(region: str, tmp_path: Path, draw: Draw) -> None:
    path = write_preview(draw(region, *VADUZ), tmp_path / "p.png")
    from PIL import Image

    rgb = np.asarray(Image.open(path))
    assert rgb.shape == (512, 512, 3)
    # the attribution box is drawn in the bottom-right corner
    assert (rgb[-10:, -60:] > 200).all(axis=-1).mean() > 0.3
