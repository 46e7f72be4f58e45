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

The settings are environment variables that the libraries read when they first run a kernel, so they are
set here, at the edge, before torch or numpy is imported; every process a command starts (DVC stages,
Mapnik workers, DDP ranks) inherits them.
"""

from __future__ import annotations

import logging
import os
import sys

from loc2vec.core.config import ComputeConfig

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


def pin_cpu_numerics(cfg: ComputeConfig) -> dict[str, str]:
    """Set the environment that makes CPU results machine-independent (see the module docstring).

    Returns what was set. Under torchrun (LOCAL_RANK set) the launcher's thread count is kept: it
    divides the cores between the ranks.
    """
    env = dict(ISA_ENV[cfg.cpu_isa])
    if cfg.cpu_threads and "LOCAL_RANK" not in os.environ:
        env.update({name: str(cfg.cpu_threads) for name in THREAD_ENV})
    late = [m for m in ("torch", "numpy") if m in sys.modules]
    if late and env:  # e.g. main() called inside a test process: kernels may be chosen already
        log.debug("%s imported before the CPU numerics were pinned: the ISA cap may not apply", ", ".join(late))
    os.environ.update(env)
    if "torch" in sys.modules and cfg.cpu_threads and "LOCAL_RANK" not in os.environ:
        sys.modules["torch"].set_num_threads(cfg.cpu_threads)
    return env
