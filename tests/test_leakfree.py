"""Leak-free tasks on the real test region: the labelled object is gone from the masked scene, and only it.

Each check compares the scene rendered/counted with and without the label's object hidden. What the
object looks like is taken from PostGIS independently of the masking code: the rows of each channel's
own SQL whose geometry equals the object's, with their drawn width.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd
import pytest
from psycopg2 import sql

from loc2vec.cli.project import Project
from loc2vec.core.geo import lonlat_to_mercator, mercator_scale
from loc2vec.evaluation.featuresets import EXTRA_LINES, LAND_COVER, TAG_COLUMNS
from loc2vec.evaluation.labels import TRANSPORT_MODES, VENUE_GROUPS
from loc2vec.evaluation.leakfree import (
    KEEP_CHANNELS,
    MASKED_TASKS,
    SURFACE_GROUPS,
    building_coverage,
    make_leakfree_labels,
    surface_coverage,
)
from loc2vec.evaluation.scene import hidden_of, nearest_way, scene_tag_counts, scene_tiles
from loc2vec.osm.db import cursor
from loc2vec.raster.channels import CHANNELS, HIDE_VARIABLES, maskable_sql
from loc2vec.raster.render import HiddenObject, RenderError, get_renderer, render_tile

from .fixtures.project import evaluation_context

SAMPLE = 12  # labels looked at per task


@functools.cache
def _labels(region: str, task: str) -> pd.DataFrame:
    p = Project.load()
    cfg = p.params.evaluate.labels.model_copy(
        update={
            "seed": 3,
            "transport_per_class": 30,
            "venue_per_class": 20,
            "building_per_class": 20,
            "surface_per_class": 20,
            "min_per_class": 5,
        }
    )
    return make_leakfree_labels(region, task, cfg, evaluation_context(p).labels)


def _object_geometries(proj: Project, region: str, hidden: HiddenObject) -> list[bytes]:
    """WKB of every row osm2pgsql stored for the object (and an area's point on surface, its POI marker)."""
    tables = ["planet_osm_point"] if hidden.table == "point" else ["planet_osm_line", "planet_osm_polygon"]
    parts = [
        sql.SQL("SELECT ST_AsBinary(way) FROM {s}.{t} WHERE osm_id = %(id)s").format(
            s=sql.Identifier(region), t=sql.Identifier(t)
        )
        for t in tables
    ]
    if hidden.table == "way":
        parts.append(
            sql.SQL(
                "SELECT ST_AsBinary(ST_PointOnSurface(way)) FROM {s}.planet_osm_polygon WHERE osm_id = %(id)s"
            ).format(s=sql.Identifier(region))
        )
    with cursor(proj.info) as cur:
        cur.execute(sql.SQL(" UNION ALL ").join(parts), {"id": hidden.osm_id})
        return [bytes(r[0]) for r in cur.fetchall()]


def _draws(proj: Project, region: str, channel, mine: list[bytes]) -> bool:
    """Whether the channel's own SQL returns a feature whose geometry is one of the object's."""
    query = sql.SQL(
        """SELECT EXISTS (SELECT 1 FROM ({q}) t, unnest(%(mine)s::bytea[]) m(g)
                          WHERE t.way && ST_GeomFromWKB(m.g, 3857) AND ST_Equals(t.way, ST_GeomFromWKB(m.g, 3857)))"""
    ).format(q=sql.SQL(channel.sql.replace("!bbox!", "way").replace("%", "%%").format(schema=f'"{region}"')))
    with cursor(proj.info) as cur:
        cur.execute(query, {"mine": mine})
        return bool(cur.fetchone()[0])


def _pixel_classes(
    proj: Project, region: str, lat: float, lon: float, channel, mine: list[bytes]
) -> dict[str, np.ndarray]:
    """Per pixel of the (unrotated) tile at (lat, lon), from the channel's own SQL in PostGIS:
    `core` (the object is drawn there solidly), `near_mine` (within its drawn reach) and `near_other`
    (within the drawn reach of any other feature of the channel)."""
    render = proj.params.render
    size, k = render.size, mercator_scale(lat)
    x, y = lonlat_to_mercator(lon, lat)
    r, px = render.radius_m * k, 2 * render.radius_m * k / size  # Mercator units
    cx = x - r + (np.arange(size) + 0.5) * 2 * r / size
    cy = y + r - (np.arange(size) + 0.5) * 2 * r / size
    xs, ys = np.meshgrid(cx, cy)
    width = "t.w * %(k)s" if channel.kind != "polygon" else "0.0"
    query = sql.SQL(
        """WITH f AS (
             SELECT t.way, {width} AS w,
                    EXISTS (SELECT 1 FROM unnest(%(mine)s::bytea[]) m(g) WHERE ST_Equals(t.way, ST_GeomFromWKB(m.g, 3857)))
                    AS mine
             FROM ({q}) t WHERE t.way && ST_MakeEnvelope(%(x0)s, %(y0)s, %(x1)s, %(y1)s, 3857)),
           obj AS (SELECT ST_Collect(ST_GeomFromWKB(m.g, 3857)) AS g FROM unnest(%(mine)s::bytea[]) m(g)),
           px AS (SELECT i, ST_SetSRID(ST_MakePoint(u.x, u.y), 3857) AS pt
                  FROM unnest(%(xs)s::float8[], %(ys)s::float8[]) WITH ORDINALITY AS u(x, y, i), obj
                  WHERE ST_DWithin(obj.g, ST_SetSRID(ST_MakePoint(u.x, u.y), 3857), 10 * %(k)s + 2 * %(px)s))
           SELECT px.i,
             coalesce(bool_or(f.mine AND ST_DWithin(f.way, px.pt, greatest(f.w / 2 - %(px)s, 0.0))
                              AND NOT (ST_Dimension(f.way) = 2 AND ST_DWithin(ST_Boundary(f.way), px.pt, %(px)s))), false),
             coalesce(bool_or(f.mine AND ST_DWithin(f.way, px.pt, f.w / 2 + 1.5 * %(px)s)), false),
             coalesce(bool_or(NOT f.mine AND ST_DWithin(f.way, px.pt, f.w / 2 + 1.5 * %(px)s)), false)
           FROM px LEFT JOIN f ON ST_DWithin(f.way, px.pt, f.w / 2 + 1.5 * %(px)s)
           GROUP BY px.i ORDER BY px.i"""
    ).format(
        width=sql.SQL(width),
        q=sql.SQL(channel.sql.replace("!bbox!", "way").replace("%", "%%").format(schema=f'"{region}"')),
    )
    # (the water channel's `way && !bbox!` becomes `way && way`: always true; the outer envelope filters)
    pad = r + 20 * k
    with cursor(proj.info) as cur:
        cur.execute(
            query,
            {
                "mine": mine, "k": k, "px": px, "x0": x - pad, "y0": y - pad, "x1": x + pad, "y1": y + pad,
                "xs": xs.ravel().tolist(), "ys": ys.ravel().tolist(),
            },
        )  # fmt: skip
        found = cur.fetchall()
    rows = np.zeros((size * size, 3), dtype=bool)  # pixels farther from the object: not its, and not checked
    for i, *flags in found:
        rows[i - 1] = flags
    rows = rows.reshape(size, size, 3)
    return {"core": rows[..., 0], "near_mine": rows[..., 1], "near_other": rows[..., 2]}


def test_hidden_object_ids_are_validated() -> None:
    for bad in (0, True, 1.5, "1) OR (1=1", 2**63, None):
        with pytest.raises(RenderError):
            HiddenObject("way", bad)  # type: ignore[arg-type]
    with pytest.raises(RenderError):
        HiddenObject("relation", 5)  # type: ignore[arg-type]
    with pytest.raises(RenderError):
        HiddenObject("way", 5, ("no_such_channel",))
    assert HiddenObject("way", np.int64(-42)).osm_id == -42  # a relation's polygon, as osm2pgsql stores it


def test_maskable_sql_filters_every_osm_table_of_every_channel() -> None:
    for channel in CHANNELS:
        masked = maskable_sql(channel)
        n_tables = sum(channel.sql.count(f"{{schema}}.{t} ") for t in HIDE_VARIABLES)
        assert n_tables >= 1 and masked.count("osm_id <> !@hide_") == n_tables, channel.name


def test_plain_renderer_cannot_hide(proj: Project, region: str) -> None:
    from tests.conftest import VADUZ

    renderer = get_renderer(region, proj.params.render, proj.info)
    with pytest.raises(RenderError, match="maskable"):
        renderer.render(*VADUZ, hidden=HiddenObject("way", 1))


@pytest.mark.parametrize("task", MASKED_TASKS)
def test_masked_tile_has_no_pixels_of_the_hidden_object(proj: Project, region: str, task: str) -> None:
    labels = _labels(region, task).iloc[:SAMPLE]
    keep = KEEP_CHANNELS.get(task, ())
    checked = 0  # labels whose object has solid pixels no other feature of its channel covers
    for row, hidden in zip(labels.itertuples(), hidden_of(labels), strict=True):
        assert hidden is not None and hidden.osm_id == row.osm_id
        plain = render_tile(region, row.lat, row.lon, render=proj.params.render, info=proj.info)
        masked = render_tile(region, row.lat, row.lon, render=proj.params.render, info=proj.info, hidden=hidden)
        unhidden = get_renderer(region, proj.params.render, proj.info, maskable=True).render(row.lat, row.lon)
        assert np.array_equal(unhidden, plain), "a maskable renderer hiding nothing draws the plain tile"
        mine = _object_geometries(proj, region, hidden)
        assert mine, f"{task}: no rows for {hidden}"
        solid = 0
        for c, channel in enumerate(CHANNELS):
            vanished = (plain[c] > 0) & (masked[c] == 0)
            if channel.name in keep:
                assert np.array_equal(plain[c], masked[c]), f"{task}: the kept channel {channel.name} changed"
                continue
            if not _draws(proj, region, channel, mine):
                assert np.array_equal(plain[c], masked[c]), f"{task} {hidden}: {channel.name} changed without it"
                continue
            px = _pixel_classes(proj, region, row.lat, row.lon, channel, mine)
            assert not (vanished & ~px["near_mine"]).any(), f"{task} {hidden}: {channel.name} lost other features"
            assert not ((masked[c] != plain[c]) & ~px["near_mine"]).any(), f"{task}: {channel.name} changed elsewhere"
            vanished_core = px["core"] & ~px["near_other"]
            if vanished_core.any():
                assert (plain[c][vanished_core] > 0).all(), f"{task} {hidden}: {channel.name} did not draw it"
                assert (masked[c][vanished_core] == 0).all(), f"{task} {hidden}: {channel.name} still draws it"
                solid += int(vanished_core.sum())
        checked += solid > 0
    assert checked >= 3, f"{task}: only {checked} of {len(labels)} objects had pixels of their own to check"


def _object_counts(proj: Project, region: str, row, hidden: HiddenObject, task: str, radius_m: float) -> np.ndarray:
    """The object's own contribution to each tag-count column (written from the category filters directly)."""
    k = 1.0 / math.cos(math.radians(row.lat))
    x, y = lonlat_to_mercator(row.lon, row.lat)
    near = "ST_DWithin(way, ST_SetSRID(ST_MakePoint(%(x)s, %(y)s), 3857), %(d)s)"
    args = {"x": x, "y": y, "d": radius_m * k, "id": hidden.osm_id}
    node = hidden.table == "point"
    out = []
    with cursor(proj.info) as cur:

        def count(table: str, where: str) -> int:
            cur.execute(
                sql.SQL("SELECT count(*) FROM {s}.{t} WHERE osm_id = %(id)s AND (" + where + ") AND " + near).format(
                    s=sql.Identifier(region), t=sql.Identifier(table)
                ),
                args,
            )
            return int(cur.fetchone()[0])

        for w in {**TRANSPORT_MODES, **EXTRA_LINES}.values():
            out.append(0 if node else count("planet_osm_line", f"osm_id > 0 AND ({w})"))
        for w in VENUE_GROUPS.values():
            out.append(count("planet_osm_point", w) if node else count("planet_osm_polygon", w))
        for name, w in LAND_COVER.items():
            kept = task == "building_type" and name == "building"
            out.append(0 if node or kept else count("planet_osm_polygon", w))
    return np.asarray(out, dtype=float)


@pytest.mark.parametrize("task", MASKED_TASKS)
def test_masked_tag_counts_differ_by_exactly_the_hidden_object(proj: Project, region: str, task: str) -> None:
    labels = _labels(region, task).iloc[:SAMPLE].reset_index(drop=True)
    radius = proj.params.render.radius_m
    masked = scene_tag_counts(labels, proj.info, radius)
    plain = scene_tag_counts(labels.assign(hidden_id=0), proj.info, radius)
    col = {c: i for i, c in enumerate(TAG_COLUMNS)}
    for i, (row, hidden) in enumerate(zip(labels.itertuples(), hidden_of(labels), strict=True)):
        expected = _object_counts(proj, region, row, hidden, task, radius)
        assert np.array_equal(plain[i] - masked[i], expected), f"{task} {hidden}: {plain[i] - masked[i]} vs {expected}"
        if task == "venue_context":  # its own category is no longer counted
            assert plain[i, col[f"poi_{row.label}"]] - masked[i, col[f"poi_{row.label}"]] == 1
        if task == "transport_context":  # nor its own way
            assert plain[i, col[f"way_{row.label}"]] - masked[i, col[f"way_{row.label}"]] == 1
        if task == "building_type":  # its footprint still counts
            assert masked[i, col["area_building"]] == plain[i, col["area_building"]] >= 1


def test_nearest_way_skips_the_hidden_way(proj: Project, region: str) -> None:
    labels = _labels(region, "transport_context").reset_index(drop=True)
    radius = proj.params.render.radius_m
    masked = nearest_way(labels, proj.info, radius)
    plain = nearest_way(labels.assign(hidden_id=0), proj.info, radius)
    modes = list(TRANSPORT_MODES)
    assert (masked >= plain - 1e-12).all() and (plain <= 1).all() and (masked <= 1).all()
    own = plain[np.arange(len(labels)), [modes.index(m) for m in labels["label"]]]
    assert np.quantile(own * radius, 0.9) < 40, "unmasked, the point's own way is within GPS noise of it"
    assert (masked != plain).any(axis=1).mean() > 0.3, "hiding the way changes the nearest distance of its mode"


def test_building_groups_come_from_the_data(proj: Project, region: str) -> None:
    coverage = building_coverage(region, evaluation_context(proj).labels)
    labels = _labels(region, "building_type")
    assert set(labels["label"]) <= set(coverage) and labels["label"].nunique() >= 3
    assert (labels["lat"] == labels["lat0"]).all(), "a building label is the building itself: no GPS noise"


def test_road_surface_labels_are_the_roads_own_tag(proj: Project, region: str) -> None:
    labels = _labels(region, "road_surface")
    coverage = surface_coverage(region, evaluation_context(proj).labels)
    assert set(labels["label"]) == set(SURFACE_GROUPS) and (labels["label"].value_counts() == 20).all()
    assert all(coverage[g] >= 20 for g in SURFACE_GROUPS) and coverage["untagged"] > 0
    assert labels["osm_id"].is_unique, "one point per road"
    roads = [c for c in CHANNELS if c.name in ("roads_major", "roads_minor", "paths")]
    with cursor(proj.info) as cur:
        for row in labels.itertuples():
            x, y = lonlat_to_mercator(row.lon0, row.lat0)
            cur.execute(
                sql.SQL(
                    "SELECT surface, min(ST_Distance(way, ST_SetSRID(ST_MakePoint(%s, %s), 3857)))"
                    " FROM {s}.planet_osm_line WHERE osm_id = %s GROUP BY surface"
                ).format(s=sql.Identifier(region)),
                (x, y, int(row.osm_id)),
            )
            ((surface, dist),) = cur.fetchall()
            assert surface in SURFACE_GROUPS[row.label], f"way {row.osm_id}: surface={surface} is not {row.label}"
            assert dist < 0.01, f"the un-jittered point lies on its road ({dist} Mercator units away)"
            mine = _object_geometries(proj, region, HiddenObject("way", int(row.osm_id)))
            assert any(_draws(proj, region, c, mine) for c in roads), f"way {row.osm_id}: no road channel draws it"


def test_road_surface_scene_hides_nothing_and_no_input_reads_the_surface(proj: Project, region: str) -> None:
    labels = _labels(region, "road_surface").iloc[:4].reset_index(drop=True)
    assert (labels["hidden_id"] == 0).all() and hidden_of(labels) == [None] * len(labels)
    tiles = next(scene_tiles(region, labels, proj.params.render, proj.info, len(labels)))
    for tile, row in zip(tiles, labels.itertuples(), strict=True):
        assert np.array_equal(tile, render_tile(region, row.lat, row.lon, render=proj.params.render, info=proj.info))
    radius = proj.params.render.radius_m
    plain = labels.drop(columns=["task", "hidden_table", "hidden_id"])  # a consumer point: nothing to hide
    assert np.array_equal(scene_tag_counts(labels, proj.info, radius), scene_tag_counts(plain, proj.info, radius))
    filters = [c.sql for c in CHANNELS] + [*TRANSPORT_MODES.values(), *EXTRA_LINES.values(), *VENUE_GROUPS.values()]
    assert not any("surface" in f for f in [*filters, *LAND_COVER.values()]), "no channel draws, no count reads it"
