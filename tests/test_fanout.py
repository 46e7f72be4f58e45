"""Scale-out (loc2vec/fanout.py): metatiles and embeddings over Prefect's thread runner and a real Dask
LocalCluster (two worker processes) are byte-identical to the inline path, on the real test region."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loc2vec.config import load_params

from .fixtures.registry import register_encoder
from .fixtures.trained import patched_params
from .prefect_harness import prefect_harness  # noqa: F401  (the session's Prefect test server)

MODEL = "loc2vec-encoder-fanout-test"


def _register(seed: int) -> str:
    """A tiny untrained Encoder, registered as `champion` of MODEL in the test project's MLflow store."""
    from loc2vec.model import Encoder

    torch.manual_seed(seed)
    return register_encoder(Encoder().eval(), MODEL, "loc2vec-fanout-test")


@pytest.fixture(scope="module")
def fanout_params(project: Path, region: str) -> Iterator[str]:
    """Coarse H3 cells in small batches, two batches per embedding task: several tasks on the test region."""
    overrides = {
        "embed": {"h3_resolution": 9, "batch_size": 32},
        "train": {"registered_model": MODEL},
        "orchestrate": {"embed_chunk_batches": 2, "max_workers": 2, "retries": 1, "retry_backoff_s": 0.1},
    }
    with patched_params(project, overrides):
        _register(seed=3)
        yield region


@pytest.fixture(scope="module")
def dask_cluster(project: Path) -> Iterator[str]:
    """A real LocalCluster of two single-threaded worker processes (they inherit the test project's env)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.npy"))}


def _diff(out: dict[str, bytes], kind: str) -> list[str]:
    """The columns in which a runner's Parquet differs from the inline one (for the failure message)."""
    import io

    import pyarrow.parquet as pq

    a, b = (pq.read_table(io.BytesIO(out[k])) for k in ("inline", kind))
    return [c for c in a.column_names if c not in b.column_names or not a[c].equals(b[c])]


def test_runner_selection(monkeypatch: pytest.MonkeyPatch, project: Path) -> None:
    from loc2vec.config import ConfigError
    from loc2vec.fanout import OrchestrateConfig, chunk_bounds, make_task_runner, runner_kind

    monkeypatch.delenv("LOC2VEC_TASK_RUNNER", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert runner_kind(OrchestrateConfig()) == "inline", "auto without a Prefect API: no Prefect in the path"
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    assert runner_kind(OrchestrateConfig()) == "threads", "auto under a Prefect API: Prefect's thread runner"
    monkeypatch.setenv("LOC2VEC_TASK_RUNNER", "dask")
    assert runner_kind(OrchestrateConfig()) == "dask", "the environment wins"
    runner = make_task_runner(OrchestrateConfig(dask_n_workers=3))
    assert type(runner).__name__ == "DaskTaskRunner" and runner.cluster_kwargs["n_workers"] == 3
    assert make_task_runner(OrchestrateConfig(dask_address="tcp://10.0.0.1:8786")).address == "tcp://10.0.0.1:8786"
    monkeypatch.setenv("LOC2VEC_TASK_RUNNER", "threads")
    assert make_task_runner(OrchestrateConfig(max_workers=3))._max_workers == 3
    monkeypatch.setenv("LOC2VEC_TASK_RUNNER", "processes")
    with pytest.raises(ConfigError):
        runner_kind(OrchestrateConfig())
    with pytest.raises(ConfigError):
        OrchestrateConfig(task_runner="cluster")
    # Chunks are whole batches: every forward pass of a chunk is a forward pass of the one-pass encoding.
    assert chunk_bounds(100, 32, 2) == [(0, 64), (64, 100)]
    assert chunk_bounds(0, 32, 2) == []


@pytest.mark.usefixtures("prefect_harness")
def test_metatiles_identical_on_every_runner(
    fanout_params: str, dask_cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loc2vec.embed import select_cells
    from loc2vec.metatiles import clear_metatiles, ensure_metatiles, metatile_dir

    region = fanout_params
    _, lats, lons = select_cells(region)
    monkeypatch.setenv("LOC2VEC_DASK_ADDRESS", dask_cluster)
    digests, entries = {}, {}
    for kind in ("inline", "threads", "dask"):
        monkeypatch.setenv("LOC2VEC_TASK_RUNNER", kind)
        clear_metatiles(region)
        index = ensure_metatiles(region, lats, lons, progress=False)
        assert len(index.rendered) == len(index) >= 2, f"{kind}: every needed metatile rendered"
        digests[kind] = _digests(metatile_dir(region))
        entries[kind] = index.to_json()["metatiles"]
    assert digests["threads"] == digests["inline"] == digests["dask"]
    assert entries["threads"] == entries["inline"] == entries["dask"]


@pytest.mark.usefixtures("prefect_harness")
def test_embeddings_identical_on_every_runner(
    fanout_params: str, dask_cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loc2vec.embed import embed_region, resolve_champion

    region = fanout_params
    ref = resolve_champion(MODEL)
    monkeypatch.setenv("LOC2VEC_DASK_ADDRESS", dask_cluster)
    out: dict[str, bytes] = {}
    for kind in ("inline", "threads", "dask"):
        monkeypatch.setenv("LOC2VEC_TASK_RUNNER", kind)
        path = embed_region(region, model=ref, progress=False)
        assert path.stats["task_runner"] == kind
        assert path.stats["cells"] > 2 * 64, "several embedding tasks (64 cells each)"
        out[kind] = path.read_bytes()
    for kind in ("threads", "dask"):
        assert out[kind] == out["inline"], f"{kind}: the same Parquet, byte for byte; differs in {_diff(out, kind)}"
    assert load_params().root / "data" / "embeddings" / f"{region}.parquet" == path
