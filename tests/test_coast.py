"""Coasts and the sea against the real PostGIS server, osm2pgsql and Mapnik: a bbox cut of the Monaco extract.

Land and water polygons built at ingest from the coastline (osm/coast.py), the sea drawn as water, the open
sea recognised as empty by the low-information rule and the land mask, cells and uniform locations drawn
from the land; an extract without coastline, a coastline cut short inside the extract, a broken one, a
failed coastline step and an import made before the land/water polygons existed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from psycopg2 import sql

from loc2vec.cli.project import Project
from loc2vec.core.geo import inner_bbox, to_mercator
from loc2vec.embedding.cells import EmbedError, candidate_cells, land_cells, on_mapped_land, select_cells
from loc2vec.osm import ingest as ingest_module
from loc2vec.osm.coast import LAND_TABLE, MAX_VERTICES, WATER_TABLE, build_land_water
from loc2vec.osm.db import IMPORT_FORMAT, ConnInfo, DatabaseError, cursor, get_import, require_import
from loc2vec.osm.extracts import IngestError
from loc2vec.raster.channels import CHANNELS, channel_index
from loc2vec.raster.preview import composite_rgb
from loc2vec.raster.render import render_tile
from loc2vec.sampling.candidates import Candidates
from loc2vec.sampling.information import information

from .conftest import MONACO_BBOX, MONACO_INLAND_BBOX, _shared_pbf, cut_pbf
from .fixtures.project import ingest_region

OFFSHORE = (43.7300, 7.4310)  # 300 m off Port Hercule's outer mole: open sea all round the tile
HARBOUR = (43.7347, 7.4225)  # Port Hercule's west quay: the basin, the quay, Boulevard Albert 1er
PALACE = (43.7314, 7.4198)  # the Prince's Palace on the Rock
CASINO = (43.7394, 7.4276)  # Monte-Carlo's casino
HARBOUR_BASIN = (43.7347, 7.4255)  # the middle of Port Hercule's basin
WATER = channel_index("water_areas")


def _point_sql(lat: float, lon: float) -> tuple[str, tuple[float, float]]:
    x, y = to_mercator(lon, lat)
    return "ST_SetSRID(ST_MakePoint(%s, %s), 3857)", (float(x), float(y))


def _in_table(info: ConnInfo, region: str, table: str, lat: float, lon: float) -> bool:
    pt, args = _point_sql(lat, lon)
    with cursor(info) as cur:
        cur.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {}.{} WHERE ST_Intersects(way, " + pt + "))").format(
                sql.Identifier(region), sql.Identifier(table)
            ),
            args,
        )
        return bool(cur.fetchone()[0])


def _stats(info: ConnInfo, region: str, table: str) -> tuple[int, float, int]:
    """(pieces, km² on the sphere, most vertices in one piece) of a land/water table."""
    with cursor(info) as cur:
        cur.execute(
            sql.SQL(
                "SELECT count(*), coalesce(sum(ST_Area(geography(ST_Transform(way, 4326)))), 0) / 1e6,"
                " coalesce(max(ST_NPoints(way)), 0) FROM {}.{}"
            ).format(sql.Identifier(region), sql.Identifier(table))
        )
        n, km2, most = cur.fetchone()
    return int(n), float(km2), int(most)


def _bbox_km2(info: ConnInfo, bbox: tuple[float, float, float, float]) -> float:
    with cursor(info) as cur:
        cur.execute("SELECT ST_Area(geography(ST_MakeEnvelope(%s, %s, %s, %s, 4326))) / 1e6", bbox)
        return float(cur.fetchone()[0])


@pytest.fixture()
def draw(proj: Project) -> Callable[..., np.ndarray]:
    return functools.partial(render_tile, render=proj.params.render, info=proj.info)


# ---------------------------------------------------------------- ingest: land and water polygons


def test_import_has_land_and_water_polygons(coast_region: str, proj: Project) -> None:
    info = proj.info
    assert get_import(coast_region, info).import_format == IMPORT_FORMAT
    land, sea = _stats(info, coast_region, LAND_TABLE), _stats(info, coast_region, WATER_TABLE)
    assert land[0] > 0 and sea[0] > 0
    assert max(land[2], sea[2]) <= MAX_VERTICES + 1  # pieces small enough for a tile's query
    # land and water partition the extract: their areas add up to the bbox, and they do not overlap
    assert land[1] + sea[1] == pytest.approx(_bbox_km2(info, MONACO_BBOX), rel=1e-4)
    assert 0.3 < sea[1] / (land[1] + sea[1]) < 0.7
    with cursor(info) as cur:
        cur.execute(
            sql.SQL(
                "SELECT coalesce(sum(ST_Area(ST_Intersection(l.way, w.way))), 0) FROM {s}.{l} l"
                " JOIN {s}.{w} w ON ST_Intersects(l.way, w.way)"
            ).format(s=sql.Identifier(coast_region), l=sql.Identifier(LAND_TABLE), w=sql.Identifier(WATER_TABLE))
        )
        assert cur.fetchone()[0] < 1.0  # m² (Mercator): shared edges only
    for point in (OFFSHORE, HARBOUR_BASIN):
        assert _in_table(info, coast_region, WATER_TABLE, *point)
        assert not _in_table(info, coast_region, LAND_TABLE, *point)
    for point in (PALACE, CASINO):
        assert _in_table(info, coast_region, LAND_TABLE, *point)


def test_coastline_cut_short_inside_the_extract(project: Path, coast_region: str, proj: Project, tmp_path: Path):
    """A cut that keeps only what lies inside it (`-s simple`) ends the coastline short of the edge (here up to
    700 m: the ways crossing the edge are gone): the open ends are joined straight to the bbox boundary, and
    land and sea come out as with complete ways away from those joins."""
    pbf = cut_pbf(_shared_pbf("monaco"), MONACO_BBOX, tmp_path / "simple.osm.pbf", strategy="simple")
    region = "test_mc_simple"
    try:
        ingest_region(region, pbf, project=proj)
        with cursor(proj.info) as cur:  # the coastline really ends inside the bbox
            cur.execute(
                sql.SQL(
                    """SELECT count(*) FROM {}.planet_osm_line l WHERE l."natural" = 'coastline'
                       AND ST_Contains(ST_Transform(ST_MakeEnvelope(%s, %s, %s, %s, 4326), 3857),
                                       ST_Collect(ST_StartPoint(l.way), ST_EndPoint(l.way)))"""
                ).format(sql.Identifier(region)),
                MONACO_BBOX,
            )
            assert cur.fetchone()[0] > 0
        for point in (OFFSHORE, HARBOUR_BASIN):
            assert _in_table(proj.info, region, WATER_TABLE, *point)
        for point in (PALACE, CASINO):
            assert _in_table(proj.info, region, LAND_TABLE, *point)
        sea, reference = _stats(proj.info, region, WATER_TABLE)[1], _stats(proj.info, coast_region, WATER_TABLE)[1]
        assert sea == pytest.approx(reference, rel=0.1)
    finally:
        _drop_schemas(proj.info, region)


def test_extract_without_coastline_still_imports(
    project: Path, proj: Project, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pbf = cut_pbf(_shared_pbf("monaco"), MONACO_INLAND_BBOX, tmp_path / "inland.osm.pbf")
    region = "test_mc_inland"
    try:
        with caplog.at_level(logging.WARNING, logger="loc2vec.osm.coast"):
            result = ingest_region(region, pbf, project=proj)
        assert result.changed and "no coastline" in result.message
        assert any("no coastline" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
        assert _stats(proj.info, region, WATER_TABLE)[0] == 0
        pieces, km2, _ = _stats(proj.info, region, LAND_TABLE)
        assert pieces == 1 and km2 == pytest.approx(_bbox_km2(proj.info, MONACO_INLAND_BBOX), rel=1e-6)
        # no sea: the cells are the inner bbox's, exactly as before coasts existed
        radius, res = proj.params.render.radius_m, proj.params.embed.h3_resolution
        box = inner_bbox(get_import(region, proj.info).bbox, radius)
        assert land_cells(region, box, res, radius, 10**9, proj.info) == candidate_cells(box, res)
    finally:
        _drop_schemas(proj.info, region)


# ---------------------------------------------------------------- tiles: the sea is water


def test_tile_300_m_offshore_is_sea(coast_region: str, draw) -> None:
    tile = draw(coast_region, *OFFSHORE)
    on = (tile > 0).mean(axis=(1, 2))
    assert on[WATER] > 0.9
    assert np.delete(on, WATER).sum() == 0, "nothing but sea out there"
    assert tile[WATER].min() == 255, "the sea's pieces are dissolved: no anti-aliased seam between them"
    # the composite preview (and the exploration map, which composites the same channels) shows it blue
    rgb = composite_rgb(tile)
    assert (rgb == np.asarray(CHANNELS[WATER].colour, np.uint8)).all()


def test_exploration_map_shows_the_sea(coast_region: str, proj: Project) -> None:
    """The PCA map's base layer (explore/map.py) composites the same channels: the sea is blue there too."""
    from loc2vec.explore.map import MapGrid, render_base

    lat, lon = OFFSHORE
    x, y = to_mercator(lon, lat)
    upp = 8.0 / math.cos(math.radians(lat))  # 8 true metres per pixel, 64 × 64 px around the offshore point
    grid = MapGrid(x0=float(x) - 32 * upp, y1=float(y) + 32 * upp, upp=upp, width=64, height=64)
    base = render_base(coast_region, grid, proj.info)
    assert (base == np.asarray(CHANNELS[WATER].colour, np.uint8)).all(axis=-1).mean() > 0.99


def test_harbour_tile_shows_water_and_land(coast_region: str, draw) -> None:
    on = dict(zip((c.name for c in CHANNELS), (draw(coast_region, *HARBOUR) > 0).mean(axis=(1, 2)), strict=True))
    assert 0.2 < on["water_areas"] < 0.8
    assert on["roads_major"] + on["roads_minor"] > 0.05
    assert on["buildings"] > 0 and on["paths"] > 0


def test_open_sea_is_low_information_and_not_mapped_land(coast_region: str, proj: Project) -> None:
    cfg, render = proj.params.sample, proj.params.render
    lat, lon = np.array([OFFSHORE[0], HARBOUR[0]]), np.array([OFFSHORE[1], HARBOUR[1]])
    scored = information(coast_region, lat, lon, cfg, render=render, info=proj.info)
    sea, harbour = scored.iloc[0], scored.iloc[1]
    assert sea["coverage"] > 0.9 and sea["coverage_without_water"] == 0 and not sea["keep"]
    assert harbour["keep"] and harbour["coverage_without_water"] > cfg.min_coverage
    assert on_mapped_land(coast_region, lat, lon, render.radius_m, proj.info).tolist() == [False, True]


# ---------------------------------------------------------------- cells and uniform locations from the land


def test_cells_come_from_the_land(coast_region: str, proj: Project) -> None:
    cfg, radius, info = proj.params.embed, proj.params.render.radius_m, proj.info
    box = inner_bbox(get_import(coast_region, info).bbox, radius)
    bbox_cells = candidate_cells(box, cfg.h3_resolution)
    land = land_cells(coast_region, box, cfg.h3_resolution, radius, cfg.max_cells, info)
    assert len(land) < 0.75 * len(bbox_cells), "the sea's cells are no candidates"

    # max_cells is checked on the land's cells: a limit the bbox would exceed is enough
    fits = cfg.model_copy(update={"max_cells": len(land)})
    assert len(bbox_cells) > fits.max_cells
    cells, lats, lons = select_cells(coast_region, fits, radius, info)
    assert 0 < len(cells) <= len(land)
    with pytest.raises(EmbedError, match="exceed embed.max_cells"):
        select_cells(coast_region, cfg.model_copy(update={"max_cells": len(land) - 1}), radius, info)

    # no embedded cell lies offshore beyond the tile radius; cells on the water by the shore (harbour basins,
    # piers, within radius/2 of the seaside promenades) are kept, as they were before coasts
    x, y = to_mercator(lons, lats)
    reach = radius / np.cos(np.radians(lats))
    with cursor(info) as cur:
        cur.execute(
            sql.SQL(
                """SELECT count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM {s}.{l} a WHERE ST_DWithin(a.way, q.pt, p.r))),
                          count(*) FILTER (WHERE EXISTS (SELECT 1 FROM {s}.{w} b WHERE ST_Intersects(b.way, q.pt)))
                   FROM unnest(%s::float8[], %s::float8[], %s::float8[]) AS p(x, y, r)
                   CROSS JOIN LATERAL (SELECT ST_SetSRID(ST_MakePoint(p.x, p.y), 3857) AS pt) q"""
            ).format(s=sql.Identifier(coast_region), l=sql.Identifier(LAND_TABLE), w=sql.Identifier(WATER_TABLE)),
            (x.tolist(), y.tolist(), reach.tolist()),
        )
        beyond, on_water = cur.fetchone()
    assert beyond == 0
    assert 0 < on_water < 0.2 * len(cells)


def test_uniform_locations_are_on_land_and_deterministic(coast_region: str, proj: Project) -> None:
    radius, info = proj.params.render.radius_m, proj.info
    box = inner_bbox(get_import(coast_region, info).bbox, radius)

    def draw(seed: int) -> np.ndarray:
        return Candidates(coast_region, box, radius, seed, info).draw("uniform", 120)

    pts = draw(3)
    assert len(pts) == 120
    assert np.array_equal(pts, draw(3)) and not np.array_equal(pts, draw(4))
    on_land = [_in_table(info, coast_region, LAND_TABLE, lat, lon) for lon, lat in pts]
    assert all(on_land)
    # spread over the land, not bunched: both the Rock and Monte-Carlo get points
    assert (pts[:, 0] < 7.422).any() and (pts[:, 0] > 7.428).any()


# ---------------------------------------------------------------- the coastline step, on synthetic coastlines

SYNTH_BBOX = (0.0, 0.0, 0.01, 0.01)  # ~1.1 km square at the equator: Mercator 0..1113 m


@pytest.fixture()
def synthetic(proj: Project) -> Iterator[Callable[..., object]]:
    """build_land_water on hand-made coastline ways (Mercator WKT) in a schema shaped like osm2pgsql's."""
    schema = "test_synthetic_coast"
    info = proj.info

    def build(lines: tuple[str, ...] = (), polygons: tuple[str, ...] = ()):
        _drop_schemas(info, schema)
        with cursor(info) as cur:
            s = sql.Identifier(schema)
            cur.execute(sql.SQL("CREATE SCHEMA {}").format(s))
            for table, rows in (("planet_osm_line", lines), ("planet_osm_polygon", polygons)):
                t = sql.Identifier(table)
                cur.execute(sql.SQL('CREATE TABLE {}.{} (osm_id bigint, "natural" text, way geometry)').format(s, t))
                for i, wkt in enumerate(rows):
                    cur.execute(
                        sql.SQL("INSERT INTO {}.{} VALUES (%s, 'coastline', ST_GeomFromText(%s, 3857))").format(s, t),
                        (i + 1, wkt),
                    )
        return build_land_water(schema, SYNTH_BBOX, info)

    build.schema = schema  # type: ignore[attr-defined]
    yield build
    _drop_schemas(info, schema)


def _side(info: ConnInfo, schema: str, x: float, y: float) -> str:
    with cursor(info) as cur:
        cur.execute(
            sql.SQL(
                "SELECT EXISTS (SELECT 1 FROM {s}.{l} WHERE ST_Intersects(way, ST_SetSRID(ST_MakePoint(%s, %s), 3857))),"
                " EXISTS (SELECT 1 FROM {s}.{w} WHERE ST_Intersects(way, ST_SetSRID(ST_MakePoint(%s, %s), 3857)))"
            ).format(s=sql.Identifier(schema), l=sql.Identifier(LAND_TABLE), w=sql.Identifier(WATER_TABLE)),
            (x, y, x, y),
        )
        land, water = cur.fetchone()
    assert land != water, "every point is land or water, never both"
    return "land" if land else "water"


def test_land_is_left_of_the_coastline(synthetic, proj: Project) -> None:
    schema = synthetic.schema
    result = synthetic(lines=("LINESTRING(-200 500, 1300 500)",))  # west → east: land to the north
    assert (result.land_faces, result.water_faces, result.broken_faces) == (1, 1, 0)
    assert (_side(proj.info, schema, 500, 800), _side(proj.info, schema, 500, 200)) == ("land", "water")
    synthetic(lines=("LINESTRING(1300 500, -200 500)",))  # east → west: land to the south
    assert (_side(proj.info, schema, 500, 800), _side(proj.info, schema, 500, 200)) == ("water", "land")


def test_islands_open_ends_and_a_broken_coastline(synthetic, proj: Project, caplog) -> None:
    schema, info = synthetic.schema, proj.info
    # mainland to the north (its way ends 30 m short of both edges, as a cut extract's does), an island in the sea
    result = synthetic(
        lines=("LINESTRING(30 600, 1083 600)",),
        polygons=("POLYGON((400 150, 600 150, 600 300, 400 300, 400 150))",),
    )
    assert result.broken_faces == 0
    assert [_side(info, schema, *p) for p in ((500, 900), (500, 400), (500, 200), (10, 400))] == [
        "land",
        "water",
        "land",
        "water",
    ]
    # a gap in the coastline lets land and sea run together: classified by the majority, and logged
    with caplog.at_level(logging.WARNING, logger="loc2vec.osm.coast"):
        result = synthetic(lines=("LINESTRING(-200 600, 500 600)", "LINESTRING(600 300, 1300 300)"))
    assert result.broken_faces > 0
    assert any("broken" in r.getMessage() for r in caplog.records)


def test_no_coastline_is_all_land(synthetic, proj: Project, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="loc2vec.osm.coast"):
        result = synthetic()
    assert not result.has_coastline and result.water_pieces == 0 and result.land_pieces == 1
    assert _side(proj.info, synthetic.schema, 500, 500) == "land"
    assert any("no coastline" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- atomicity and re-import of old imports


def _drop_schemas(info: ConnInfo, *schemas: str) -> None:
    with cursor(info) as cur:
        for schema in schemas:
            cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def test_failed_coastline_step_leaves_previous_import_intact(
    coast_region: str, monaco_pbf: Path, proj: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coastline step fails for real (its input table is gone): nothing of the previous import changes."""
    info = proj.info
    before = get_import(coast_region, info)
    tables = {t: _stats(info, coast_region, t) for t in (LAND_TABLE, WATER_TABLE)}
    real = ingest_module.build_land_water

    def failing(schema: str, bbox, info: ConnInfo):
        with cursor(info) as cur:
            cur.execute(sql.SQL("DROP TABLE {}.planet_osm_line").format(sql.Identifier(schema)))
        return real(schema, bbox, info)

    monkeypatch.setattr(ingest_module, "build_land_water", failing)
    with pytest.raises(IngestError, match="coastline"):
        ingest_region(coast_region, monaco_pbf, force=True, project=proj)
    assert get_import(coast_region, info) == before
    assert {t: _stats(info, coast_region, t) for t in tables} == tables
    with cursor(info) as cur:
        cur.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (f"{coast_region}__staging",))
        assert cur.fetchone()[0] == 0, "the staging schema must be cleaned up"


def test_import_of_an_older_format_is_reimported(monaco_pbf: Path, proj: Project) -> None:
    """A database from before the land/water polygons: no import_format column, no such tables."""
    info = dataclasses.replace(proj.info, meta_schema="test_meta_v1")
    old = Project(proj.params, proj.paths, info)
    region = "test_mc_v1"
    try:
        ingest_region(region, monaco_pbf, project=old)
        with cursor(info) as cur:  # what the code before import formats left behind
            cur.execute("ALTER TABLE test_meta_v1.imports DROP COLUMN import_format")
            cur.execute(
                sql.SQL("DROP TABLE {s}.{l}, {s}.{w}").format(
                    s=sql.Identifier(region), l=sql.Identifier(LAND_TABLE), w=sql.Identifier(WATER_TABLE)
                )
            )
        record = get_import(region, info)
        assert record is not None and record.import_format == 1 and not record.current
        with pytest.raises(DatabaseError, match=r"older loc2vec.*loc2vec ingest --region test_mc_v1"):
            require_import(region, info)

        result = ingest_region(region, monaco_pbf, project=old)  # same extract: re-imported all the same
        assert result.changed
        assert require_import(region, info).import_format == IMPORT_FORMAT
        assert _stats(info, region, WATER_TABLE)[0] > 0
        assert not ingest_region(region, monaco_pbf, project=old).changed, "and then it is up to date"
    finally:
        _drop_schemas(info, region, "test_meta_v1")
