"""`render.poi_style: groups`: each POI group's dots at its own level, on every path that draws tiles."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

from loc2vec.cli.project import Project
from loc2vec.core.config import parse_params
from loc2vec.core.errors import ConfigError
from loc2vec.core.geo import inner_bbox
from loc2vec.core.names import validate_region_name
from loc2vec.osm.db import ConnInfo, cursor, require_import
from loc2vec.raster import metatiles
from loc2vec.raster.channels import CHANNELS, POI_GROUPS, channel_index, channels_for
from loc2vec.raster.cutter import cut_tiles
from loc2vec.raster.metatiles import MetatileSpec
from loc2vec.raster.render import HiddenObject, render_tile

POIS = channel_index("pois")
ISOLATED_M = 15.0  # no other POI dot within this distance: the dot's peak is its own level


def _grouped(project: Project) -> Project:
    render = project.params.render.model_copy(update={"poi_style": "groups"})
    return dataclasses.replace(project, params=project.params.model_copy(update={"render": render}))


def _isolated_pois(region: str, info: ConnInfo) -> list[tuple[float, float, float, int]]:
    """(lat, lon, level, node id) of one isolated point POI per level present in the region (the grouped
    channel's own query, so the level is the one it draws)."""
    grouped = channels_for("groups")[POIS].sql.format(schema=f'"{validate_region_name(region)}"')
    point_part = grouped.split(" UNION ALL ")[0].replace("SELECT way,", "SELECT osm_id, way,", 1)
    west, south, east, north = inner_bbox(require_import(region, info).bbox, 150.0)
    query = f"""
        WITH p AS ({grouped}), q AS ({point_part})
        SELECT DISTINCT ON (q.o) ST_Y(g), ST_X(g), q.o, q.osm_id FROM q, ST_Transform(q.way, 4326) AS g
         WHERE ST_X(g) BETWEEN %s AND %s AND ST_Y(g) BETWEEN %s AND %s
           AND (SELECT count(*) FROM p WHERE ST_DWithin(p.way, q.way, %s / cos(radians(ST_Y(g))))) = 1
         ORDER BY q.o, q.osm_id"""
    with cursor(info) as cur:
        cur.execute(query, (west, east, south, north, ISOLATED_M))
        return [(float(a), float(b), float(c), int(d)) for a, b, c, d in cur.fetchall()]


def test_each_group_draws_at_its_level_and_flat_draws_them_all_full(region: str, proj: Project) -> None:
    grouped = _grouped(proj)
    found = _isolated_pois(region, proj.info)
    assert len(found) >= 8, f"the test region holds isolated POIs of most levels, found {found}"
    levels = {round((k + 2) / (len(POI_GROUPS) + 1), 4) for k in range(len(POI_GROUPS))} | {0.1}
    for lat, lon, level, node in found:
        assert round(level, 4) in levels
        tile = render_tile(region, lat, lon, render=grouped.params.render, info=proj.info)
        peak = int(tile[POIS, 60:68, 60:68].max())
        assert abs(peak - round(255 * level)) <= 2, f"node {node}: level {level} drawn at {peak}"
        flat = render_tile(region, lat, lon, render=proj.params.render, info=proj.info)
        others = [c for c in range(len(CHANNELS)) if c != POIS]
        assert np.array_equal(tile[others], flat[others]), "only the POI channel depends on the style"
        if level != 0.1 or flat[POIS, 60:68, 60:68].max() > 0:  # a group's place the flat channel also draws
            assert flat[POIS, 60:68, 60:68].max() in (0, 255)
        hidden = render_tile(
            region, lat, lon, render=grouped.params.render, info=proj.info, hidden=HiddenObject("point", node)
        )
        assert hidden[POIS, 60:68, 60:68].max() == 0, f"node {node}: hidden from its masked scene"


def test_grouped_metatiles_cut_what_the_renderer_draws(region: str, proj: Project, tmp_path: Path) -> None:
    """The fast path cuts the levels the direct render draws (a separate metatile directory: the test project's
    flat metatiles stay valid)."""
    grouped = _grouped(proj)
    found = _isolated_pois(region, proj.info)
    lats, lons = np.array([f[0] for f in found]), np.array([f[1] for f in found])
    paths = dataclasses.replace(proj.paths, root=tmp_path)
    spec = MetatileSpec.from_config(grouped.params.render, grouped.params.augment, grouped.params.tiles)
    flat_spec = MetatileSpec.from_config(proj.params.render, proj.params.augment, proj.params.tiles)
    index = metatiles.ensure_metatiles(
        region, lats, lons, spec=spec, paths=paths, info=proj.info, orchestrate=proj.params.orchestrate
    )
    record = require_import(region, proj.info)
    assert index.signature["channels"] != metatiles._signature(record, flat_spec.grid, "flat")["channels"]
    zeros = np.zeros(len(lats))
    cut = cut_tiles(index, lats, lons, zeros, np.zeros((len(lats), 2)), device="cpu").numpy()
    for i, (_, _, level, node) in enumerate(found):
        peak = int(cut[i, POIS, 60:68, 60:68].max())
        assert abs(peak - round(255 * level)) <= 2, f"node {node}: level {level} cut as {peak}"


def test_preset_article_is_flat_and_a_bad_style_is_refused(proj: Project, tmp_path: Path) -> None:
    assert channels_for("flat") is CHANNELS
    groups = channels_for("groups")
    assert [c.name for c in groups] == [c.name for c in CHANNELS] and groups[POIS].leveled
    assert all(a is b for i, (a, b) in enumerate(zip(groups, CHANNELS, strict=True)) if i != POIS)
    data = yaml.safe_load(proj.paths.params_file.read_text())
    data["render"]["poi_style"] = "groups"
    assert parse_params(data, proj.paths.root).render.poi_style == "groups"
    assert parse_params({**data, "preset": "article"}, proj.paths.root).render.poi_style == "flat"
    data["render"]["poi_style"] = "icons"
    with pytest.raises(ConfigError, match="poi_style"):
        parse_params(data, proj.paths.root)
    with pytest.raises(ValueError, match="unknown poi_style"):
        channels_for("icons")  # type: ignore[arg-type]
