"""Scale-out (loc2vec.orchestration.runners): metatiles and embeddings over Prefect's thread runner and a real
Dask LocalCluster (two worker processes) equal the inline path, on the real test region.

Metatiles are byte-identical on every runner, and so are embeddings from threads. Embeddings from Dask
workers are compared with a tolerance instead: Dask's nanny starts workers with OMP_NUM_THREADS=1, and a
convolution summed by one thread rounds differently in the last bits than one summed by two (seen: one
float of thousands, 1 ulp). Every other column must still be identical, byte for byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from .fixtures.project import embed, ensure_metatiles, load_project
from .fixtures.registry import register_encoder
from .fixtures.trained import patched_params
from .prefect_harness import prefect_harness  # noqa: F401  (the session's Prefect test server)

MODEL = "loc2vec-encoder-fanout-test"


def _register(seed: int) -> str:
    """A tiny untrained Encoder, registered as `champion` of MODEL in the test project's MLflow store."""
    from loc2vec.training.model import Encoder

    torch.manual_seed(seed)
    return register_encoder(Encoder(load_project().params.model).eval(), MODEL, "loc2vec-fanout-test")


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


def _embeddings(data: bytes) -> np.ndarray:
    import io

    import pyarrow.parquet as pq

    column = pq.read_table(io.BytesIO(data)).column("embedding").combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1)


def _diff(out: dict[str, bytes], kind: str) -> list[str]:
    """The columns in which a runner's Parquet differs from the inline one (for the failure message)."""
    import io

    import pyarrow.parquet as pq

    a, b = (pq.read_table(io.BytesIO(out[k])) for k in ("inline", kind))
    return [c for c in a.column_names if c not in b.column_names or not a[c].equals(b[c])]


def test_runner_selection(monkeypatch: pytest.MonkeyPatch, project: Path) -> None:
    from pydantic import ValidationError

    from loc2vec.core.config import OrchestrateConfig, parse_params
    from loc2vec.core.errors import ConfigError
    from loc2vec.embedding.encode import chunk_bounds
    from loc2vec.orchestration.runners import make_task_runner, runner_kind

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
    with pytest.raises(ValidationError, match="task_runner"):
        OrchestrateConfig(task_runner="cluster")
    raw = {
        "regions": {"registry": {"liechtenstein": {"source": "x.osm.pbf"}}},
        "orchestrate": {"task_runner": "cluster"},
    }
    with pytest.raises(ConfigError, match="orchestrate.task_runner"):  # as params.yaml is loaded
        parse_params(raw, project)
    # Chunks are whole batches: every forward pass of a chunk is a forward pass of the one-pass encoding.
    assert chunk_bounds(100, 32, 2) == [(0, 64), (64, 100)]
    assert chunk_bounds(0, 32, 2) == []


@pytest.mark.usefixtures("prefect_harness")
def test_metatiles_identical_on_every_runner(
    fanout_params: str, dask_cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loc2vec.embedding.cells import select_cells
    from loc2vec.raster.metatiles import clear_metatiles

    region = fanout_params
    p = load_project()
    _, lats, lons = select_cells(region, p.params.embed, p.params.render.radius_m, p.info)
    directory = p.paths.metatiles(region)
    monkeypatch.setenv("LOC2VEC_DASK_ADDRESS", dask_cluster)
    digests, entries = {}, {}
    for kind in ("inline", "threads", "dask"):
        monkeypatch.setenv("LOC2VEC_TASK_RUNNER", kind)
        clear_metatiles(directory)
        index = ensure_metatiles(region, lats, lons, project=p)
        assert len(index.rendered) == len(index) >= 2, f"{kind}: every needed metatile rendered"
        digests[kind] = _digests(directory)
        entries[kind] = index.to_json()["metatiles"]
    assert digests["threads"] == digests["inline"] == digests["dask"]
    assert entries["threads"] == entries["inline"] == entries["dask"]


@pytest.mark.usefixtures("prefect_harness")
def test_embeddings_identical_on_every_runner(
    fanout_params: str, dask_cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    region = fanout_params
    p = load_project()
    monkeypatch.setenv("LOC2VEC_DASK_ADDRESS", dask_cluster)
    out: dict[str, bytes] = {}
    for kind in ("inline", "threads", "dask"):
        monkeypatch.setenv("LOC2VEC_TASK_RUNNER", kind)
        path = embed(region, MODEL, project=p)  # the champion of MODEL, as `loc2vec embed` resolves it
        assert path.stats["task_runner"] == kind
        assert path.stats["model_name"] == MODEL
        assert path.stats["cells"] > 2 * 64, "several embedding tasks (64 cells each)"
        out[kind] = path.read_bytes()
    assert out["threads"] == out["inline"], (
        f"threads: the same Parquet, byte for byte; differs in {_diff(out, 'threads')}"
    )
    assert _diff(out, "dask") in ([], ["embedding"]), "dask: only the embedding may differ, by rounding"
    inline, dask = (_embeddings(out[k]) for k in ("inline", "dask"))
    assert inline.shape == dask.shape
    np.testing.assert_allclose(dask, inline, rtol=0, atol=1e-5)  # float32 rounding, not another embedding
    assert p.paths.root / "data" / "embeddings" / f"{region}.parquet" == path


def test_loc2vec_embed_resolves_cpu_bf16_auto_for_this_machine(
    fanout_params: str, project: Path, tmp_path: Path
) -> None:
    """embed.cpu_bf16: auto, resolved by `loc2vec embed` itself (cli/main.py, lifting the ISA pin it set): bf16 with
    the CPU's own kernels where it has them (the .json says so; every cell's cosine ≥ 0.999 with the float32
    embedding), else the pinned float32 embedding. The same check as test_numerics' for train.cpu_bf16: auto."""
    import json
    import subprocess
    import sys

    from loc2vec.core.numerics import bf16_kernels_available

    region = fanout_params
    fp32 = _embeddings(embed(region, MODEL, project=load_project()).read_bytes())  # params' default: false
    out = tmp_path / "auto.parquet"
    with patched_params(project, {"embed": {"cpu_bf16": "auto"}}):
        cmd = [sys.executable, "-m", "loc2vec.cli", "embed", "--region", region, "--out", str(out)]
        proc = subprocess.run(cmd, cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bf16 = bf16_kernels_available({})  # this CPU, no cap: what the command resolves after lifting its own pin
    assert json.loads(out.with_suffix(".json").read_text())["config"]["cpu_bf16"] is bf16
    auto = _embeddings(out.read_bytes())
    if bf16:
        cos = (auto * fp32).sum(1) / (np.linalg.norm(auto, axis=1) * np.linalg.norm(fp32, axis=1))
        assert not np.array_equal(auto, fp32) and cos.min() >= 0.999, cos.min()
    else:
        np.testing.assert_allclose(auto, fp32, rtol=0, atol=1e-5)
