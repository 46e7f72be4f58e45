"""Training-step speed: forward + backward + Adam of the encoder and loss, each CPU setting side by side.

One step is the default batch (params `triplets:`): 20 locations × 5 pairs = 100 triplets, i.e. 300 tiles of
12×128×128, encoded in one forward pass of all 300 tiles (so BatchNorm sees anchors, positives and negatives).
Tiles are random uint8: conv cost does not depend on tile content, and this keeps the
benchmark free of PostGIS and Mapnik.

CPU settings (issue 17: a bigger budget in the same wall time) are measured one after another in the same run,
each in a fresh child process: the kernels' instruction-set cap and the thread count are environment variables
that the libraries read once (core/numerics.py), and a fresh process also gives each its own peak-RSS growth.
`ratio` is each setting's triplets/s over the trainer's default (params `train:`/`compute:`, `is_default`),
`ratio_min_step` the same for each setting's fastest step: on a shared machine absolute times are upper bounds,
and ratios within one run, of the least disturbed steps, are what to compare. Each setting
also reports whether two fresh processes, same seed and same tiles, end with byte-identical weights after its
steps (`deterministic`). With CUDA the same step runs again with bf16 autocast and channels_last (`gpu_` keys).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from loc2vec.cli.project import Project
from loc2vec.core.config import LossConfig, ModelConfig
from loc2vec.core.numerics import ISA_ENV, PIN_MARKER, THREAD_ENV, resolve_cpu_bf16
from loc2vec.training.losses import NEGATIVE_FREE, build_loss
from loc2vec.training.model import Encoder, count_parameters, to_input

WARMUP_STEPS = 2
REPO = Path(__file__).resolve().parents[1]


def _max_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _measure(
    device: torch.device,
    steps: int,
    batch: int,
    cfg: ModelConfig,
    loss_cfg: LossConfig,
    *,
    channels_last: bool,
    bf16: bool,
    pairs: int = 1,
    encode_negatives: bool = True,
) -> dict:
    """Seconds and peak memory for `steps` timed training steps after WARMUP_STEPS; the weights' digest after.

    Without `encode_negatives` (what the trainer does for a loss in losses.NEGATIVE_FREE) a step encodes the
    anchors and positives only, and n is the positives rolled by one location (the trainer's stand-in).
    """
    cuda = device.type == "cuda"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.manual_seed(0)
        model = Encoder(cfg).to(device, memory_format=fmt).train()
        n_tiles = (3 if encode_negatives else 2) * batch
        channels = cfg.in_channels * (2 if cfg.centre_px else 1)  # a centre branch trains on two views per tile
        tiles = torch.randint(0, 256, (n_tiles, channels, cfg.input_size, cfg.input_size), dtype=torch.uint8)
        tiles = tiles.to(device).contiguous(memory_format=fmt)
    torch.manual_seed(1)  # dropout masks
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = build_loss(loss_cfg)
    groups = (torch.arange(batch) // pairs).to(device)
    stand_in = (torch.arange(batch) + pairs) % batch

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            emb = model(to_input(tiles))
        if encode_negatives:
            a, p, n = emb.float().split(batch)
        else:
            a, p = emb.float().split(batch)
            n = p.detach()[stand_in]
        loss = loss_fn(a, p, n, groups=groups)
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
    early, times = None, []
    for i in range(steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        if i == 0:
            early = _digest(model)  # after WARMUP_STEPS + 1: what a 1-step repeat is compared with
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else _max_rss_mb() - rss_before
    return {
        "triplets_per_s": round(steps * batch / seconds, 1),
        "s_per_step": round(seconds / steps, 3),
        "s_per_step_min": round(min(times), 3),  # the least disturbed step: on a shared machine, the one to compare
        "peak_memory_mb": round(peak, 1),
        "weights_sha256_first_step": early,
    }


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def cpu_settings(project: Project) -> list[dict[str, Any]]:
    """The CPU settings measured side by side; the first is the trainer's default (params as `loc2vec train` resolves
    them on this machine: train.cpu_bf16: auto is bf16 with the native ISA where the CPU has bf16 kernels)."""
    params = resolve_cpu_bf16(project.params, lift_own_pin=True)
    train, compute, model = params.train, params.compute, params.model
    default = {
        "channels_last": train.channels_last,
        "bf16": train.cpu_bf16,
        "isa": compute.cpu_isa,
        "threads": compute.cpu_threads,
        "conv_channels": list(model.conv_channels),
        "centre_px": model.centre_px,
        "centre_source": model.centre_source,
        "loss": project.params.loss.name,
        "encode_negatives": project.params.loss.name not in NEGATIVE_FREE,
    }
    first8 = [8, *model.conv_channels[1:]]
    fp32 = {"bf16": False, "isa": project.params.compute.cpu_isa}  # float32 with compute's pinned kernels
    variants = [
        ("default (params)", {}),
        ("fp32 contiguous", {**fp32, "channels_last": False}),
        ("fp32 channels_last", {**fp32, "channels_last": True}),
        ("fp32 channels_last, 1 thread", {**fp32, "channels_last": True, "threads": 1}),
        ("fp32 channels_last, first conv 8 wide", {**fp32, "channels_last": True, "conv_channels": first8}),
        ("centre branch (model.centre_px 32)", {"centre_px": 32, "centre_source": "branch"}),  # a repeat if default
        ("centre from the trunk (model.centre_source trunk)", {"centre_px": 32, "centre_source": "trunk"}),
        ("pooled centre (model.centre_source pooled)", {"centre_px": 32, "centre_source": "pooled"}),
        ("no centre branch (model.centre_px 0)", {"centre_px": 0}),
        ("fp32 channels_last, native ISA", {"channels_last": True, "bf16": False, "isa": "native"}),
        ("bf16 channels_last, native ISA", {"channels_last": True, "bf16": True, "isa": "native"}),
        ("SoftPN (negatives encoded)", {"loss": "softpn", "encode_negatives": True}),
        ("InfoNCE, negatives encoded", {"loss": "infonce", "encode_negatives": True}),
        ("InfoNCE, negatives not encoded", {"loss": "infonce", "encode_negatives": False}),
    ]
    out, seen = [], set()
    for name, change in variants:
        setting = {**default, **change}
        key = json.dumps(setting, sort_keys=True)
        if key in seen:  # e.g. "fp32 channels_last" when that is the default
            continue
        seen.add(key)
        out.append({"name": name, **setting, "is_default": not change or setting == default})
    return out


def _model_cfg(model: dict[str, Any], setting: dict[str, Any]) -> ModelConfig:
    """params' model with the setting's first-layer widths and centre."""
    keys = {"conv_channels": tuple(setting["conv_channels"]), "centre_px": setting["centre_px"]}
    return ModelConfig(**{**model, **keys, "centre_source": setting.get("centre_source", "branch")})


def _child_env(setting: dict[str, Any]) -> dict[str, str]:
    """The parent's environment with the setting's ISA cap and thread count, as core/numerics.py sets them."""
    env = {k: v for k, v in os.environ.items() if k not in {*THREAD_ENV, *ISA_ENV["avx2"], PIN_MARKER}}
    env.update(ISA_ENV[setting["isa"]])
    if setting["threads"]:
        env.update({name: str(setting["threads"]) for name in THREAD_ENV})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def _run_child(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", "from benchmarks.train import child; child()"],
        input=json.dumps(spec),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child() -> None:
    """Entry point of one setting's process: spec on stdin, its result as one JSON line on stdout."""
    spec = json.loads(sys.stdin.read())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    model = _model_cfg(spec["model"], spec)
    result = _measure(
        torch.device("cpu"),
        spec["steps"],
        spec["batch"],
        model,
        LossConfig(**spec["loss_cfg"]),
        channels_last=spec["channels_last"],
        bf16=spec["bf16"],
        pairs=spec["pairs"],
        encode_negatives=spec["encode_negatives"],
    )
    result["threads_used"] = torch.get_num_threads()
    print(json.dumps(result))


def run(project: Project, *, region: str | None = None, n: int | None = None) -> dict:
    """`n` timed steps (default 5) after 2 warm-up steps per setting; `region` is unused (tiles are synthetic).

    Set LOC2VEC_BENCH_TRAIN_SETTINGS to setting names separated by ";" (names contain commas) to measure only those.
    """
    steps = n or 5
    shape = project.params.triplets
    batch = shape.locations_per_batch * shape.pairs_per_location
    cfg = project.params.model
    loss_cfg = project.params.loss
    wanted = [s.strip() for s in os.environ.get("LOC2VEC_BENCH_TRAIN_SETTINGS", "").split(";") if s.strip()]
    settings = [s for s in cpu_settings(project) if not wanted or s["name"] in wanted or s["is_default"]]
    rows = []
    for setting in settings:
        spec = {
            **setting,
            "steps": steps,
            "batch": batch,
            "pairs": shape.pairs_per_location,
            "model": cfg.model_dump(mode="json"),
            "loss_cfg": {**loss_cfg.model_dump(mode="json"), "name": setting["loss"]},
        }
        env = _child_env(setting)
        first = _run_child(spec, env)
        row = {**setting, "tiles_per_step": (3 if setting["encode_negatives"] else 2) * batch, **first}
        if "error" not in first:
            # Determinism: the same seed and tiles in a second fresh process, compared after the same 3 steps.
            again = _run_child({**spec, "steps": 1}, env)
            row["deterministic"] = again.get("weights_sha256_first_step") == first["weights_sha256_first_step"]
            row["parameters"] = count_parameters(Encoder(_model_cfg(cfg.model_dump(), setting)))
        rows.append(row)
    base = next((r for r in rows if r["is_default"] and "error" not in r), None)
    for r in rows:
        if base is not None and "error" not in r:
            r["ratio"] = round(r["triplets_per_s"] / base["triplets_per_s"], 2)
            r["ratio_min_step"] = round(base["s_per_step_min"] / r["s_per_step_min"], 2)
    result: dict = {
        "device": "cpu",
        "batch_triplets": batch,
        "tiles_per_step": 3 * batch if loss_cfg.name not in NEGATIVE_FREE else 2 * batch,
        "steps": steps,
        "warmup_steps": WARMUP_STEPS,
        "loss": loss_cfg.name,
        "parameters": count_parameters(Encoder(cfg)),
        "torch_version": torch.__version__,
        "input": "random uint8 tiles",
        "cpu_settings": rows,
    }
    if base is not None:
        result.update({k: base[k] for k in ("triplets_per_s", "s_per_step", "peak_memory_mb")})
        result["ms_per_step"] = round(1000 * base["s_per_step"], 1)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        result["gpu_device"] = torch.cuda.get_device_name(gpu)
        result["gpu_precision"] = "bf16 autocast, channels_last"
        gpu_result = _measure(
            gpu, steps, batch, cfg, loss_cfg, channels_last=True, bf16=True, pairs=shape.pairs_per_location
        )
        gpu_result["ms_per_step"] = round(1000 * gpu_result["s_per_step"], 1)
        result.update({f"gpu_{k}": v for k, v in gpu_result.items()})
    return result
