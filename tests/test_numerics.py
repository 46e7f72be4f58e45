"""The same samples train the same model on any machine (CPU): `loc2vec train` on two simulated machines.

Two machines differ in what the libraries see: how many cores (torch's default thread count) and which
instructions (oneDNN, ATen, MKL, numpy and OpenBLAS pick their kernels by CPU). Here machine A is this one
with two cores and its own instructions (AVX-512 where it has them); machine B has one core (`taskset`) and
only AVX2, with OpenBLAS's choice on an AVX-only CPU (the libraries' own caps: ONEDNN_MAX_CPU_ISA,
ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, NPY_DISABLE_CPU_FEATURES, OPENBLAS_CORETYPE). With the default
`compute:` params (2 threads, kernels capped at AVX2: core/numerics.py) both write byte-identical model.pt
and fit byte-identical logistic regressions; with `compute: {cpu_isa: native, cpu_threads: 0}` they differ,
which is what two machines did before (and shows the simulation is real).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loc2vec.core.numerics import ISA_ENV, PIN_MARKER, THREAD_ENV, bf16_kernels_available

from .conftest import REPO
from .fixtures.trained import patched_params

STEPS = 4  # enough optimizer steps for the digests to carry every kernel's rounding
TRAIN = {
    "sample": {"n_locations": 160, "block_m": 400.0, "seed": 7},
    # 8 triplets a step (test_train's TINY batch): every kernel the digests compare runs as with larger
    # batches, at a quarter of the cost of 32
    "triplets": {"locations_per_batch": 4, "pairs_per_location": 2},
    # float32 with the pinned kernels: what machines agree on (train.cpu_bf16: auto is tested on its own below)
    "train": {
        "max_steps": STEPS,
        "val_every": STEPS,
        "val_batches": 1,
        "warmup_steps": 2,
        "prefetch": 1,
        "cpu_bf16": False,
    },
}
AVX2_MACHINE = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
    "OPENBLAS_CORETYPE": "Sandybridge",  # OpenBLAS's own choice on a CPU with AVX but not AVX2
}
MACHINES = {"A: 2 cores, AVX-512": ("0,1", {}), "B: 1 core, AVX2 only": ("0", AVX2_MACHINE)}


@pytest.fixture(scope="module")
def samples(project: Path, region: str) -> Iterator[Path]:
    from .fixtures.project import write_samples

    with patched_params(project, {**TRAIN, "pipeline": {"regions": [region]}}):
        write_samples(region)
        yield project


def _machine_env(machine: str) -> dict[str, str]:
    """The environment of a fresh process on `machine`: its instruction caps, nothing pinned by this test process."""
    env = {k: v for k, v in os.environ.items() if k not in {*THREAD_ENV, *ISA_ENV["avx2"], *AVX2_MACHINE, PIN_MARKER}}
    return {**env, **MACHINES[machine][1]}


def _train_on(machine: str, out: Path) -> str:
    """`loc2vec train` as on `machine`: its cores (CPU affinity) and instruction caps; returns model.pt's sha256."""
    cpus, env = MACHINES[machine][0], _machine_env(machine)
    cmd = ["taskset", "-c", cpus, sys.executable, "-m", "loc2vec.cli", "train", "--no-mlflow", "--no-resume"]
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return hashlib.sha256((out / "model.pt").read_bytes()).hexdigest()


def test_pinned_cpu_training_is_byte_identical_across_machines(samples: Path, tmp_path: Path) -> None:
    digests = {m: _train_on(m, tmp_path / m[0]) for m in MACHINES}
    assert len(set(digests.values())) == 1, digests
    a, b = (torch.load(tmp_path / m[0] / "model.pt", weights_only=True) for m in MACHINES)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # The DVC outputs beside it too: the summary (a metric) and the curve hold no wall-clock time or run id.
    for name in ("summary.json", "train_curve.csv", "model_config.json"):
        assert (tmp_path / "A" / name).read_bytes() == (tmp_path / "B" / name).read_bytes(), name
    assert "wall_s" in json.loads((tmp_path / "A" / "run.json").read_text()), "provenance goes beside, untracked"


def test_unpinned_training_differs_between_machines(samples: Path, project: Path, tmp_path: Path) -> None:
    """Why the pin exists: the machine's own thread count and kernels change the weights."""
    with patched_params(project, {"compute": {"cpu_isa": "native", "cpu_threads": 0}}):
        digests = {m: _train_on(m, tmp_path / m[0]) for m in MACHINES}
    assert len(set(digests.values())) == 2, digests


def test_cpu_bf16_training_is_deterministic_run_to_run(samples: Path, project: Path, tmp_path: Path) -> None:
    """bf16 autocast on the CPU (train.cpu_bf16, with the CPU's own kernels): the same machine, the same bytes.

    Trained with the infonce loss, so the many-negatives loss also runs through `loc2vec train` here.
    """
    bf16 = {"train": {"cpu_bf16": True}, "compute": {"cpu_isa": "native"}, "loss": {"name": "infonce"}}
    machine = "A: 2 cores, AVX-512"
    with patched_params(project, bf16):
        first, second = (_train_on(machine, tmp_path / name) for name in ("one", "two"))
    assert first == second
    with patched_params(project, {**bf16, "train": {"cpu_bf16": False}}):
        fp32 = _train_on(machine, tmp_path / "fp32")
    assert fp32 != first  # bf16 really ran: it trains other weights


def test_auto_bf16_trains_bf16_where_the_cpu_has_its_kernels_and_the_pinned_float32_elsewhere(
    samples: Path, project: Path, tmp_path: Path
) -> None:
    """train.cpu_bf16: auto (params.yaml's default) on both machines: machine B (AVX2 caps of its own) trains the
    pinned float32 model; machine A trains the bf16 model with its own kernels if its CPU has them (AVX-512 BF16 or
    AMX), else the same float32 model. The summary says which."""
    auto = {"train": {"cpu_bf16": "auto"}}
    with patched_params(project, auto):
        got = {m: _train_on(m, tmp_path / f"auto-{m[0]}") for m in MACHINES}
    fp32 = _train_on("B: 1 core, AVX2 only", tmp_path / "fp32")
    assert got["B: 1 core, AVX2 only"] == fp32
    summary = json.loads((tmp_path / "auto-A" / "summary.json").read_text())
    if bf16_kernels_available({}):
        with patched_params(project, {"train": {"cpu_bf16": True}, "compute": {"cpu_isa": "native"}}):
            bf16 = _train_on("A: 2 cores, AVX-512", tmp_path / "bf16")
        assert got["A: 2 cores, AVX-512"] == bf16 != fp32
        assert summary["cpu_bf16"] is True
    else:
        assert got["A: 2 cores, AVX-512"] == fp32
        assert summary["cpu_bf16"] is False
    assert json.loads((tmp_path / "auto-B" / "summary.json").read_text())["cpu_bf16"] is False


# A logistic regression as the suite fits them (evaluation/added_value.py) on wide random features: its weights
# depend on OpenBLAS's kernels (numpy's and scipy's BLAS), which OpenBLAS picks by CPU.
_FIT = """
import hashlib, sys
from loc2vec.core.config import ComputeConfig
from loc2vec.core.numerics import pin_cpu_numerics
pin_cpu_numerics(ComputeConfig(cpu_isa=sys.argv[1]))  # at the edge, before numpy is imported (as the CLI does)
import numpy as np
from loc2vec.core.config import EvaluateConfig
from loc2vec.evaluation.added_value import suite_classifier
rng = np.random.default_rng(0)
x = rng.normal(size=(400, 512))
y = np.where(x[:, :8].sum(axis=1) + rng.normal(size=400) > 0, "a", "b")
model = suite_classifier("logreg", EvaluateConfig()).fit(x, y)
print(hashlib.sha256(model[-1].coef_.tobytes()).hexdigest())
"""


def _fit_on(machine: str, isa: str) -> str:
    cmd = ["taskset", "-c", MACHINES[machine][0], sys.executable, "-c", _FIT, isa]
    proc = subprocess.run(cmd, cwd=REPO, env=_machine_env(machine), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_pinned_logistic_regression_is_byte_identical_across_machines() -> None:
    """OpenBLAS capped at Haswell's kernels: the same weights on both machines; uncapped, each machine's own."""
    pinned = {m: _fit_on(m, "avx2") for m in MACHINES}
    assert len(set(pinned.values())) == 1, pinned
    native = {m: _fit_on(m, "native") for m in MACHINES}
    assert len(set(native.values())) == 2, native
