"""Aligned retrains (serving/procrustes.py, serving/aligned.py) on real embeddings of the test region, published
to the real Feast store (SQLite online store) with real MLflow runs.

Tiny untrained Encoders are registered under a model name of this module; the test region is embedded with
each at a coarse H3 resolution and published with ``publish.align_to: previous``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from .conftest import VADUZ
from .fixtures.project import clear_published, embed, load_project, publish, store_settings
from .fixtures.registry import register_untrained
from .fixtures.trained import patched_params

MODEL = "loc2vec-encoder-align-test"
RESOLUTION = 9


def _register(seed: int) -> str:
    return register_untrained(seed, MODEL, "loc2vec-align-test")


@pytest.fixture(scope="module")
def aligned_world(project: Path, region: str) -> Iterator[dict]:
    """Test params (coarse H3, own model name, align_to previous, every version kept), a clean Feast directory,
    v1 embedded."""
    from loc2vec.serving.store import forget_stores

    overrides = {
        "embed": {"h3_resolution": RESOLUTION, "batch_size": 64},
        "train": {"registered_model": MODEL},
        "publish": {"online_store": "sqlite", "align_to": "previous", "retain_versions": 5},
    }
    with patched_params(project, overrides):
        clear_published(project)
        forget_stores()
        v1 = _register(1)
        embed(region)
        yield {"region": region, "v1": v1}
        forget_stores()
        clear_published(project)


def _vectors(project: Path, region: str) -> pd.DataFrame:
    return pd.read_parquet(project / "data" / "embeddings" / f"{region}.parquet").set_index("h3_cell")


def test_known_rotation_is_recovered(aligned_world: dict, project: Path) -> None:
    """The encoder's embeddings of the region, rotated by a random orthogonal matrix and shifted: Procrustes
    finds that matrix (residual ~0) and maps the rotated vectors back."""
    from loc2vec.serving.procrustes import AlignmentError, fit_alignment, random_orthogonal

    x = np.stack(_vectors(project, aligned_world["region"])["embedding"]).astype(np.float64)
    assert x.shape[0] > 100 and x.shape[1] == 16
    q = random_orthogonal(16, seed=7)
    moved = x @ q + 0.5
    fit = fit_alignment(moved, x)
    assert fit.residual < 1e-6 and fit.residual_unaligned > 0.5
    np.testing.assert_allclose(fit.rotation, q.T, atol=1e-6)
    np.testing.assert_allclose(fit.apply(moved), x, atol=1e-5)
    assert np.allclose(fit.rotation @ fit.rotation.T, np.eye(16), atol=1e-9)
    with pytest.raises(AlignmentError, match="shared cells"):
        fit_alignment(x[:10], x[:10])


def _served_row(version: str | None, region_cells: pd.DataFrame) -> pd.Series:
    from loc2vec.serving.lookup import get_location_embeddings
    from loc2vec.serving.store import forget_stores

    forget_stores()
    return get_location_embeddings([VADUZ[0]], [VADUZ[1]], store_settings(), version=version).iloc[0]


def test_publish_aligned_versions(aligned_world: dict, project: Path) -> None:
    """v1 published; v2 published with align_to previous also serves 2a1 = v2 rotated into v1's space (the
    rotation and residual in MLflow); v1 stays bit-for-bit; latest serves v2 itself; a re-publish is skipped;
    v3 is aligned to 2a1 and lands in v1's space as 3a1."""
    from mlflow import MlflowClient

    from loc2vec.core.tracking import use_store
    from loc2vec.serving.aligned import EXPERIMENT, alignment_record
    from loc2vec.serving.procrustes import fit_alignment

    region, v1 = aligned_world["region"], aligned_world["v1"]
    first = publish()
    assert first["served_versions"] == [v1], "nothing to align the first version to"
    pinned = _served_row(v1, None)
    x1 = _vectors(project, region)

    v2 = _register(2)
    embed(region)
    x2 = _vectors(project, region)
    report = publish()
    name = f"{v2}a{v1}"
    assert report["served_versions"] == [v1, v2, name]
    row = _served_row(name, None)
    assert row["model_version"] == name
    shared = x1.index.intersection(x2.index)
    fit = fit_alignment(np.stack(x2.loc[shared, "embedding"]), np.stack(x1.loc[shared, "embedding"]))
    want = fit.apply(np.stack(x2.loc[[row["h3_cell"]], "embedding"]))[0]
    np.testing.assert_array_equal(np.asarray(row["embedding"], np.float32), want)
    assert _served_row(v1, None)["embedding"] == pinned["embedding"], "the pinned old version is unchanged"
    assert _served_row(None, None)["model_version"] == v2, "latest serves the new version as trained"

    aligned_file = project / "data" / "feast" / "aligned" / f"{region}_v{name}.parquet"
    record = alignment_record(aligned_file)
    assert abs(record["residual"] - fit.residual) < 1e-9 and record["n_cells"] == len(shared)
    use_store(load_project().paths)
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    logged = [r for r in runs if r.data.params.get("aligned_version") == name]
    assert len(logged) == 1 and abs(logged[0].data.metrics["residual"] - fit.residual) < 1e-9
    assert publish()["skipped"], "the same data aligns to the same rows: nothing to publish"

    v3 = _register(3)
    embed(region)
    report = publish()
    assert report["served_versions"] == [v1, v2, name, v3, f"{v3}a{v1}"], "chained: v3 into 2a1's space, v1's"
    assert _served_row(v1, None)["embedding"] == pinned["embedding"]


def test_pyfunc_returns_the_lookup_vector(aligned_world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lookup pyfunc, logged to a temporary MLflow store with its pinned requirements and loaded back with
    mlflow.pyfunc.load_model, returns for Vaduz the vector get_location_embeddings returns (the pinned v1)."""
    import mlflow

    from loc2vec.serving.lookup import get_location_embeddings
    from loc2vec.serving.pyfunc import log_pyfunc, pinned_requirements

    p = load_project()
    publish(project=p)  # nothing to do after the test above; run alone, v1 is published here
    settings = store_settings(project=p)
    v1 = aligned_world["v1"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("pyfunc-test")
    with mlflow.start_run():
        info = log_pyfunc(settings, p.params.db, v1)
    requirements = (Path(mlflow.artifacts.download_artifacts(info.model_uri)) / "requirements.txt").read_text()
    assert all(r in requirements for r in pinned_requirements()) and "==" in requirements

    model = mlflow.pyfunc.load_model(info.model_uri)
    got = model.predict(pd.DataFrame({"lat": [VADUZ[0], 47.141], "lon": [VADUZ[1], 9.521]}))
    want = get_location_embeddings([VADUZ[0], 47.141], [VADUZ[1], 9.521], settings, version=v1)
    assert list(got["model_version"]) == [v1, v1]
    for i in range(2):
        assert list(got["embedding"].iloc[i]) == want["embedding"].iloc[i], "bit for bit"
    with pytest.raises(Exception, match="no published embedding"):
        model.predict(pd.DataFrame({"lat": [0.0], "lon": [0.0]}))

    # a fresh interpreter, outside the checkout, without PYTHONPATH: the model imports its own copy of loc2vec
    code = f"""
import json, mlflow, pandas as pd
model = mlflow.pyfunc.load_model({info.model_uri!r})
import loc2vec
row = model.predict(pd.DataFrame({{"lat": [{VADUZ[0]}], "lon": [{VADUZ[1]}]}})).iloc[0]
print(json.dumps({{"file": loc2vec.__file__, "embedding": list(row["embedding"])}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "/artifacts/code/loc2vec/" in fresh["file"], fresh["file"]
    assert fresh["embedding"] == want["embedding"].iloc[0]
