"""The fast path (metatiles + torch cutter) against direct Mapnik renders, on the real test import."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from psycopg2 import sql

from loc2vec.cli.project import Project
from loc2vec.core.geo import inner_bbox, lonlat_to_mercator
from loc2vec.osm.db import ConnInfo, cursor, require_import
from loc2vec.raster import cutter
from loc2vec.raster.channels import CHANNEL_NAMES
from loc2vec.raster.cutter import _check_inside, cut_tiles, tile_affines
from loc2vec.raster.grid import MetatileGrid
from loc2vec.raster.metatiles import clear_metatiles, load_index
from loc2vec.raster.render import RenderError, render_tile

from .conftest import TEST_BBOX, VADUZ
from .fixtures.project import ensure_metatiles, metatile_spec

N_SAMPLES = 200
MAX_SHIFT_M = 80.0


def _mapped_points(region: str, n: int, seed: float, info: ConnInfo) -> tuple[np.ndarray, np.ndarray]:
    """n random points on buildings and roads (so tiles are not empty), inside the region's extent shrunk by
    the largest shift (render_tile refuses a shift that moves the tile centre out of the region)."""
    west, south, east, north = inner_bbox(require_import(region, info).bbox, MAX_SHIFT_M + 1.0)
    query = sql.SQL(
        """SELECT ST_Y(p), ST_X(p) FROM (
             SELECT ST_Transform(ST_PointOnSurface(way), 4326) AS p FROM {s}.planet_osm_polygon
              WHERE building IS NOT NULL
             UNION ALL
             SELECT ST_Transform(ST_LineInterpolatePoint(way, random()), 4326) FROM {s}.planet_osm_line
              WHERE highway IS NOT NULL AND ST_GeometryType(way) = 'ST_LineString'
           ) q WHERE ST_X(p) BETWEEN %s AND %s AND ST_Y(p) BETWEEN %s AND %s ORDER BY random() LIMIT %s"""
    ).format(s=sql.Identifier(region))
    with cursor(info) as cur:
        cur.execute("SELECT setseed(%s)", (seed,))
        cur.execute(query, (west, east, south, north, n))
        rows = np.asarray(cur.fetchall(), dtype=np.float64)
    assert len(rows) == n, f"only {len(rows)} mapped points in {region}"
    return rows[:, 0], rows[:, 1]


def _samples(region: str, info: ConnInfo) -> tuple[np.ndarray, ...]:
    lats, lons = _mapped_points(region, N_SAMPLES, 0.42, info)
    rng = np.random.default_rng(7)
    angles = rng.uniform(0.0, 360.0, N_SAMPLES)
    # |shift| in [0, 80] m per axis, in every direction
    shifts = rng.uniform(0.0, MAX_SHIFT_M, (N_SAMPLES, 2)) * rng.choice([-1.0, 1.0], (N_SAMPLES, 2))
    return lats, lons, angles, shifts


def _dilated(tiles: torch.Tensor) -> torch.Tensor:
    """Non-zero masks grown by one pixel (3×3 max-pool): anti-aliased edges may differ by a pixel."""
    return torch.nn.functional.max_pool2d((tiles > 0).float(), 3, stride=1, padding=1) > 0


def _files(directory: Path) -> dict[str, int]:
    """The stored metatiles (zarr arrays) and when their files were written."""
    return {
        p.name: max(f.stat().st_mtime_ns for f in p.rglob("*") if f.is_file()) for p in directory.glob("*.zarr")
    } | {p.name: p.stat().st_mtime_ns for p in directory.glob("*.npy")}


def test_metatiles_are_rendered_only_where_needed(region: str, proj: Project) -> None:
    directory = proj.paths.metatiles(region)
    clear_metatiles(directory)
    index = ensure_metatiles(region, [VADUZ[0]], [VADUZ[1]], project=proj)
    assert index.directory == directory
    assert len(index.rendered) == 1 and len(index) == 1
    key = index.rendered[0]
    assert list(_files(directory)) == [f"{key}.zarr"]
    before = _files(directory)
    again = ensure_metatiles(region, [VADUZ[0], VADUZ[0] + 0.001], [VADUZ[1], VADUZ[1]], project=proj)
    assert again.rendered == () and len(again) == 1
    assert _files(directory) == before, "nothing is re-rendered or rewritten"
    array = again.array(key)
    side = again.grid.side_px
    assert array.shape == (side, side, 12) and array.dtype == np.uint8 and not array.flags.writeable
    assert again.array(key) is array, "decompressed once per process (LRU)"
    stored = sum(f.stat().st_size for f in (directory / f"{key}.zarr").rglob("*") if f.is_file())
    assert stored * 10 < array.nbytes, f"compressed: {stored} bytes for {array.nbytes}"
    saved = json.loads((directory / "index.json").read_text())
    assert saved["version"] == 2 and saved["storage"]["format"] == "zarr"
    meta = saved["metatiles"][key]
    assert meta["mpp"] == pytest.approx(proj.params.render.metres_per_pixel)
    assert saved["signature"]["radius_m"] == proj.params.render.radius_m
    assert meta["minx"] <= lonlat_to_mercator(VADUZ[1], VADUZ[0])[0] <= meta["maxx"]


def test_cut_tiles_match_direct_renders(region: str, proj: Project, record_property) -> None:
    lats, lons, angles, shifts = _samples(region, proj.info)
    index = ensure_metatiles(region, lats, lons, project=proj)
    assert len(index) <= 6, "the test region spans a few metatiles only"
    fast = cut_tiles(index, lats, lons, angles, shifts, device="cpu")
    direct = torch.from_numpy(
        np.stack(
            [
                render_tile(region, lat, lon, render=proj.params.render, info=proj.info, angle_deg=a, shift_m=(dx, dy))
                for lat, lon, a, (dx, dy) in zip(lats, lons, angles, shifts, strict=True)
            ]
        )
    )
    a, b = _dilated(direct), _dilated(fast)
    union = (a | b).sum(dim=(2, 3)).double()
    inter = (a & b).sum(dim=(2, 3)).double()
    present = union > 0  # channels empty in both are skipped
    iou = inter[present] / union[present]
    mean_iou = float(iou.mean())
    per_channel = {
        name: round(float((inter[:, c][present[:, c]] / union[:, c][present[:, c]]).mean()), 3)
        for c, name in enumerate(CHANNEL_NAMES)
        if present[:, c].any()
    }
    raw = ((direct > 0) == (fast > 0)).double().mean()
    print(f"\nfast path vs direct: mean dilated IoU {mean_iou:.4f} over {int(present.sum())} (tile, channel) pairs")
    print(f"per channel: {per_channel}; raw mask pixel agreement {float(raw):.4f}")
    record_property("mean_iou", mean_iou)
    assert present.sum() > N_SAMPLES, "the samples must have mapped content"
    assert mean_iou >= 0.85


def test_cutter_is_deterministic_and_batch_independent(region: str, proj: Project) -> None:
    lats, lons, angles, shifts = (v[:24] for v in _samples(region, proj.info))
    index = ensure_metatiles(region, lats, lons, project=proj)
    first = cut_tiles(index, lats, lons, angles, shifts)
    assert first.shape == (24, 12, 128, 128) and first.dtype == torch.uint8
    again = cut_tiles(index, lats, lons, angles, shifts, device="cpu", out=torch.zeros_like(first))
    assert torch.equal(first.cpu(), again)
    one_by_one = torch.cat(
        [
            cut_tiles(index, lats[i : i + 1], lons[i : i + 1], angles[i : i + 1], shifts[i : i + 1], device="cpu")
            for i in range(24)
        ]
    )
    assert torch.equal(again, one_by_one), "a tile does not depend on its batch"
    rot = cut_tiles(index, lats[:1], lons[:1], [90.0], [(0.0, 0.0)], device="cpu")[0]
    assert rot.permute(1, 2, 0).is_contiguous(), "channels_last memory: the gathered (S, S, 12) layout"
    upright = cut_tiles(index, lats[:1], lons[:1], [0.0], [(0.0, 0.0)], device="cpu")[0]
    agree = (torch.rot90(upright, 1, dims=(1, 2)) == rot).double().mean()
    assert agree > 0.98, "rotating by 90° is np.rot90 (CCW), as render_tile"


def test_accelerator_code_path_gives_the_same_tiles(
    region: str, proj: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batched (GPU) gather, run on CPU tensors, equals the per-tile CPU gather; on CUDA, so do its tiles."""
    lats, lons, angles, shifts = (v[:40] for v in _samples(region, proj.info))
    index = ensure_metatiles(region, lats, lons, project=proj)
    reference = cut_tiles(index, lats, lons, angles, shifts, device="cpu")
    if torch.cuda.is_available():
        on_gpu = cut_tiles(index, lats, lons, angles, shifts, device="cuda")
        assert on_gpu.is_cuda and (on_gpu.cpu() != reference).double().mean() < 1e-3  # float rounding at px edges
    monkeypatch.setattr(cutter, "_gather_cpu", cutter._gather_batched)
    assert torch.equal(cut_tiles(index, lats, lons, angles, shifts, device="cpu"), reference)


def test_bad_input_is_a_clear_error(region: str, proj: Project) -> None:
    with pytest.raises(RenderError, match="outside region"):
        ensure_metatiles(region, [47.5], [9.5], project=proj)
    clear_metatiles(proj.paths.metatiles(region))
    index = ensure_metatiles(region, [VADUZ[0]], [VADUZ[1]], project=proj)
    north_east = (TEST_BBOX[3] - 1e-4, TEST_BBOX[2] - 1e-4)
    assert index.keys_for([north_east[0]], [north_east[1]]) != index.keys_for([VADUZ[0]], [VADUZ[1]])
    with pytest.raises(RenderError, match="max_shift_m"):
        cut_tiles(index, [VADUZ[0]], [VADUZ[1]], [0.0], [(MAX_SHIFT_M + 1, 0.0)])
    with pytest.raises(RenderError, match="shape"):
        cut_tiles(index, [VADUZ[0]], [VADUZ[1]], [0.0, 1.0], [(0.0, 0.0)])
    with pytest.raises(RenderError, match="outside region"):
        cut_tiles(index, [47.5], [9.5], [0.0], [(0.0, 0.0)])
    with pytest.raises(RenderError, match="ensure_metatiles"):  # inside, but its metatile was never rendered
        cut_tiles(index, [north_east[0]], [north_east[1]], [0.0], [(0.0, 0.0)])


def test_stale_metatiles_are_invalidated(region: str, proj: Project) -> None:
    directory, spec = proj.paths.metatiles(region), metatile_spec(proj)
    index = ensure_metatiles(region, [VADUZ[0]], [VADUZ[1]], project=proj)
    path = directory / "index.json"
    saved = json.loads(path.read_text())
    saved["signature"]["radius_m"] = 50.0  # as if rendered with other tile params
    path.write_text(json.dumps(saved))
    assert len(load_index(region, spec, directory, proj.info)) == 0 and not _files(directory)
    assert len(ensure_metatiles(region, [VADUZ[0]], [VADUZ[1]], project=proj).rendered) == 1
    assert index.grid == load_index(region, spec, directory, proj.info).grid


def test_a_reimport_of_the_same_extract_keeps_the_metatiles(region: str, proj: Project) -> None:
    """The index names the import by its extract's sha256 and import format, never by when it happened: the
    metatiles are a DVC output, and a re-import (or another machine's import) of the same extract must give the
    same bytes, or `render@R` and everything after it (training) would run again for nothing."""
    from loc2vec.raster import metatiles

    directory, spec = proj.paths.metatiles(region), metatile_spec(proj)
    rendered = ensure_metatiles(region, [VADUZ[0]], [VADUZ[1]], project=proj)
    saved = (directory / "index.json").read_bytes()
    table = sql.SQL("{}.imports").format(sql.Identifier(proj.info.meta_schema))
    shift = sql.SQL("UPDATE {} SET imported_at = imported_at + %s::interval WHERE region = %s").format(table)
    with cursor(proj.info) as cur:
        cur.execute(shift, ("1 day", region))  # what a re-import of the same extract changes in the record
    try:
        metatiles._INDEXES.clear()
        assert sorted(load_index(region, spec, directory, proj.info).entries) == sorted(rendered.entries)
        assert (directory / "index.json").read_bytes() == saved
    finally:
        with cursor(proj.info) as cur:
            cur.execute(shift, ("-1 day", region))
        metatiles._INDEXES.clear()


def test_raw_npy_metatiles_of_an_older_loc2vec_are_converted(region: str, proj: Project) -> None:
    """A cache in the raw layout (index version 1, one .npy per metatile) is converted to zarr on load, never
    misread, and cuts the same tiles; one whose signature no longer holds is removed and re-rendered."""
    from loc2vec.raster import metatiles

    lats, lons, angles, shifts = (v[:24] for v in _samples(region, proj.info))
    directory, spec = proj.paths.metatiles(region), metatile_spec(proj)
    index = ensure_metatiles(region, lats, lons, project=proj)
    reference = cut_tiles(index, lats, lons, angles, shifts, device="cpu")
    saved = json.loads((directory / "index.json").read_text())
    for key in saved["metatiles"]:  # write the cache as an older loc2vec did
        np.save(directory / f"{key}.npy", index.array(key))
        shutil.rmtree(directory / f"{key}.zarr")
    raw = {k: v for k, v in saved.items() if k != "storage"} | {"version": 1}
    (directory / "index.json").write_text(json.dumps(raw))
    metatiles._INDEXES.clear()
    converted = load_index(region, spec, directory, proj.info)
    assert sorted(converted.entries) == sorted(saved["metatiles"]) and not list(directory.glob("*.npy"))
    assert json.loads((directory / "index.json").read_text())["version"] == 2
    assert torch.equal(cut_tiles(converted, lats, lons, angles, shifts, device="cpu"), reference)

    key = next(iter(saved["metatiles"]))
    np.save(directory / f"{key}.npy", converted.array(key))
    (directory / "index.json").write_text(json.dumps(raw | {"signature": {**raw["signature"], "radius_m": 50.0}}))
    metatiles._INDEXES.clear()
    assert len(load_index(region, spec, directory, proj.info)) == 0 and not _files(directory), "stale: removed"


@pytest.mark.parametrize("lat", [-60.0, 0.1, 47.13, 70.0])
def test_margin_covers_every_rotation_and_shift(lat: float) -> None:
    """Pure geometry: any tile of a location in a core (max shift, any angle) lies in its metatile."""
    grid = MetatileGrid(radius_m=100.0, size=128, core_px=2048, max_shift_m=MAX_SHIFT_M)
    rng = np.random.default_rng(1)
    row, col = (int(v[0]) for v in grid.rows_cols(np.array([lat]), np.array([9.5])))
    meta = grid.metatile(row, col)
    phi0, phi1 = row * grid.core_m / 6378137.0, (row + 1) * grid.core_m / 6378137.0
    core_lon = np.degrees(np.array([col, col + 1]) * grid.core_m * meta.scale / 6378137.0)
    n = 4000
    lats = np.degrees(rng.uniform(phi0, phi1, n))
    lons = rng.uniform(core_lon[0], core_lon[1], n)
    rows, cols = grid.rows_cols(lats, lons)
    assert (rows == row).all() and (cols == col).all(), "the core is exactly the cell the grid maps to"
    angles = rng.choice([0.0, 45.0, 135.0, 225.0, 315.0, *rng.uniform(0, 360, 5)], n)
    shifts = rng.choice([-MAX_SHIFT_M, MAX_SHIFT_M], (n, 2))
    one = np.ones(n)
    aff = tile_affines(
        lats, lons, angles, shifts, 128, meta.minx * one, meta.maxy * one, meta.units_per_px * one, meta.mpp
    )
    _check_inside(aff, 128, meta.width, meta.height)  # raises if a sample falls outside
    assert meta.width == 2048 + 2 * grid.margin_px
    assert grid.margin_px == math.ceil((MAX_SHIFT_M + math.sqrt(2) * 100.0) / 1.5625) + 2
    step = aff[:, 1] ** 2 + aff[:, 2] ** 2
    assert np.abs(np.sqrt(step) - 1.0).max() < 2e-3, "one metatile row's scale fits its whole core"
