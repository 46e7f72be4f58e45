"""Same bytes on any machine of one CPU vendor: pin the CPU kernels and the thread count every command computes with.

Why two machines trained different models from the same samples (measured with 4 Adam steps of the
default Encoder on fixed random triplets, torch 2.13 CPU; `tests/test_numerics.py` repeats it through
`loc2vec train`):

* the thread count: 1 thread and 2 threads give different weights after 4 steps (oneDNN splits a
  convolution's reductions by thread, and float addition is not associative). torch's default is the
  machine's core count, so a 2-core and a 16-core machine never agree;
* the instruction set: oneDNN picks its convolution kernels at run time by CPU; capping it at AVX2
  (`ONEDNN_MAX_CPU_ISA=AVX2`) on this AVX-512 machine changes the weights too. A machine without
  AVX-512 (most desktops, older servers) therefore trained another model. (ATen's own kernels and MKL
  did not change the result here; they are capped as well, since another build or vendor may differ:
  MKL picks other code paths on Intel and AMD, numpy dispatches its math functions by CPU, and OpenBLAS,
  numpy's and scipy's BLAS, picks its kernels by CPU: the same logistic-regression fit ends on other
  weights with its Haswell, Sandybridge and generic kernels (measured; tests/test_numerics.py compares the
  first two), and the evaluation of the same code on an AVX-512 and an AVX2 machine differed only in the
  fits on `random_wide`'s 1,024 columns, where such differences add up to other predictions.)

So every command runs with `compute.cpu_threads` threads (default 2) and, with `compute.cpu_isa: avx2`
(the default), with every library's kernels capped at AVX2, which any x86-64 machine of the last ten years
has: the same kernels, the same reduction order, the same bytes. Cost, measured here: ~3-4% more CPU time
per training step than AVX-512 kernels. `cpu_isa: native` and `cpu_threads: 0` (all cores) are faster
and machine-specific. Not covered: GPUs (CUDA kernels differ by device and driver), and Dask workers,
which run one thread each (orchestrate.dask_threads_per_worker; embeddings then agree within float32
rounding, tests/test_fanout.py).

Nor Intel against AMD: MKL honours its pinned branch (MKL_CBWR=AVX2) on Intel CPUs only and runs its AUTO
branch elsewhere: from the same samples and metatiles an Intel Xeon trained a different model from the one two
AMD EPYCs trained (from the second step on; srai's Hex2Vec, an MLP, differed too). MKL_CBWR=COMPATIBLE is the branch
both vendors run; it changes every machine's results and is not checked on AMD yet (README, "Same bytes").

bf16 (`train.cpu_bf16: auto`, `resolve_cpu_bf16`): `loc2vec train` autocasts to bf16 with the CPU's own kernels
where the CPU has them (AVX-512 BF16 or AMX: 1.8x and 2.4x the pinned float32 step, measured) and nothing caps oneDNN
below them, and computes float32 with the pinned kernels elsewhere. Its bytes are then those of the CPU's bf16 kernels:
machines with the same kernels agree, a machine without them trains the float32 model (README, "Same bytes").
Every other command (embedding, evaluation) keeps the pinned float32 kernels, so a given model embeds the same
bytes on any machine of one vendor.

The settings are environment variables that the libraries read when they first run a kernel, so they are
set here, at the edge, before torch or numpy is imported; every process a command starts (DVC stages,
Mapnik workers, DDP ranks) inherits them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Literal

from loc2vec.core.config import ComputeConfig, Params

log = logging.getLogger(__name__)
# What each library reads: oneDNN (convolutions), ATen (PyTorch's vectorised kernels), MKL (torch's BLAS), numpy,
# and OpenBLAS (numpy's and scipy's BLAS: the suite's logistic regressions). OpenBLAS picks its kernels by CPU
# (SkylakeX on AVX-512, Haswell on AVX2, Sandybridge on AVX): on the same 800 × 1,024 random features the same
# L-BFGS fit ended on other weights with each kernel set tried; Haswell's are AVX2 + FMA.
ISA_ENV: dict[str, dict[str, str]] = {
    "avx2": {
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_CBWR": "AVX2",
        "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
        "OPENBLAS_CORETYPE": "Haswell",
    },
    "native": {},
}
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Set beside the caps by `pin_cpu_numerics`: the caps in this environment are loc2vec's own (params.yaml), so a command
# that computes with the CPU's own kernels (a bf16 training) may lift them; caps without it (a machine's owner, a
# test simulating an older CPU) are honoured.
PIN_MARKER = "LOC2VEC_PINNED_ISA"
# ONEDNN_MAX_CPU_ISA values that keep oneDNN's bf16 kernels (oneDNN's dnnl_cpu_isa names, case-insensitive)
BF16_CAPS = frozenset(
    {"ALL", "AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16"}
)
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo flags of CPUs with bf16 dot products


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (empty where there is no /proc/cpuinfo)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_kernels_available(
    env: Mapping[str, str] | None = None, flags: frozenset[str] | None = None, *, lift_own_pin: bool = False
) -> bool:
    """Whether oneDNN would run bf16 with this CPU's own kernels: the CPU reports AVX-512 BF16 or AMX BF16, and no
    ONEDNN_MAX_CPU_ISA cap keeps oneDNN below them. With `lift_own_pin`, a cap loc2vec's own pin set (PIN_MARKER)
    does not count: the command about to pin its numerics replaces it."""
    env = os.environ if env is None else env
    if not BF16_FLAGS & (cpu_flags() if flags is None else flags):
        return False
    cap = env.get("ONEDNN_MAX_CPU_ISA")
    if cap is None or cap.upper() in BF16_CAPS:
        return True
    own = env.get(PIN_MARKER)
    return lift_own_pin and own in ISA_ENV and ISA_ENV[own].get("ONEDNN_MAX_CPU_ISA") == cap


def resolve_cpu_bf16(
    params: Params,
    *,
    section: Literal["train", "embed"] = "train",
    lift_own_pin: bool = False,
    env: Mapping[str, str] | None = None,
    flags: frozenset[str] | None = None,
) -> Params:
    """params with `<section>.cpu_bf16: auto` resolved for this machine: true (with compute.cpu_isa: native, which
    bf16 needs) where `bf16_kernels_available`, else false (the pinned float32 kernels). Called at the edge by the
    commands that train (section train) or embed (section embed), before the numerics are pinned; true and false
    are returned unchanged."""
    cfg = getattr(params, section)
    if cfg.cpu_bf16 != "auto":
        return params
    bf16 = bf16_kernels_available(env, flags, lift_own_pin=lift_own_pin)
    update: dict[str, object] = {section: cfg.model_copy(update={"cpu_bf16": bf16})}
    if bf16:
        update["compute"] = params.compute.model_copy(update={"cpu_isa": "native"})
    return params.model_copy(update=update)


def cpu_bf16_enabled(setting: bool | Literal["auto"]) -> bool:
    """A `cpu_bf16` setting as a library call applies it: `auto` not resolved at an edge is bf16 only where the
    kernels allow it in this process now (`bf16_kernels_available`: under our AVX2 pin, float32)."""
    return bf16_kernels_available() if setting == "auto" else bool(setting)


def pin_cpu_numerics(cfg: ComputeConfig) -> dict[str, str]:
    """Set the environment that makes CPU results machine-independent (see the module docstring).

    Returns what was set. Under torchrun (LOCAL_RANK set) the launcher's thread count is kept: it
    divides the cores between the ranks.
    """
    env = dict(ISA_ENV[cfg.cpu_isa])
    if env:
        env[PIN_MARKER] = cfg.cpu_isa
    else:  # the CPU's own kernels: lift caps an earlier pin of ours left in the environment (a parent command's)
        own = ISA_ENV.get(os.environ.get(PIN_MARKER, ""), {})
        for name, value in own.items():
            if os.environ.get(name) == value:
                del os.environ[name]
        os.environ.pop(PIN_MARKER, None)
    if cfg.cpu_threads and "LOCAL_RANK" not in os.environ:
        env.update({name: str(cfg.cpu_threads) for name in THREAD_ENV})
    late = [m for m in ("torch", "numpy") if m in sys.modules]
    if late and env:  # e.g. main() called inside a test process: kernels may be chosen already
        log.debug("%s imported before the CPU numerics were pinned: the ISA cap may not apply", ", ".join(late))
    os.environ.update(env)
    if "torch" in sys.modules and cfg.cpu_threads and "LOCAL_RANK" not in os.environ:
        sys.modules["torch"].set_num_threads(cfg.cpu_threads)
    return env
