"""Training-step speed: triplets per second for forward + backward + Adam of the default encoder and loss.

One step is the default batch (params `triplets:`): 20 locations × 5 pairs = 100 triplets, i.e. 300 tiles of
12×128×128, encoded in one forward pass of all 300 tiles (so BatchNorm sees anchors, positives and negatives).
Tiles are random uint8: conv cost does not depend on tile content, and this keeps the
benchmark free of PostGIS and Mapnik. On CPU memory is the growth of peak RSS; with CUDA
the same step runs again with bf16 autocast and channels_last (`gpu_` keys).
"""

from __future__ import annotations

import resource
import sys
import time

import torch

from loc2vec.cli.project import Project
from loc2vec.core.config import LossConfig, ModelConfig
from loc2vec.training.losses import build_loss
from loc2vec.training.model import Encoder, count_parameters, to_input

WARMUP_STEPS = 2


def _max_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _measure(device: torch.device, steps: int, batch: int, cfg: ModelConfig, loss_cfg: LossConfig) -> dict:
    """Seconds and peak memory for `steps` timed training steps after WARMUP_STEPS."""
    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.manual_seed(0)
        model = Encoder(cfg).to(device, memory_format=fmt).train()
        tiles = torch.randint(0, 256, (3 * batch, cfg.in_channels, cfg.input_size, cfg.input_size), dtype=torch.uint8)
        tiles = tiles.to(device).contiguous(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = build_loss(loss_cfg)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            emb = model(to_input(tiles))
        a, p, n = emb.split(batch)
        loss = loss_fn(a, p, n)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rss_before = _max_rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    for _ in range(WARMUP_STEPS):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else _max_rss_mb() - rss_before
    return {
        "triplets_per_s": round(steps * batch / seconds, 1),
        "ms_per_step": round(1000 * seconds / steps, 1),
        "peak_memory_mb": round(peak, 1),
    }


def run(project: Project, *, region: str | None = None, n: int | None = None) -> dict:
    """`n` timed steps (default 5) after 2 warm-up steps; `region` is unused (tiles are synthetic)."""
    steps = n or 5
    shape = project.params.triplets
    batch = shape.locations_per_batch * shape.pairs_per_location
    cfg = project.params.model
    loss_cfg = project.params.loss
    result: dict = {
        "device": "cpu",
        "batch_triplets": batch,
        "tiles_per_step": 3 * batch,
        "steps": steps,
        "warmup_steps": WARMUP_STEPS,
        "loss": loss_cfg.name,
        "parameters": count_parameters(Encoder(cfg)),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "input": "random uint8 tiles",
        **_measure(torch.device("cpu"), steps, batch, cfg, loss_cfg),
    }
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        result["gpu_device"] = torch.cuda.get_device_name(gpu)
        result["gpu_precision"] = "bf16 autocast, channels_last"
        result.update({f"gpu_{k}": v for k, v in _measure(gpu, steps, batch, cfg, loss_cfg).items()})
    return result
