"""Training-location sampling against the real PostGIS test region (Vaduz–Schaan–Rhine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from loc2vec.cli.project import Project
from loc2vec.core.config import KINDS, SampleConfig
from loc2vec.core.errors import ConfigError
from loc2vec.osm.db import ConnInfo, cursor, require_import
from loc2vec.sampling.information import information
from loc2vec.sampling.samples import COLUMNS, sample_locations, write_samples

from .conftest import VADUZ
from .fixtures.project import load_project
from .fixtures.trained import patched_params

EMPTY_SWISS_SIDE = (47.1350, 9.4900)  # west of the Rhine: outside the extract's cut, nothing mapped


def haversine_m(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distances in metres (numpy broadcasting: pass [:, None] and [None, :] for all pairs)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(np.radians(np.subtract(lon2, lon1)) / 2) ** 2
    return 2 * 6371008.8 * np.arcsin(np.sqrt(a))


@pytest.fixture(scope="module")
def mproj(region: str) -> Project:
    """The test project, loaded once for this module's shared sample."""
    return load_project()


@pytest.fixture(scope="module")
def cfg(mproj: Project) -> SampleConfig:
    # 500 m blocks: the test region is ~4 × 6 km, so every split gets several blocks.
    return mproj.params.sample.model_copy(update={"n_locations": 300, "block_m": 500.0})


@pytest.fixture(scope="module")
def written(region: str, cfg: SampleConfig, mproj: Project) -> Path:
    return write_samples(region, mproj.paths.samples(region), cfg, render=mproj.params.render, info=mproj.info)


@pytest.fixture(scope="module")
def sample(written: Path) -> pd.DataFrame:
    return pd.read_parquet(written)


def test_written_where_and_what(project: Path, region: str, written: Path, sample: pd.DataFrame, cfg: SampleConfig):
    assert written == project / "data" / "samples" / f"{region}.parquet"
    assert not list(written.parent.glob("*.part"))
    assert list(sample.columns) == COLUMNS
    assert len(sample) == cfg.n_locations
    assert sample["location_id"].is_unique
    assert set(sample["split"]) == {"train", "val", "test"}
    assert ((sample["weight"] > 0) & (sample["weight"] <= 1)).all()
    assert (sample["coverage"] >= cfg.min_coverage).all()
    assert sample["entropy"].between(0, 1).all()
    assert sample.groupby("block")["split"].nunique().max() == 1  # a block belongs to one split


def test_deterministic(
    region: str, cfg: SampleConfig, written: Path, sample: pd.DataFrame, tmp_path: Path, proj: Project
):
    render, info = proj.params.render, proj.info
    again = write_samples(region, tmp_path / "again.parquet", cfg, render=render, info=info)
    assert again.read_bytes() == written.read_bytes()
    other = sample_locations(region, cfg.model_copy(update={"seed": cfg.seed + 1}), render=render, info=info)
    assert len(other) == len(sample)
    assert not np.array_equal(other["location_id"].to_numpy(), sample["location_id"].to_numpy())
    shared = np.intersect1d(other["location_id"], sample["location_id"])
    assert len(shared) < len(sample) // 2


def test_no_val_or_test_location_near_train(sample: pd.DataFrame, proj: Project):
    radius = proj.params.render.radius_m
    train = sample[sample["split"] == "train"]
    for split in ("val", "test"):
        held = sample[sample["split"] == split]
        assert len(held) >= 5, f"too few {split} locations to test the buffer"
        d = haversine_m(
            held["lat"].to_numpy()[:, None],
            held["lon"].to_numpy()[:, None],
            train["lat"].to_numpy()[None, :],
            train["lon"].to_numpy()[None, :],
        )
        assert d.min() > 2 * radius, f"a {split} location is {d.min():.0f} m from a train location"


def test_kind_mix_follows_weights(sample: pd.DataFrame, cfg: SampleConfig):
    counts = sample["kind"].value_counts()
    total = sum(cfg.mix.values())
    for kind in KINDS:
        share = counts.get(kind, 0) / len(sample)
        assert share == pytest.approx(cfg.mix[kind] / total, abs=0.02), kind


def test_points_inside_extent_shrunk_by_radius(region: str, sample: pd.DataFrame, proj: Project):
    radius = proj.params.render.radius_m
    west, south, east, north = require_import(region, proj.info).bbox
    lat, lon = sample["lat"].to_numpy(), sample["lon"].to_numpy()
    assert ((lon > west) & (lon < east) & (lat > south) & (lat < north)).all()
    to_edges = [
        haversine_m(lat, lon, lat, west),
        haversine_m(lat, lon, lat, east),
        haversine_m(lat, lon, south, lon),
        haversine_m(lat, lon, north, lon),
    ]
    assert min(d.min() for d in to_edges) >= radius * 0.999


def _near(
    info: ConnInfo, region: str, lat: np.ndarray, lon: np.ndarray, where_sql: str, table: str, metres: float
) -> np.ndarray:
    """Which points lie within `metres` of a feature of `table` matching where_sql (constant SQL of this test)."""
    query = (
        "SELECT EXISTS (SELECT 1 FROM {schema}.{table} f WHERE {where} AND ST_DWithin(f.way, p.g, %s / cos(radians(p.lat))))"
        " FROM (SELECT ST_Transform(ST_SetSRID(ST_MakePoint(lon, lat), 4326), 3857) AS g, lat, i"
        " FROM unnest(%s::float8[], %s::float8[]) WITH ORDINALITY AS u(lon, lat, i)) p ORDER BY p.i"
    ).format(schema=f'"{region}"', table=table, where=where_sql)
    with cursor(info) as cur:
        cur.execute(query, (metres, lon.tolist(), lat.tolist()))
        return np.asarray([r[0] for r in cur.fetchall()])


def test_visits_on_buildings_or_pois_and_transport_on_network(region: str, sample: pd.DataFrame, proj: Project):
    visits = sample[sample["kind"] == "visits"]
    lat, lon = visits["lat"].to_numpy(), visits["lon"].to_numpy()
    poi = "(amenity IS NOT NULL OR shop IS NOT NULL OR tourism IS NOT NULL)"
    on = (
        _near(proj.info, region, lat, lon, "(building IS NOT NULL AND building <> 'no')", "planet_osm_polygon", 0.5)
        | _near(proj.info, region, lat, lon, poi, "planet_osm_polygon", 0.5)
        | _near(proj.info, region, lat, lon, poi, "planet_osm_point", 0.5)
    )
    assert on.all(), visits[~on]

    transport = sample[sample["kind"] == "transport"]
    net = "(highway IS NOT NULL OR railway IS NOT NULL)"
    on_net = _near(
        proj.info, region, transport["lat"].to_numpy(), transport["lon"].to_numpy(), net, "planet_osm_line", 0.5
    )
    assert on_net.all(), transport[~on_net]


def test_low_information_tiles_are_dropped(region: str, cfg: SampleConfig, proj: Project):
    lat, lon = np.array([VADUZ[0], EMPTY_SWISS_SIDE[0]]), np.array([VADUZ[1], EMPTY_SWISS_SIDE[1]])
    info = information(region, lat, lon, cfg, render=proj.params.render, info=proj.info)
    vaduz, empty = info.iloc[0], info.iloc[1]
    assert empty["coverage"] < cfg.min_coverage and not empty["keep"]
    assert vaduz["keep"] and vaduz["coverage"] > 0.5 and vaduz["weight"] == 1.0
    assert vaduz["entropy"] > cfg.entropy_floor


def test_sampler_drops_and_reports_low_information(region: str, cfg: SampleConfig, proj: Project):
    strict = cfg.model_copy(update={"n_locations": 80, "min_coverage": 0.995})
    df = sample_locations(region, strict, render=proj.params.render, info=proj.info)
    assert (df["coverage"] >= 0.995).all()
    assert sum(df.attrs["summary"]["dropped_low_information"].values()) > 0
    assert len(df) == 80


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"splits": {"train": 0.9, "val": 0.2, "test": 0.1}}, "splits"),
        ({"mix": {"visits": 1.0, "teleport": 1.0}}, "mix"),
    ],
)
def test_config_is_validated(project: Path, bad: dict, match: str):
    with pytest.raises(ValidationError, match=match):
        SampleConfig(**bad)
    with patched_params(project, {"sample": bad}), pytest.raises(ConfigError, match=f"sample: {match}"):
        load_project()  # at the edge, a bad params.yaml is a ConfigError naming the key
    assert sum(SampleConfig(n_locations=301).quotas().values()) == 301
