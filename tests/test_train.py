"""Training on the real test region: triplet batches, exact kill-and-resume, MLflow tracking and registry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from .fixtures.project import evaluation_context, load_project
from .fixtures.registry import register_encoder
from .fixtures.trained import patched_params

TINY = {
    "sample": {"n_locations": 160, "block_m": 400.0, "seed": 7},
    "triplets": {"locations_per_batch": 4, "pairs_per_location": 2},
    "train": {
        "max_steps": 24,
        "checkpoint_every": 4,
        "val_every": 6,
        "val_batches": 2,
        "max_minutes": 0.0,
        "warmup_steps": 2,
        "prefetch": 1,
    },
}


@pytest.fixture(scope="module")
def tiny(project: Path, region: str) -> Iterator[Path]:
    """The test project with tiny sampling/training params, sampled once for the module."""
    from .fixtures.project import write_samples

    with patched_params(project, {**TINY, "pipeline": {"regions": [region]}}):
        write_samples(region)
        yield project


def _checkpoint(project: Path) -> Path:
    return project / "data" / "checkpoints" / "train.pt"


def test_triplet_batches_follow_the_article(tiny: Path, region: str) -> None:
    from loc2vec.training.batches import TripletBatches, TripletConfig
    from loc2vec.training.sources import build_source
    from loc2vec.training.trainer import Trainer

    p = load_project()
    article = p.params.model_copy(update={"model": p.params.model.model_copy(update={"centre_px": 0})})
    trainer = Trainer.from_params(article, [region], p.info)  # the article's encoder: one 12-channel view
    source = build_source(trainer.samples, trainer.source, torch.device("cpu"))
    cfg = TripletConfig.from_config(p.params.triplets, p.params.augment)

    rows = np.flatnonzero(trainer.samples["split"].to_numpy() == "train")
    stream = TripletBatches(source, rows, cfg, seed=3)
    batch = stream.batch(0)
    b = cfg.locations_per_batch * cfg.pairs_per_location
    assert batch.anchor.shape == batch.positive.shape == batch.negative.shape == (b, 12, 128, 128)
    assert batch.anchor.dtype == torch.uint8
    loc = batch.location.numpy()
    assert len(set(loc)) == cfg.locations_per_batch and set(loc) <= set(rows)
    # P pairs per location share the anchor; positives differ (fresh rotation/shift each)
    assert torch.equal(batch.anchor[0], batch.anchor[1])
    assert not torch.equal(batch.positive[0], batch.positive[1])
    # negatives are tiles of *other* locations of the batch: never equal to the own anchor's positives
    assert all(not torch.equal(batch.negative[i], batch.positive[i]) for i in range(b))
    # batch k is a pure function of (seed, k)
    again = stream.batch(0)
    assert torch.equal(again.positive, batch.positive) and torch.equal(again.negative, batch.negative)


def test_channel_drop_switches_whole_channels_off() -> None:
    from loc2vec.training.batches import drop_channels

    tiles = torch.full((200, 12, 4, 4), 255, dtype=torch.uint8)
    out = drop_channels(tiles, 0.3, torch.Generator().manual_seed(0))
    per_channel = out.amax(dim=(2, 3))
    assert set(per_channel.unique().tolist()) == {0, 255}, "channels are either kept whole or dropped whole"
    assert 0.2 < (per_channel == 0).float().mean() < 0.4
    assert (per_channel.amax(dim=1) == 255).all(), "a tile never loses every channel"


class CountingEncoder(torch.nn.Module):
    """The real (untrained, eval-mode) encoder, counting the tiles it is given."""

    def __init__(self) -> None:
        super().__init__()
        from loc2vec.core.config import ModelConfig
        from loc2vec.training.model import Encoder

        self.encoder, self.tiles = Encoder(ModelConfig()).eval(), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tiles += len(x)
        return self.encoder(x)


def test_negative_free_losses_encode_no_negatives() -> None:
    """infonce and vicreg read no negatives, so the step encodes anchors and positives only (a third fewer tiles)
    and takes another location's positive as n for the triplet metrics; the rest of the output is unchanged."""
    from loc2vec.training.batches import TripletBatch, stand_in_negatives
    from loc2vec.training.losses import LOSSES, NEGATIVE_FREE
    from loc2vec.training.trainer import forward_triplets

    gen = torch.Generator().manual_seed(0)
    tiles = [torch.randint(0, 256, (6, 12, 128, 128), dtype=torch.uint8, generator=gen) for _ in range(3)]
    location = torch.tensor([10, 10, 11, 11, 12, 12])  # L = 3 locations × P = 2 pairs, in runs
    batch = TripletBatch(*tiles, location)
    model, cpu = CountingEncoder(), torch.device("cpu")
    with torch.no_grad():
        full = forward_triplets(model, batch, cpu, channels_last=True)
        assert model.tiles == 18
        lean = forward_triplets(model, batch, cpu, channels_last=True, encode_negatives=False)
        assert model.tiles == 18 + 12
    index = stand_in_negatives(location)
    assert index is not None and (location[index] != location).all()
    torch.testing.assert_close(lean[0], full[0])
    torch.testing.assert_close(lean[1], full[1])
    torch.testing.assert_close(lean[2], full[1][index])
    # one location alone has no other location's positive: the batch is encoded whole
    single = TripletBatch(*tiles, torch.full((6,), 10))
    assert stand_in_negatives(single.location) is None
    with torch.no_grad():
        lone = forward_triplets(model, single, cpu, channels_last=True, encode_negatives=False)
    torch.testing.assert_close(lone[2], full[2])
    # what makes skipping them safe: these losses do not change with n
    a, p, n = (torch.randn(6, 16, generator=gen) for _ in range(3))
    for name in sorted(NEGATIVE_FREE):
        torch.testing.assert_close(LOSSES[name](a, p, n), LOSSES[name](a, p, torch.randn(6, 16, generator=gen)))


def test_validation_encodes_each_distinct_tile_once() -> None:
    """Validation encodes a location's anchor once and copies its negatives from its positives' embeddings: 120
    tiles instead of 300 with the default batch shape, and the same embeddings (eval mode) up to the head's float
    rounding (MKL: `forward_triplets`' docstring). A batch with channel drop keeps no copy index (its negatives are
    undropped copies of dropped positives)."""
    import numpy as np

    from loc2vec.training.batches import TripletBatches, TripletConfig, anchor_rows
    from loc2vec.training.trainer import forward_triplets

    class RandomTiles:  # a TileSource: one fixed random tile per location, positives its noisy copies
        def __init__(self, n: int) -> None:
            self.tiles = torch.randint(
                0, 256, (n, 12, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
            )

        def __len__(self) -> int:
            return len(self.tiles)

        def pairs(self, rows, n_pairs, rng):
            anchors = self.tiles[torch.from_numpy(np.repeat(rows, n_pairs))]
            noise = torch.from_numpy(rng.integers(0, 256, anchors.shape, dtype=np.uint8))
            return anchors, anchors ^ noise

    cfg = TripletConfig(locations_per_batch=4, pairs_per_location=3, channel_drop_p=0.0)
    batch = TripletBatches(RandomTiles(9), np.arange(9), cfg, seed=3).batch(0)
    assert batch.negative_row is not None and torch.equal(batch.negative, batch.positive[batch.negative_row])
    first, inverse = anchor_rows(batch.location)
    assert len(first) == 4 and torch.equal(batch.anchor[first][inverse], batch.anchor)
    model, cpu = CountingEncoder(), torch.device("cpu")
    with torch.no_grad():
        full = forward_triplets(model, batch, cpu, channels_last=True)
        assert model.tiles == 36
        once = forward_triplets(model, batch, cpu, channels_last=True, distinct_once=True)
        assert model.tiles == 36 + 4 + 12
    for whole, lean in zip(full, once, strict=True):
        torch.testing.assert_close(lean, whole, rtol=1e-5, atol=1e-5)
    dropped = TripletBatches(RandomTiles(9), np.arange(9), TripletConfig(4, 3, channel_drop_p=0.2), seed=3).batch(0)
    assert dropped.negative_row is None
    with torch.no_grad():  # nothing to copy: the negatives are encoded (the anchors still once per location)
        forward_triplets(model, dropped, cpu, channels_last=True, distinct_once=True)
    assert model.tiles == 52 + 4 + 12 + 12


def _run_fit(resume: bool) -> None:
    """`loc2vec train` in its own process, like the killed run: every run computes with the CPU numerics the
    command line pins (core/numerics.py), whatever earlier tests did to this process's torch state."""
    cmd = [sys.executable, "-m", "loc2vec.cli", "train", "--no-mlflow", *([] if resume else ["--no-resume"])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _final_state(project: Path) -> dict:
    return torch.load(_checkpoint(project), weights_only=False)


def test_kill_and_resume_reproduces_the_uninterrupted_run(tiny: Path) -> None:
    # Reference: an uninterrupted run; its last checkpoint holds the final weights and optimizer state.
    _checkpoint(tiny).unlink(missing_ok=True)
    _run_fit(resume=False)
    reference = _final_state(tiny)
    assert reference["state"].step == TINY["train"]["max_steps"]
    _checkpoint(tiny).unlink()

    # A second run, killed with SIGKILL after its first checkpoints.
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "loc2vec.cli", "train", "--no-mlflow", "--no-resume"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        if _checkpoint(tiny).is_file():
            step = torch.load(_checkpoint(tiny), weights_only=False)["state"].step
            if 8 <= step < TINY["train"]["max_steps"]:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_at = step
                break
        time.sleep(0.05)
    assert killed_at is not None, f"the run was not killed mid-training: {proc.stderr.read() if proc.stderr else ''}"
    interrupted = _final_state(tiny)
    assert killed_at <= interrupted["state"].step < TINY["train"]["max_steps"]

    # Resume: starts at the checkpointed step with the checkpointed optimizer state, ends identical.
    _run_fit(resume=True)
    resumed = _final_state(tiny)
    steps = [r["step"] for r in resumed["state"].history]
    assert steps == list(range(1, TINY["train"]["max_steps"] + 1)), "no step lost or repeated"
    for key in reference["model"]:
        torch.testing.assert_close(resumed["model"][key], reference["model"][key], rtol=0, atol=0)
    ref_opt, res_opt = reference["optimizer"]["state"], resumed["optimizer"]["state"]
    for pid in ref_opt:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(res_opt[pid][name], ref_opt[pid][name], rtol=0, atol=0)
    assert resumed["scheduler"]["last_epoch"] == reference["scheduler"]["last_epoch"]


def test_training_is_tracked_in_mlflow_and_registered(tiny: Path, region: str) -> None:
    import mlflow
    from mlflow import MlflowClient

    from loc2vec.core.tracking import tracking_uri
    from loc2vec.training.registry import CHAMPION
    from loc2vec.training.trainer import Trainer, train

    p = load_project()
    trainer = Trainer.from_params(p.params, [region], p.info, paths=p.paths)
    summary = train(trainer, resume=False, track=True, paths=p.paths)
    assert (tiny / "data" / "model" / "model.pt").is_file()
    assert summary["steps"] == TINY["train"]["max_steps"] and 0 <= summary["best_val_triplet_accuracy"] <= 1

    mlflow.set_tracking_uri(tracking_uri(p.paths))
    client = MlflowClient()
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["train.lr"] == str(p.params.section("train")["lr"])
    assert run.data.params["git_commit"] != "unknown"
    assert any(k.startswith("samples.") for k in run.data.params), "data versions are logged"
    for metric in ("loss", "d_pos", "d_neg", "triplet_accuracy"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert len(history) == TINY["train"]["max_steps"], metric
    assert len(client.get_metric_history(run.info.run_id, "val_triplet_accuracy")) >= 3
    figures = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"triplets.png", "training_curves.png", "activation_max_bottom.png", "activation_max_upper.png"} <= figures

    name = p.params.train.registered_model
    champion = client.get_model_version_by_alias(name, CHAMPION)
    assert champion.run_id == run.info.run_id
    model = mlflow.pytorch.load_model(f"models:/{name}@{CHAMPION}")
    out = model(torch.zeros(2, 12, 128, 128))
    assert out.shape == (2, 16)


def test_champion_gate_moves_champion_only_for_a_downstream_improvement(tiny: Path, region: str) -> None:
    """Training registers a candidate; the gate promotes it only if it beats the champion downstream."""
    import json

    from mlflow import MlflowClient

    from loc2vec.evaluation.gate import promote
    from loc2vec.training.model import Encoder
    from loc2vec.training.registry import CANDIDATE, CHAMPION
    from loc2vec.training.trainer import Trainer, train

    path = tiny / "params.yaml"
    saved = path.read_text()
    params = yaml.safe_load(saved)
    params["evaluate"] = {
        # test_suite's SMALL label counts (building_type's too: its default of 150 masked renders per group
        # dominated the gate's time), groups under 8 labels dropped, 3 spatial folds
        "labels": {
            "transport_per_class": 25, "venue_per_class": 20, "building_per_class": 20, "min_per_class": 8, "seed": 3,
        },
        "split": {"block_m": 600.0, "folds": 3, "seed": 1},
    }  # fmt: skip
    params["train"]["registered_model"] = name = "gate-test"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proj = load_project()  # after the edit above: params are re-read

        def gate() -> dict:
            return promote(
                [region],
                proj.paths.promotion,
                model_name=proj.params.train.registered_model,
                cfg=proj.params.promote,
                evaluate_cfg=proj.params.evaluate,
                ctx=evaluation_context(proj),
            )

        train(Trainer.from_params(proj.params, [region], proj.info, paths=proj.paths), resume=False, paths=proj.paths)
        client = MlflowClient()
        trained = client.get_model_version_by_alias(name, CANDIDATE)
        version = str(trained.version)
        assert str(client.get_model_version_by_alias(name, CHAMPION).version) == version, "the first is champion"
        # the first version is champion already: nothing to compare it with, so it is not scored
        first = gate()
        assert first["champion_version"] == first["candidate_version"] == version and not first["promoted"]
        assert first["candidate_score"] is None and first["candidate_tasks"] == {}
        assert "gate_score" not in client.get_model_version(name, version).tags
        assert json.loads(proj.paths.promotion.read_text()) == first

        # a champion that maps every tile to the same point: any trained candidate must beat it (logged with
        # its pip requirements given, as training logs models: MLflow's inference of them costs ~10 s)
        constant = Encoder()
        with torch.no_grad():
            for p in constant.parameters():
                p.zero_()
        register_encoder(constant.eval(), name, "gate-test")
        result = gate()
        assert result["promoted"] and result["champion_version"] == version
        assert result["candidate_score"] > result["champion_score"]
        assert str(client.get_model_version_by_alias(name, CHAMPION).version) == version
        assert json.loads(proj.paths.promotion.read_text())["champion_version"] == version
        assert float(client.get_model_version(name, version).tags["gate_score"]) == result["candidate_score"]

        # the same weights again as candidate (a deterministic retrain): no lead by identity, not scored, the
        # champion stays
        again = client.create_model_version(name, source=trained.source, run_id=trained.run_id).version
        client.set_registered_model_alias(name, CANDIDATE, again)
        result = gate()
        assert not result["promoted"] and result["candidate_lead"] == 0.0 and result["same_weights_as_champion"]
        assert result["candidate_score"] is None and result["candidate_version"] == str(again)
        assert "gate_score" not in client.get_model_version(name, again).tags
        assert str(client.get_model_version_by_alias(name, CHAMPION).version) == version
    finally:
        path.write_text(saved)


def test_centre_branch_trains_on_a_centre_view_cut_at_the_same_rotation(
    tiny: Path, region: str, tmp_path: Path
) -> None:
    from dataclasses import replace

    from loc2vec.core.errors import Loc2VecError
    from loc2vec.raster.cutter import cut_tiles
    from loc2vec.training.batches import TripletBatches, TripletConfig
    from loc2vec.training.outputs import load_encoder
    from loc2vec.training.sources import build_source
    from loc2vec.training.trainer import Trainer

    centre = {"model": {"centre_px": 32}, "train": {"max_steps": 3, "val_every": 3}}
    with patched_params(tiny, centre):
        p = load_project()
        trainer = Trainer.from_params(p.params, [region], p.info, out_dir=tmp_path, checkpoint_dir=tmp_path)
    with patched_params(tiny, {"model": {"centre_px": 0}}):  # the encoder without the branch
        plain = Trainer.from_params(load_project().params, [region], p.info, out_dir=tmp_path, checkpoint_dir=tmp_path)
    source = build_source(trainer.samples, trainer.source, torch.device("cpu"))
    plain_source = build_source(plain.samples, plain.source, torch.device("cpu"))
    rows = np.flatnonzero(trainer.samples["split"].to_numpy() == "train")[:3]

    anchors, positives = source.pairs(rows, 2, np.random.default_rng(5))
    assert anchors.shape == positives.shape == (6, 24, 128, 128)
    assert torch.equal(anchors[:, :12], anchors[:, 12:])  # the anchor is both of its views
    plain_anchors, plain_positives = plain_source.pairs(rows, 2, np.random.default_rng(5))
    # the context views are what the source cuts without a centre branch: the centre's shifts are drawn last
    assert torch.equal(anchors[:, :12], plain_anchors) and torch.equal(positives[:, :12], plain_positives)
    # the centre view: the same rotation, shifted at most augment.centre_max_shift_m
    rng = np.random.default_rng(5)
    angles, _ = rng.uniform(0.0, 360.0, 6), rng.uniform(-80.0, 80.0, (6, 2))
    small = rng.uniform(-15.0, 15.0, (6, 2))
    lats = np.repeat(source.lats[rows], 2)
    lons = np.repeat(source.lons[rows], 2)
    assert torch.equal(positives[:, 12:], cut_tiles(source.index, lats, lons, angles, small))

    cfg = replace(TripletConfig.from_config(p.params.triplets, p.params.augment), channel_drop_p=0.0)
    batch = TripletBatches(source, rows, cfg, seed=1).batch(0)
    assert batch.anchor.shape[1] == batch.positive.shape[1] == batch.negative.shape[1] == 24

    summary = trainer.fit(resume=False)  # a few steps on the two views, no MLflow
    assert summary["steps"] == 3
    model = load_encoder(tmp_path)
    assert model.cfg.centre_px == 32 and model.cfg.centre_source == p.params.model.centre_source
    tiles = anchors[:2, :12].float() / 255
    with torch.no_grad():
        assert model(tiles).shape == (2, 16) and model.representation(tiles).shape == (2, 32 + 64)
    with pytest.raises(Loc2VecError, match="train.source: metatiles"):
        build_source(trainer.samples, replace(trainer.source, kind="tiles"), torch.device("cpu"))
