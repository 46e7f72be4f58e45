"""Downstream evaluation on the real test region: OSM labels, the blocked split, the metrics JSON, MLflow."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import h3
import numpy as np
import pandas as pd
import pytest
import yaml
from psycopg2 import sql

from .fixtures.project import clear_published, embed, evaluation_context, load_project, publish

SMALL = {
    "labels": {
        "jitter_m": 15.0,
        "seed": 3,
        "transport_per_class": 40,
        "venue_per_class": 30,
        "min_per_class": 10,
        "label_time": "2030-01-01T00:00:00Z",
    },
    "split": {"block_m": 600.0, "folds": 3, "seed": 1},
    "knn_k": 5,
}
TEST_MODEL = "loc2vec-encoder-evaltest"  # never the name test_train's champion assertions use
LABEL_TIME = pd.Timestamp("2030-01-01T00:00:00Z")


@pytest.fixture(scope="module")
def small(project: Path, region: str) -> Iterator[Path]:
    """The test project with small evaluation params and its own registered-model name."""
    path = project / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    params["evaluate"] = SMALL
    params.setdefault("embed", {})["h3_resolution"] = 10  # ~7× fewer cells than 11: a quick embed
    params.setdefault("train", {})["registered_model"] = TEST_MODEL
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    os.utime(path, None)
    yield project
    path.write_text(original)


def _true_metres_to_mercator(lat: np.ndarray, metres: float) -> np.ndarray:
    return metres / np.cos(np.radians(lat))


def _great_circle_m(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Pairwise haversine distances (n, m) in metres."""
    p1, p2 = np.radians(lat1)[:, None], np.radians(lat2)[None, :]
    dphi, dlam = p2 - p1, np.radians(lon2)[None, :] - np.radians(lon1)[:, None]
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlam / 2) ** 2
    return 2 * 6371008.8 * np.arcsin(np.sqrt(a))


def test_transport_labels_lie_on_ways_of_their_mode(small: Path, region: str) -> None:
    from loc2vec.core.geo import to_mercator
    from loc2vec.evaluation.labels import TRANSPORT_MODES, transport_labels
    from loc2vec.osm.db import cursor

    p = load_project()
    cfg = p.params.evaluate.labels
    labels = transport_labels(region, cfg, evaluation_context(p).labels)
    counts = labels["label"].value_counts()
    assert set(counts.index) == {"car", "rail", "cycle", "foot"}, "Vaduz–Schaan has these four modes, no ferry"
    assert (counts == cfg.transport_per_class).all(), "balanced: N points per mode"
    assert str(labels["event_timestamp"].dt.tz) == "UTC" and (labels["event_timestamp"] == LABEL_TIME).all()
    res = p.params.embed.h3_resolution
    assert all(
        h3.latlng_to_cell(a, b, res) == c
        for a, b, c in zip(labels["lat"], labels["lon"], labels["h3_cell"], strict=True)
    )

    for mode, group in labels.groupby("label"):
        x0, y0 = to_mercator(group["lon0"].to_numpy(), group["lat0"].to_numpy())
        x, y = to_mercator(group["lon"].to_numpy(), group["lat"].to_numpy())
        lat = group["lat0"].to_numpy()
        query = sql.SQL(
            """SELECT count(*) FILTER (WHERE EXISTS (SELECT 1 FROM {s}.planet_osm_line l WHERE l.osm_id = p.id
                        AND ({mode}) AND ST_DWithin(l.way, ST_SetSRID(ST_MakePoint(p.x0, p.y0), 3857), p.on_way))),
                      count(*) FILTER (WHERE EXISTS (SELECT 1 FROM {s}.planet_osm_line l WHERE ({mode})
                        AND ST_DWithin(l.way, ST_SetSRID(ST_MakePoint(p.x, p.y), 3857), p.near)))
               FROM unnest(%s::float8[], %s::float8[], %s::float8[], %s::float8[], %s::int8[], %s::float8[],
                           %s::float8[]) AS p(x0, y0, x, y, id, on_way, near)"""
        ).format(s=sql.Identifier(region), mode=sql.SQL(TRANSPORT_MODES[mode]))
        with cursor(p.info) as cur:
            cur.execute(
                query,
                (
                    x0.tolist(),
                    y0.tolist(),
                    x.tolist(),
                    y.tolist(),
                    group["osm_id"].tolist(),
                    _true_metres_to_mercator(lat, 0.05).tolist(),
                    _true_metres_to_mercator(lat, 4 * math.sqrt(2) * cfg.jitter_m).tolist(),
                ),
            )
            on_way, near = cur.fetchone()
        assert on_way == len(group), f"{mode}: every un-jittered point lies on its own way of that mode"
        assert near == len(group), f"{mode}: every jittered point is within 4σ·√2 of a way of that mode"

    # GPS-like noise: independent N(0, σ²) metres east and north
    north = np.radians(labels["lat"] - labels["lat0"]) * 6371008.8
    east = np.radians(labels["lon"] - labels["lon0"]) * 6371008.8 * np.cos(np.radians(labels["lat0"]))
    for axis in (north, east):
        assert abs(axis.mean()) < 3.0 and 0.8 * cfg.jitter_m < axis.std() < 1.2 * cfg.jitter_m


def test_venue_labels_are_pois_of_their_group(small: Path, region: str) -> None:
    from loc2vec.core.geo import to_mercator
    from loc2vec.evaluation.labels import VENUE_GROUPS, margin_box, venue_candidates, venue_labels
    from loc2vec.osm.db import cursor

    p = load_project()
    cfg = p.params.evaluate.labels
    source = evaluation_context(p).labels
    labels = venue_labels(region, cfg, source)
    available = venue_candidates(region, margin_box(region, cfg, source)[1], p.info)["label"].value_counts()
    counts = labels["label"].value_counts()
    expected = {g for g, n in available.items() if n >= cfg.min_per_class}
    assert set(counts.index) == expected and len(expected) >= 6
    assert (available[available < cfg.min_per_class].index.isin(["lodging"])).all(), "9 hotels: too few"
    for group, n in counts.items():
        assert n == min(cfg.venue_per_class, available[group])

    # the un-jittered point is the POI itself (node, or point-on-surface of the area) with its group's tags
    for (group, kind), rows in labels.groupby(["label", "osm_kind"]):
        table = "planet_osm_point" if kind == "node" else "planet_osm_polygon"
        geom = "way" if kind == "node" else "ST_PointOnSurface(way)"
        x, y = to_mercator(rows["lon0"].to_numpy(), rows["lat0"].to_numpy())
        query = sql.SQL(
            """SELECT count(*) FROM unnest(%s::int8[], %s::float8[], %s::float8[]) AS p(id, x, y)
               WHERE EXISTS (SELECT 1 FROM {s}.{t} o WHERE o.osm_id = p.id AND ({where})
                             AND ST_DWithin({geom}, ST_SetSRID(ST_MakePoint(p.x, p.y), 3857), 0.01))"""
        ).format(
            s=sql.Identifier(region), t=sql.Identifier(table), where=sql.SQL(VENUE_GROUPS[group]), geom=sql.SQL(geom)
        )
        with cursor(p.info) as cur:
            cur.execute(query, (rows["osm_id"].tolist(), x.tolist(), y.tolist()))
            assert cur.fetchone()[0] == len(rows), f"{group}/{kind}"


def test_labels_are_reproducible(small: Path, region: str) -> None:
    from loc2vec.evaluation.labels import make_labels

    p = load_project()
    cfg, source = p.params.evaluate.labels, evaluation_context(p).labels
    for task in ("transport", "venue"):
        pd.testing.assert_frame_equal(make_labels(region, task, cfg, source), make_labels(region, task, cfg, source))


def test_blocked_folds_keep_test_points_a_tile_away_from_train_points(small: Path, region: str) -> None:
    from loc2vec.evaluation.cv import spatial_folds
    from loc2vec.evaluation.labels import make_labels
    from loc2vec.osm.db import require_import

    p = load_project()
    cfg = p.params.evaluate.split
    radius = p.params.render.radius_m
    buffer = cfg.buffer(radius)
    assert buffer == 2 * radius, "default buffer: train and test tiles never overlap"
    source = evaluation_context(p).labels
    for task in ("transport", "venue"):
        labels = make_labels(region, task, p.params.evaluate.labels, source)
        folds = spatial_folds(labels, cfg, require_import(region, p.info).bbox, radius)
        assert len(folds) == cfg.folds
        tested = np.concatenate([f.test for f in folds])
        assert sorted(tested.tolist()) == list(range(len(labels))), "each label is tested exactly once"
        lat, lon = labels["lat"].to_numpy(), labels["lon"].to_numpy()
        for fold in folds:
            assert not set(fold.train) & set(fold.test)
            d = _great_circle_m(lat[fold.test], lon[fold.test], lat[fold.train], lon[fold.train])
            assert d.min() >= buffer > radius, "no test point within a tile of a train point"
            assert len(fold.train) > len(labels) / 3


def _tile_histogram(points: pd.DataFrame, mode: str, service: str) -> np.ndarray:
    """The cell tile's channel fractions, computed from the tiles (what embed stores as `histogram`)."""
    from loc2vec.evaluation.featuresets import cell_centres
    from loc2vec.raster.cutter import cut_tiles

    from .fixtures.project import ensure_metatiles

    region = points["region"].iloc[0]
    lats, lons = cell_centres(points["h3_cell"].tolist())
    index = ensure_metatiles(region, lats, lons)
    tiles = cut_tiles(index, lats, lons, np.zeros(len(lats)), np.zeros((len(lats), 2)), device="cpu")
    return (tiles != 0).float().mean(dim=(2, 3)).numpy()


def _check_shape(result: dict, featuresets: tuple[str, ...]) -> None:
    assert set(result) == {"tasks", "meta"}
    assert set(result["tasks"]) == {"transport", "venue"}
    for task in result["tasks"].values():
        assert list(task) == list(featuresets)
        for per_classifier in task.values():
            assert set(per_classifier) == {"logreg", "knn"}
            for metrics in per_classifier.values():
                assert set(metrics) == {"accuracy", "macro_f1"}
                assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in metrics.values())


def test_evaluation_core_without_feast(small: Path, region: str, tmp_path: Path) -> None:
    """Real labels, real split, the OSM/tile featuresets; Feast's two are injected from the tiles."""
    import mlflow
    from mlflow import MlflowClient

    from loc2vec.core.config import DEFAULT_FEATURESETS
    from loc2vec.core.tracking import tracking_uri
    from loc2vec.evaluation.featuresets import Featurizer, random_encoder_features
    from loc2vec.evaluation.run import evaluate

    proj = load_project()
    cfg, ctx = proj.params.evaluate, evaluation_context(proj)
    featurizer = Featurizer.default(cfg, ctx)
    featurizer.base["histogram"] = _tile_histogram
    featurizer.base["loc2vec"] = lambda p, m, s: random_encoder_features(p, m, ctx, seed=1)  # a stand-in encoder
    out = tmp_path / "metrics.json"
    result = evaluate(region, out, cfg, ctx, featurizer=featurizer, registered_model=proj.params.train.registered_model)
    assert json.loads(out.read_text()) == result
    _check_shape(result, DEFAULT_FEATURESETS)
    transport = result["tasks"]["transport"]
    assert transport["tag_counts"]["logreg"]["macro_f1"] > 0.35, "way counts tell the mode (chance: 0.25)"
    meta = result["meta"]["tasks"]
    assert meta["transport"]["n_tested"] == 160 and meta["transport"]["folds"] == 3
    assert all(v == 0.0 for v in meta["venue"]["online_vs_historical_max_abs_diff"].values())
    boot = meta["venue"]["bootstrap"]  # block bootstrap: its macro-F1 is sklearn's, its intervals are ordered
    for name in DEFAULT_FEATURESETS[1:]:
        for kind in ("logreg", "knn"):
            lead = boot["loc2vec_minus"][name][kind]
            f1 = result["tasks"]["venue"]
            assert lead["diff"] == pytest.approx(f1["loc2vec"][kind]["macro_f1"] - f1[name][kind]["macro_f1"])
            assert lead["ci95"][0] <= lead["ci95"][1] and 0.0 <= lead["p_better"] <= 1.0

    mlflow.set_tracking_uri(tracking_uri(proj.paths))
    client = MlflowClient()
    runs = client.search_runs(
        [client.get_experiment_by_name("loc2vec-evaluate").experiment_id],
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    run = runs[0]
    key = "venue.loc2vec_plus_histogram.knn.macro_f1"
    assert run.data.metrics[key] == pytest.approx(result["tasks"]["venue"]["loc2vec+histogram"]["knn"]["macro_f1"])
    assert run.data.metrics["eval_score"] == pytest.approx(result["meta"]["eval_score"])
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["metrics.json"]


@pytest.fixture(scope="module")
def published(small: Path, region: str, project: Path) -> Iterator[str]:
    """A real registered model version (seeded, untrained: the test is about the plumbing, not quality),
    the test region embedded with it and published to a Feast store of its own (cleared before and after:
    modules run in any order, on any xdist worker); returns the version."""
    import torch
    from mlflow import MlflowClient

    from loc2vec.core.tracking import setup_mlflow
    from loc2vec.serving.store import forget_stores
    from loc2vec.training.model import Encoder
    from loc2vec.training.registry import CHAMPION

    mlflow = setup_mlflow("loc2vec-evaluate-test-model", load_project().paths)
    torch.manual_seed(5)
    with mlflow.start_run():
        example = np.zeros((2, 12, 128, 128), dtype=np.float32)  # as the trainer logs it (batch 2)
        info = mlflow.pytorch.log_model(
            Encoder().eval(),
            name="model",
            input_example=example,
            registered_model_name=TEST_MODEL,
            pip_requirements=["torch"],
        )
    version = str(info.registered_model_version)
    MlflowClient().set_registered_model_alias(TEST_MODEL, CHAMPION, version)
    clear_published(project)
    forget_stores()
    embed(region)
    publish([region])
    yield version
    forget_stores()
    clear_published(project)


def test_evaluation_through_feast(published: str, region: str, tmp_path: Path) -> None:
    """Historical retrieval for training rows, the online store for test rows, all six featuresets."""
    from mlflow import MlflowClient

    from loc2vec.core.config import DEFAULT_FEATURESETS
    from loc2vec.evaluation.run import evaluate

    p = load_project()
    out = tmp_path / "metrics.json"
    result = evaluate(
        region, out, p.params.evaluate, evaluation_context(p), registered_model=p.params.train.registered_model
    )
    _check_shape(result, DEFAULT_FEATURESETS)
    meta = result["meta"]
    assert meta["model"] == {"name": TEST_MODEL, "version": published}
    for task in meta["tasks"].values():
        assert task["n_tested"] > 0.9 * task["n_labels"], "label cells are on mapped land, so embedded"
        skew = task["online_vs_historical_max_abs_diff"]
        assert skew["loc2vec"] == 0.0 and skew["histogram"] == 0.0, "online serves what training read"
    tags = MlflowClient().get_model_version(TEST_MODEL, published).tags
    assert float(tags["eval_score"]) == pytest.approx(meta["eval_score"])
    assert tags["eval_score_region"] == region


def test_consumer_classifiers_train_historical_and_serve_online(published: str, region: str) -> None:
    from loc2vec.core.errors import Loc2VecError
    from loc2vec.evaluation.classifiers import TransportModeClassifier, VenueClassifier
    from loc2vec.evaluation.labels import make_labels
    from loc2vec.serving.lookup import LocationNotPublishedError

    p = load_project()
    cfg, ctx = p.params.evaluate, evaluation_context(p)
    labels = make_labels(region, "transport", cfg.labels, ctx.labels)
    model = TransportModeClassifier(cfg, ctx, model="knn").fit_from_feast(labels)
    pred = model.predict_online(labels["lat"].iloc[:20], labels["lon"].iloc[:20])
    assert len(pred) == 20 and set(pred) <= set(model.classes_) == {"car", "rail", "cycle", "foot"}
    with pytest.raises(LocationNotPublishedError):
        model.predict_online([0.0], [0.0])

    venues = make_labels(region, "venue", cfg.labels, ctx.labels)
    both = VenueClassifier(cfg, ctx, featureset="loc2vec+histogram").fit_from_feast(venues)
    assert len(both.predict_online(venues["lat"].iloc[:5], venues["lon"].iloc[:5])) == 5
    # point-in-time: a label observed before the embeddings existed has no features to train on
    with pytest.raises(Loc2VecError, match="no transport label has loc2vec features"):
        TransportModeClassifier(cfg, ctx).fit_from_feast(
            labels.assign(event_timestamp=pd.Timestamp("2001-01-01", tz="UTC"))
        )


def test_consumer_suite_adds_nearest_way_and_the_lift(published: str, region: str, tmp_path: Path) -> None:
    """`evaluate --suite consumer`: the consumer tasks through Feast, nearest_way for transport, random_wide on the
    cell tiles, the srai peers (fitted on the region, each label's plain scene) as best_baseline candidates, the lift
    rows. The suite inputs' path (`suite-inputs --suite consumer`: labels, every baseline but Feast's loc2vec and
    histogram, their fits and inner-CV scores stored) scores exactly the same, reading only Feast at evaluation."""
    from loc2vec.core.errors import ConfigError
    from loc2vec.evaluation.added_value import BEST, BEST_PLUS
    from loc2vec.evaluation.suite import run_suite
    from loc2vec.evaluation.suite_inputs import SuiteInputs, build_suite_inputs

    p = load_project()
    ctx = evaluation_context(p)
    out = tmp_path / "consumer.json"
    cheap = {"random_wide_features": 64, "hgb_max_iter": 10, "inner_folds": 2, "peer_rings": 1, "hex2vec_epochs": 1}
    cfg = p.params.evaluate.model_copy(
        update={"bootstrap": 100, "suite": p.params.evaluate.suite.model_copy(update=cheap)}
    )  # test_suite.py's cheap suite: the peers and the tree fits at their cheapest that still exercises them
    result = run_suite("consumer", region, out, cfg, ctx, encoder=None, track=False)
    tasks = result["tasks"]
    assert set(tasks) == {"transport", "venue"} and out.with_suffix(".png").is_file()
    base = {"loc2vec", "latlon", "histogram", "tag_counts", "random_encoder", "random_wide", BEST, BEST_PLUS, "lift"}
    base |= {"srai_contextual_counts", "srai_hex2vec"}
    assert set(tasks["transport"]) == base | {"nearest_way"} and set(tasks["venue"]) == base
    for task, table in tasks.items():
        for kind in ("logreg", "hgb"):
            lift = table["lift"][kind]
            assert lift["ci95"][0] <= lift["lift"] <= lift["ci95"][1]
            assert 0.0 < table["srai_hex2vec"][kind]["macro_f1"] <= 1.0
        dims = result["meta"]["tasks"][task]["online_vs_historical_max_abs_diff"]
        assert dims["srai_contextual_counts"] == 0.0, "one peer vector per label on both paths"
    assert result["meta"]["peers"]["fitted_on"] == [region]
    # nearest_way reads the way under a point on a way: the strongest transport baseline, as an engineer expects
    assert tasks["transport"]["nearest_way"]["logreg"]["macro_f1"] > tasks["transport"]["latlon"]["logreg"]["macro_f1"]
    assert result["meta"]["consumer_lift"] == pytest.approx(
        (tasks["transport"]["lift"]["logreg"]["lift"] + tasks["venue"]["lift"]["logreg"]["lift"]) / 2
    )

    # the same through the suite inputs: only Feast's featuresets read, only theirs and loc2vec's fits made
    inputs = tmp_path / "inputs"
    manifest = build_suite_inputs(region, inputs, cfg, ctx, "consumer")
    assert set(manifest["tasks"]) == {"transport", "venue"}
    for task in manifest["tasks"]:  # no wall-clock time in the DVC output: the labels are stamped at evaluation
        assert "event_timestamp" not in pd.read_parquet(inputs / f"{task}.labels.parquet").columns, task
    opened = SuiteInputs.open(inputs, region, cfg, ctx)
    with pytest.raises(ConfigError, match="hold no venue_context.*--suite all"):
        opened.require(["venue_context", "transport"])
    cached = run_suite("consumer", region, tmp_path / "cached.json", cfg, ctx, encoder=None, track=False, inputs=opened)
    for task, table in tasks.items():
        assert set(cached["tasks"][task]) == set(table)
        for name, by_kind in table.items():
            for kind, value in by_kind.items():
                if name == "lift":
                    assert cached["tasks"][task]["lift"][kind] == value, (task, kind)
                else:
                    assert cached["tasks"][task][name][kind]["macro_f1"] == value["macro_f1"], (task, name, kind)
        meta, cached_meta = result["meta"]["tasks"][task], cached["meta"]["tasks"][task]
        assert cached_meta["n_tested"] == meta["n_tested"] and cached_meta["classes"] == meta["classes"]
        stored = manifest["tasks"][task]["meta"]
        assert stored["n_labels"] - stored["n_rows_fitted"] == meta["n_dropped_missing_features_or_class"]
        assert cached_meta["baseline_fits"].startswith("stored"), "the rows Feast serves were known: no refit"
    assert cached["meta"]["inputs"]["digest"] == manifest["digest"]

    # Feast serving other rows than the inputs expect (here the inputs say one transport row fewer was fitted, as if
    # embed had covered other cells): transport's baselines are all fitted again at evaluation, with the same scores
    # as the suite computing everything itself; venue's stored fits still serve.
    from loc2vec.evaluation.suite_inputs import FITTED_ROWS

    npz_path = inputs / "transport.features.npz"
    with np.load(npz_path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays[FITTED_ROWS][np.flatnonzero(arrays[FITTED_ROWS])[0]] = False
    np.savez(npz_path, **arrays)
    refit = run_suite("consumer", region, tmp_path / "refit.json", cfg, ctx, encoder=None, track=False, inputs=opened)
    assert refit["meta"]["tasks"]["transport"]["baseline_fits"].startswith("fitted at evaluation")
    assert refit["meta"]["tasks"]["venue"]["baseline_fits"].startswith("stored")
    for task, table in tasks.items():
        for name, by_kind in table.items():
            for kind, value in by_kind.items():
                got = refit["tasks"][task][name][kind]
                assert (got if name == "lift" else got["macro_f1"]) == (
                    value if name == "lift" else value["macro_f1"]
                ), (task, name, kind)
