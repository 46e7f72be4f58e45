"""`loc2vec evaluate --suite leakfree` end to end on the real test region: JSON shape, lift rows, chart, MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from loc2vec.core.config import ModelConfig
from loc2vec.evaluation.added_value import BEST, BEST_PLUS, WIDE
from loc2vec.evaluation.leakfree import LEAKFREE_TASKS, MASKED_TASKS, SURFACE_GROUPS
from loc2vec.evaluation.provenance import run_info_path

from .fixtures.project import load_project
from .fixtures.trained import patched_params

SMALL = {
    "labels": {
        "seed": 3, "transport_per_class": 25, "venue_per_class": 20, "building_per_class": 20, "surface_per_class": 20,
        "min_per_class": 8,
    },
    "split": {"block_m": 600.0, "folds": 3, "seed": 1},
    "bootstrap": 100,
    # the srai peers at their cheapest that still exercises them: one ring of neighbours (each label's counts
    # are still recomputed without its object) and one Hex2Vec epoch (still a fit: fit_hex2vec > 0, 50 dims)
    "suite": {"random_wide_features": 64, "hgb_max_iter": 10, "inner_folds": 2, "peer_rings": 1, "hex2vec_epochs": 1},
}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained, seeded encoder of params.model's architecture (the suite inputs' random_encoder is built with
    it), saved the way training saves one (what is tested is the suite, not the model)."""
    from loc2vec.training.model import Encoder

    out = tmp_path_factory.mktemp("model")
    torch.manual_seed(5)
    cfg = load_project().params.model
    torch.save(Encoder(cfg).state_dict(), out / "model.pt")
    (out / "model_config.json").write_text(cfg.model_dump_json())
    return out


@pytest.fixture(scope="module")
def suite_result(project: Path, region: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("suite") / "test_li.leakfree.json"
    with patched_params(project, {"evaluate": SMALL}):
        cmd = [sys.executable, "-m", "loc2vec.cli", "evaluate", "--suite", "leakfree", "--region", region]
        done = subprocess.run([*cmd, "--model", str(model_dir), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    result["_out"] = str(out)
    result["_stdout"] = done.stdout
    return result


def test_suite_json_has_every_featureset_classifier_and_lift(suite_result: dict) -> None:
    cfg = load_project().params.model
    wide_dims = cfg.nin_channels[-1] + (cfg.centre_channels[-1] if cfg.centre_px else 0)
    tasks = suite_result["tasks"]
    assert list(tasks) == list(LEAKFREE_TASKS)
    for task, table in tasks.items():
        expected = {"loc2vec", "latlon", "histogram", "tag_counts", "random_encoder", "random_wide", BEST, BEST_PLUS}
        expected |= {WIDE, f"{BEST}+{WIDE}"}  # the encoder's wide representation, alone and added
        expected |= {"srai_contextual_counts", "srai_hex2vec"}  # the peers run inside the suite
        if task in ("transport_context", "road_surface"):
            expected.add("nearest_way")
        assert set(table) == expected | {"lift", f"lift_{WIDE}"}, task
        for name in expected:
            for kind in ("logreg", "hgb"):
                assert 0.0 <= table[name][kind]["macro_f1"] <= 1.0
        for kind in ("logreg", "hgb"):
            lift = table["lift"][kind]
            assert lift["best_baseline"] in expected - {"loc2vec", WIDE, BEST, BEST_PLUS, f"{BEST}+{WIDE}"}
            assert set(lift["chosen_per_fold"]) <= expected and len(lift["chosen_per_fold"]) == 3
            low, high = lift["ci95"]
            assert low <= lift["lift"] <= high
            assert lift["lift"] == pytest.approx(table[BEST_PLUS][kind]["macro_f1"] - table[BEST][kind]["macro_f1"])
            wide = table[f"lift_{WIDE}"][kind]  # over the same fold's best_baseline
            assert wide["chosen_per_fold"] == lift["chosen_per_fold"] and wide["ci95"][0] <= wide["lift"]
            assert wide["lift"] == pytest.approx(
                table[f"{BEST}+{WIDE}"][kind]["macro_f1"] - table[BEST][kind]["macro_f1"]
            )
        meta = suite_result["meta"]["tasks"][task]
        assert meta["feature_dims"]["random_wide"] == 64 and meta["feature_dims"]["loc2vec"] == 16
        assert meta["feature_dims"][WIDE] == wide_dims  # the trunk's pooled output, then the centre branch's
        assert meta["bootstrap"]["macro_f1_ci95"]["loc2vec"]["logreg"][0] <= table["loc2vec"]["logreg"]["macro_f1"]
    assert "nearest_way" not in tasks["venue_context"], "nearest_way is a transport baseline"
    peers = suite_result["meta"]["peers"]
    assert peers["fitted_on"] == ["test_li"] and peers["sources"]["test_li"]["sha256"]
    assert meta["feature_dims"]["srai_hex2vec"] == 50
    # the metric holds no wall-clock time (in R.run.json beside it) and names the extract, not its path
    assert '"seconds' not in Path(suite_result["_out"]).read_text()
    assert (
        peers["sources"]["test_li"]["source"].endswith(".osm.pbf") and "/" not in peers["sources"]["test_li"]["source"]
    )
    run = json.loads(run_info_path(Path(suite_result["_out"])).read_text())
    assert run["meta"]["peers"]["seconds"]["fit_hex2vec"] > 0
    assert set(run["meta"]["tasks"]) == set(LEAKFREE_TASKS) and run["meta"]["tasks"]["venue_context"]["seconds"] > 0
    coverage = suite_result["meta"]["tasks"]["building_type"]["building_coverage"]["test_li"]
    assert coverage["untyped"] > 0 and coverage["residential"] > 0
    assert suite_result["meta"]["leakfree_score"] == pytest.approx(
        sum(tasks[t]["loc2vec"]["logreg"]["macro_f1"] for t in MASKED_TASKS) / 3
    ), "the gate's three masked tasks: road_surface hides nothing and is reported beside them"
    surfaces = suite_result["meta"]["tasks"]["road_surface"]
    assert surfaces["surface_coverage"]["test_li"]["untagged"] > 0 and set(surfaces["classes"]) == set(SURFACE_GROUPS)
    assert json.loads(suite_result["_stdout"]) == tasks, "stdout is the tasks table alone"


def test_suite_writes_a_chart_and_logs_to_mlflow(suite_result: dict) -> None:
    from mlflow import MlflowClient

    from loc2vec.core.tracking import use_store

    out = Path(suite_result["_out"])
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    p = load_project()
    use_store(p.paths)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(p.params.evaluate.experiment)
    runs = client.search_runs([experiment.experiment_id], "params.suite = 'leakfree'")
    assert runs, "the suite run is logged"
    run = runs[0]
    assert run.data.metrics["leakfree_score"] == pytest.approx(suite_result["meta"]["leakfree_score"])
    assert "venue_context.lift.logreg" in run.data.metrics and f"venue_context.lift_{WIDE}.hgb" in run.data.metrics
    assert {f.path for f in client.list_artifacts(run.info.run_id)} >= {out.name, png.name}


def test_suite_gate_score_is_leakfree_f1_plus_weighted_consumer_lift(project: Path, region: str) -> None:
    """The gate's formula on the test region: a constant encoder (every tile → one point) loses to a random one."""
    from loc2vec.evaluation.suite_gate import suite_gate_scores
    from loc2vec.training.model import Encoder

    from .fixtures.project import evaluation_context

    torch.manual_seed(5)
    random = Encoder(ModelConfig()).eval()
    constant = Encoder(ModelConfig()).eval()
    with torch.no_grad():
        for p in constant.parameters():
            p.zero_()
    with patched_params(project, {"evaluate": SMALL}):
        proj = load_project()
        scores = suite_gate_scores(
            {"random": random, "constant": constant}, [region], proj.params.evaluate, evaluation_context(proj), 0.5
        )
    for s in scores.values():
        assert s["score"] == pytest.approx(s["leakfree"] + 0.5 * s["consumer_lift"], abs=2e-4)
        assert {f"{region}/{t}" for t in MASKED_TASKS} | {f"{region}/transport.lift", f"{region}/venue.lift"} == set(
            s["tasks"]
        )
    assert scores["constant"]["consumer_lift"] == pytest.approx(0.0, abs=0.02), "a constant adds nothing to a baseline"
    assert scores["random"]["leakfree"] > scores["constant"]["leakfree"]
    assert scores["random"]["score"] > scores["constant"]["score"]


def test_suite_inputs_give_the_same_scores_as_the_suite_without_them(
    project: Path, region: str, model_dir: Path, suite_result: dict, tmp_path: Path
) -> None:
    """The `suite_inputs@R` → `evaluate@R` path (stored labels, masked tiles, baselines and their fits) scores the
    same model exactly as the suite computing everything itself; inputs of other params are refused. (The consumer
    tasks' inputs: tests/test_evaluate.py, where the test region is published to Feast.)"""
    from loc2vec.core.errors import ConfigError
    from loc2vec.evaluation.suite_inputs import SuiteInputs

    from .fixtures.project import evaluation_context

    inputs, out = tmp_path / "inputs", tmp_path / "cached.json"
    cli = [sys.executable, "-m", "loc2vec.cli"]
    with patched_params(project, {"evaluate": SMALL}):
        built = subprocess.run(
            [*cli, "suite-inputs", "--region", region, "--suite", "leakfree", "--out", str(inputs)],
            capture_output=True,
            text=True,
        )  # the consumer tasks' inputs need a published store: tests/test_evaluate.py checks them
        assert built.returncode == 0, built.stderr[-3000:]
        cmd = [*cli, "evaluate", "--suite", "leakfree", "--region", region, "--model", str(model_dir), "--no-track"]
        done = subprocess.run([*cmd, "--out", str(out), "--inputs", str(inputs)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        proj = load_project()
        cfg = proj.params.evaluate
        other = cfg.model_copy(update={"split": cfg.split.model_copy(update={"seed": 2})})
        with pytest.raises(ConfigError, match="built with other split"):
            SuiteInputs.open(inputs, region, other, evaluation_context(proj))
    cached = json.loads(out.read_text())
    assert list(cached["tasks"]) == list(suite_result["tasks"])
    for task, table in suite_result["tasks"].items():
        for name, by_kind in table.items():
            for kind, value in by_kind.items():
                if name.startswith("lift"):
                    assert cached["tasks"][task][name][kind] == value, (task, name, kind)
                else:
                    assert cached["tasks"][task][name][kind]["macro_f1"] == value["macro_f1"], (task, name, kind)
        assert cached["meta"]["tasks"][task]["n_tested"] == suite_result["meta"]["tasks"][task]["n_tested"]
    manifest = json.loads((inputs / "manifest.json").read_text())
    assert set(manifest["tasks"]) == set(LEAKFREE_TASKS) and manifest["suite"] == "leakfree"
    assert cached["meta"]["inputs"]["digest"] == manifest["digest"] and cached["meta"]["peers"]["fitted_on"] == [region]
    # the stored inputs hold no wall-clock time either (suite_inputs@R's DVC output): their seconds lie beside them
    assert '"seconds' not in (inputs / "manifest.json").read_text()
    for task in LEAKFREE_TASKS:  # nor the labels' observation time, stamped at evaluation as make_labels does
        assert "event_timestamp" not in pd.read_parquet(inputs / f"{task}.labels.parquet").columns, task
    assert json.loads(run_info_path(inputs).read_text())["tasks"]["venue_context"]["seconds"] > 0


def test_run_info_is_split_from_the_metric_and_nothing_else_moves() -> None:
    """Every `seconds*` key, at any depth, leaves the metric for the run info, in the same nesting; the rest stays."""
    from loc2vec.evaluation.provenance import split_run_info

    result = {
        "tasks": {"t": {"loc2vec": {"logreg": {"macro_f1": 0.5}}}},
        "meta": {
            "tasks": {"t": {"n_tested": 9, "seconds": 1.5, "seconds_phases": {"fit": 1.0}}},
            "peers": {"seconds": {"fit_hex2vec": 6.0}, "fitted_on": ["li"]},
            "inputs": {"digest": "ab"},
        },
        "seconds": 2.0,
    }
    kept, run = split_run_info(result)
    assert kept == {
        "tasks": result["tasks"],
        "meta": {"tasks": {"t": {"n_tested": 9}}, "peers": {"fitted_on": ["li"]}, "inputs": {"digest": "ab"}},
    }
    assert run == {
        "meta": {
            "tasks": {"t": {"seconds": 1.5, "seconds_phases": {"fit": 1.0}}},
            "peers": {"seconds": {"fit_hex2vec": 6.0}},
        },
        "seconds": 2.0,
    }
    assert split_run_info({"a": 1}) == ({"a": 1}, None)
    assert run_info_path(Path("data/evaluate/li.json")) == Path("data/evaluate/li.run.json")
    assert run_info_path(Path("data/suite/li")) == Path("data/suite/li.run.json")
