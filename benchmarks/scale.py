"""The growth curve: ingest → sample → metatiles → embed → publish on regions of increasing area.

Each region (a *size*) runs the five stages as the pipeline runs them, one fresh `loc2vec` process per
stage (what DVC runs), in a throwaway project (its own params.yaml copy, data/, MLflow store and Feast
store) on the database the command line loaded, under the region name ``bench_<size>`` (never a region
of the project). Per stage: wall time; CPU time (user, sys) of the process and every process it waited
for (``os.wait4``); peak RSS: the sum over the stage's process tree, sampled every 0.2 s with psutil
(Mapnik and embedding workers run side by side; wait4's ru_maxrss is not used: a child forked from this
process carries the parent's high-water mark through exec); items/s (MB of extract, samples, metatiles, cells); disk bytes of the stage's
output (the region's PostgreSQL tables with indexes and TOAST, pg_total_relation_size; the samples
Parquet; the metatile directory; the embeddings Parquet; for publish, the workspace's one feature store
(data/feast: offline partitions, registry, SQLite online store; each size adds its region, as ``publish@R``
does) after the publish, charged to the region in proportion to its cells).

Sizes (``--sizes`` picks by name, ``--max-km2`` caps the default list): bounding-box cuts of the shared
Liechtenstein extract (osmium extract, complete ways), the Liechtenstein and Andorra extracts, and
``<extract>_x<K>``: K copies of a real extract side by side (node, way and relation ids shifted by
K·10¹⁰, longitudes by whole multiples of the extract's width; built with osmium via OPL), labelled
``synthetic``: used only for the growth curve. The area on the x axis is the land the region's
embedded cells cover (cells × the mean H3 cell area at embed.h3_resolution), beside the nominal area.

Fits per stage, over the sizes: the log-log slope of wall time (and disk) against area (1 = linear),
and a linear fit ``seconds = fixed_s + s_per_km2 · km²`` whose marginal constant extrapolates to a
country (``capacity``). The encoder: ``$LOC2VEC_BENCH_MODEL_DIR`` (model.pt + model_config.json), else
the project's registered ``champion``, else a seeded untrained encoder of params ``model:``; registered
as the throwaway project's champion (not timed). The result (JSON and a log-log PNG) goes to ``--out``
and to MLflow (experiment ``loc2vec-bench``, the project's store or $MLFLOW_TRACKING_URI). Regions'
schemas and import records are dropped at the end unless ``--keep``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from loc2vec.cli.project import Project
from loc2vec.core.atomic import write_text
from loc2vec.core.errors import Loc2VecError
from loc2vec.core.names import check_region_name

STAGES = ("ingest", "sample", "metatiles", "embed", "publish")
PREFIX = "bench_"
ID_SHIFT = 10_000_000_000  # above every OSM id of 2021 extracts (~9.3e9 nodes): copies never collide
DEFAULT_MAX_KM2 = 1000.0
MODEL_DIR_ENV = "LOC2VEC_BENCH_MODEL_DIR"
EXPERIMENT = "loc2vec-bench"
GERMANY_KM2 = 357_000.0
# The planet's land is ~149M km²; Antarctica (~14.2M km², ice) is left out: 134.8M km², an upper bound of
# "mapped land" (cells with no mapped feature near them are not embedded; deserts and tundra have fewer).
PLANET_LAND_KM2 = 134_800_000.0
SOURCE_ROOT = Path(__file__).resolve().parents[1]


class ScaleError(Loc2VecError, RuntimeError):
    """A size that cannot be built, or a stage that failed (one line: which stage, which region, why)."""


@dataclass(frozen=True)
class Size:
    """One region of the growth curve: a cut of, or copies of, a real extract of params.yaml's registry."""

    name: str
    extract: str  # regions.registry name
    nominal_km2: float
    bbox: tuple[float, float, float, float] | None = None  # west, south, east, north
    copies: int = 1

    @property
    def synthetic(self) -> bool:
        return self.copies > 1

    @property
    def region(self) -> str:
        return PREFIX + self.name


def bbox_km2(bbox: tuple[float, float, float, float]) -> float:
    """Area of a lon/lat box (spherical, km²)."""
    west, south, east, north = bbox
    r = 6371.0088
    return r * r * math.radians(east - west) * abs(math.sin(math.radians(north)) - math.sin(math.radians(south)))


# Around Vaduz (cuts of the Liechtenstein extract), the extracts themselves, and copies of Andorra.
_LI10 = (9.505, 47.125, 9.545, 47.155)
_LI40 = (9.480, 47.110, 9.560, 47.170)
REAL_KM2 = {"liechtenstein": 160.0, "andorra": 468.0, "monaco": 2.0}
CATALOGUE: dict[str, Size] = {
    "li10": Size("li10", "liechtenstein", round(bbox_km2(_LI10), 1), _LI10),
    "li40": Size("li40", "liechtenstein", round(bbox_km2(_LI40), 1), _LI40),
    "liechtenstein": Size("liechtenstein", "liechtenstein", 160.0),
    "andorra": Size("andorra", "andorra", 468.0),
    "andorra_x2": Size("andorra_x2", "andorra", 2 * 468.0, copies=2),
    "andorra_x4": Size("andorra_x4", "andorra", 4 * 468.0, copies=4),
}


def parse_sizes(text: str | None, max_km2: float | None) -> list[Size]:
    """--sizes NAME,… (catalogue names, ``<extract>_x<K>`` copies, or ``<extract>@W,S,E,N``-free names only)."""
    if text:
        out = []
        for name in (s.strip() for s in text.split(",") if s.strip()):
            if name in CATALOGUE:
                out.append(CATALOGUE[name])
                continue
            m = re.fullmatch(r"([a-z]+)_x([1-9][0-9]?)", name)
            if not m or m.group(1) not in REAL_KM2:
                known = ", ".join([*CATALOGUE, "<liechtenstein|andorra|monaco>_x<K>"])
                raise ScaleError(f"bench scale: unknown size {name!r} (known: {known})")
            k = int(m.group(2))
            out.append(Size(name, m.group(1), k * REAL_KM2[m.group(1)], copies=k))
    else:
        out = list(CATALOGUE.values())
    cap = DEFAULT_MAX_KM2 if max_km2 is None and not text else max_km2
    if cap is not None:
        out = [s for s in out if s.nominal_km2 <= cap]
    if not out:
        raise ScaleError(f"bench scale: no size at or under --max-km2 {cap}")
    return sorted(out, key=lambda s: s.nominal_km2)


# ---------------------------------------------------------------- building the extracts (not timed)
def _osmium(*args: str) -> None:
    proc = subprocess.run(["osmium", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise ScaleError(f"bench scale: osmium {args[0]} failed: {last}")


def _shift_ref(ref: str, k: int) -> str:
    """'n12' or 'w34@role' (OPL way nodes, relation members) with its id + k·ID_SHIFT; the role unchanged."""
    head, at, role = ref.partition("@")
    return head[0] + str(int(head[1:]) + k * ID_SHIFT) + at + role


def _shift_opl(line: str, k: int, dlon: float) -> str:
    """One OPL line with ids (the object's, way nodes', relation members') + k·ID_SHIFT and x + k·dlon."""
    fields = line.rstrip("\n").split(" ")
    out = []
    for i, f in enumerate(fields):
        if i == 0:
            out.append(f[0] + str(int(f[1:]) + k * ID_SHIFT))
        elif f.startswith("x") and fields[0][0] == "n" and len(f) > 1:
            out.append(f"x{float(f[1:]) + k * dlon:.7f}")
        elif f.startswith(("N", "M")) and len(f) > 1:
            out.append(f[0] + ",".join(_shift_ref(r, k) for r in f[1:].split(",")))
        else:
            out.append(f)
    return " ".join(out) + "\n"


def build_copies(src: Path, copies: int, out: Path, work: Path) -> Path:
    """`copies` copies of an extract side by side (east), ids shifted per copy: a synthetic test extract."""
    from loc2vec.osm.extracts import inspect_extract

    west, south, east, north = inspect_extract(src).bbox
    dlon = (east - west) + 0.02
    opl = work / "src.opl"
    _osmium("cat", "-f", "opl", "-o", str(opl), "--overwrite", str(src))
    parts = []
    for k in range(copies):
        part = work / f"copy{k}.opl"
        with opl.open() as fin, part.open("w") as fout:
            for line in fin:
                fout.write(_shift_opl(line, k, dlon) if line.strip() else line)
        parts.append(str(part))
    merged = work / "merged.osm.pbf"
    _osmium("merge", "-o", str(merged), "--overwrite", *parts)
    bounds = f"{west},{south},{east + (copies - 1) * dlon},{north}"
    _osmium("extract", "-b", bounds, "--set-bounds", "-s", "complete_ways", "-o", str(out), "--overwrite", str(merged))
    for p in [opl, merged, *map(Path, parts)]:
        p.unlink(missing_ok=True)
    return out


def build_extract(size: Size, project: Project, work: Path) -> Path:
    """The size's extract: the real one, a bbox cut of it, or copies of it."""
    registry = project.params.regions.registry
    if size.extract not in registry:
        raise ScaleError(f"bench scale: size {size.name!r} needs region {size.extract!r} in params regions.registry")
    src = registry[size.extract].local_path(project.paths.root)
    if not src.is_file():
        raise ScaleError(f"bench scale: extract of {size.extract!r} not found: {src}")
    out = work / f"{size.region}.osm.pbf"
    if size.bbox is not None:
        box = ",".join(str(v) for v in size.bbox)
        _osmium("extract", "-b", box, "--set-bounds", "-s", "complete_ways", "-o", str(out), "--overwrite", str(src))
    elif size.copies > 1:
        build_copies(src, size.copies, out, work)
    else:
        shutil.copyfile(src, out)
    return out


# ---------------------------------------------------------------- running and measuring a stage
def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):  # exited between listing and reading
            total += p.memory_info().rss
    return total


def run_stage(argv: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run one CLI stage; its wall, CPU (process + waited-for children), peak RSS and stdout."""
    started = time.perf_counter()
    with log.open("w") as err, (log.with_suffix(".out")).open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err, cwd=env["LOC2VEC_BENCH_ROOT"])
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                peak[0] = max(peak[0], _tree_rss(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    wall = time.perf_counter() - started
    return {
        "rc": proc.returncode,
        "wall_s": round(wall, 2),
        "user_s": round(usage.ru_utime, 2),
        "sys_s": round(usage.ru_stime, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(peak[0] / 2**20, 1),
        "stdout": log.with_suffix(".out").read_text(),
    }


def _last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("error:", "Error", "loc2vec:")) or "Error" in ln[:60]]
    return (errors or lines or ["no output"])[-1][:300]


def dir_bytes(path: Path) -> int:
    """Bytes of the files under a path (0 when missing)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def schema_bytes(project: Project, schema: str) -> int:
    """pg_total_relation_size (tables, indexes, TOAST) summed over a schema's tables and materialized views."""
    from loc2vec.osm.db import cursor

    with cursor(project.info) as cur:
        cur.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind IN ('r', 'm', 'p')",
            (schema,),
        )
        return int(cur.fetchone()[0])


def drop_region(project: Project, region: str) -> None:
    """Drop a bench region's schema (only one loc2vec created) and its import record."""
    from psycopg2 import sql

    from loc2vec.osm.db import cursor, ensure_meta
    from loc2vec.osm.ownership import drop_owned_schema

    check_region_name(region, project.params.reserved_schemas)
    if not region.startswith(PREFIX):
        raise ScaleError(f"bench scale: refusing to drop {region!r}: not a bench region")
    with cursor(project.info) as cur:
        ensure_meta(cur, project.info.meta_schema)
        for name in (region, region + "__staging"):
            drop_owned_schema(cur, project.info.meta_schema, name, project.info.redacted())
        cur.execute(
            sql.SQL("DELETE FROM {}.imports WHERE region = %s").format(sql.Identifier(project.info.meta_schema)),
            (region,),
        )


# ---------------------------------------------------------------- the throwaway project
def make_workspace(project: Project, root: Path) -> None:
    """A project root with a copy of the params file the bench was given (local extract paths made absolute)."""
    raw = yaml.safe_load(project.paths.params_file.read_text())
    for spec in (raw.get("regions", {}).get("registry") or {}).values():
        src = str(spec.get("source", ""))
        if src and not src.startswith(("http://", "https://")):
            spec["source"] = str(Path(src) if Path(src).is_absolute() else (project.paths.root / src).resolve())
    root.mkdir(parents=True, exist_ok=True)
    (root / "loc2vec").mkdir(exist_ok=True)  # marks a project root
    write_text(root / "params.yaml", yaml.safe_dump(raw, sort_keys=False))


def child_env(project: Project, root: Path) -> dict[str, str]:
    """The stages' environment: the workspace's params and MLflow store, the project's database, no Prefect API."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    info = project.info
    env.update(
        LOC2VEC_PARAMS=str(root / "params.yaml"),
        LOC2VEC_PG_DSN=f"host={info.host} port={info.port} dbname={info.dbname} user={info.user}",
        LOC2VEC_ONLINE_STORE="sqlite",
        LOC2VEC_BENCH_ROOT=str(root),
        PYTHONPATH=os.pathsep.join([str(SOURCE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    return env


def register_encoder(project: Project, root: Path) -> dict[str, Any]:
    """Register the encoder to measure with as the workspace's champion; returns where it came from."""
    import numpy as np
    import torch

    from loc2vec.core.paths import ProjectPaths
    from loc2vec.core.tracking import setup_mlflow
    from loc2vec.training.model import Encoder
    from loc2vec.training.outputs import load_encoder
    from loc2vec.training.registry import CHAMPION, RegistryError, load_model, resolve_alias

    name = project.params.train.registered_model
    env_dir = os.environ.get(MODEL_DIR_ENV)
    if env_dir:
        model, source = load_encoder(Path(env_dir)), {"source": env_dir, "kind": "model directory"}
    else:
        try:
            ref = resolve_alias(project.paths, name)
            model = load_model(project.paths, ref, project.params.model)
            source = {"source": f"models:/{name}@champion", "version": ref.version, "kind": "registered champion"}
        except RegistryError:
            torch.manual_seed(0)
            model = Encoder(project.params.model).eval()
            source = {"source": "Encoder(params model), torch.manual_seed(0)", "kind": "seeded untrained"}
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)  # the workspace's own store, not the user's
    try:
        from mlflow import MlflowClient

        mlflow = setup_mlflow("bench-scale-encoder", ProjectPaths(root=root))
        with mlflow.start_run():
            mlflow.log_params({f"model.{k}": str(v) for k, v in model.cfg.model_dump(mode="json").items()})
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                input_example=np.zeros((2, 12, model.cfg.input_size, model.cfg.input_size), np.float32),
                registered_model_name=name,
                pip_requirements=["torch"],
            )
        MlflowClient().set_registered_model_alias(name, CHAMPION, str(info.registered_model_version))
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return source


def _json_line(stdout: str) -> dict[str, Any]:
    """The last JSON object a stage printed (embed: one line; publish: an indented document)."""
    text = stdout.strip()
    for start in [m.start() for m in re.finditer(r"^\{", text, re.M)][::-1]:
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            try:
                return json.loads(text[start:].splitlines()[0])
            except (json.JSONDecodeError, IndexError):
                continue
    return {}


def measure_size(
    size: Size,
    project: Project,
    root: Path,
    pbf: Path,
    env: dict[str, str],
    store: dict[str, int],
    before_embed: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """The five stages on one size, with each stage's numbers and the outputs' bytes.

    `store` counts the cells published so far into the workspace's one feature store (each size adds its region).
    """
    import h3
    import pyarrow.parquet as pq

    region = size.region
    cli = [sys.executable, "-m", "loc2vec.cli"]
    data = root / "data"
    samples = data / "samples" / f"{region}.parquet"
    metatiles = data / "scratch" / "metatiles" / region
    embeddings = data / "embeddings" / f"{region}.parquet"
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    commands = {
        "ingest": [*cli, "ingest", "--region", region, "--pbf", str(pbf), "--force"],
        "sample": [*cli, "sample", "--region", region],
        "metatiles": [*cli, "metatiles", "--region", region],
        "embed": [*cli, "embed", "--region", region],
        "publish": [*cli, "publish", "--embeddings", str(embeddings), "--online-store", "sqlite"],
    }
    stages: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        if stage == "embed":
            before_embed()  # the encoder registered once, when first needed (not timed)
        feast_before = dir_bytes(data / "feast")
        log = logs / f"{region}.{stage}.log"
        result = run_stage(commands[stage], env, log)
        if result["rc"] != 0:
            raise ScaleError(f"bench scale: {stage} of {region} failed (exit {result['rc']}): {_last_line(log)}")
        stdout = result.pop("stdout")
        result.pop("rc")
        if stage == "ingest":
            disk, items, unit = schema_bytes(project, region), pbf.stat().st_size / 1e6, "extract_mb"
        elif stage == "sample":
            disk, items, unit = dir_bytes(samples), pq.read_metadata(samples).num_rows, "samples"
        elif stage == "metatiles":
            found = re.search(r": (\d+) metatiles in ", stdout)
            disk, items, unit = dir_bytes(metatiles), int(found.group(1)) if found else 0, "metatiles"
        elif stage == "embed":
            stats = _json_line(stdout)
            disk = dir_bytes(embeddings) + dir_bytes(embeddings.with_suffix(".json"))
            items, unit = pq.read_metadata(embeddings).num_rows, "cells"
            result["parts_s"] = {
                k: stats[k]
                for k in ("load_model_s", "select_cells_s", "tag_counts_s", "metatiles_s", "encode_s")
                if k in stats
            }
        else:
            report = _json_line(stdout)
            items, unit = int((report.get("materialized") or {}).get("cells") or stages["embed"]["items"]), "cells"
            # One store grows region by region, and SQLite reuses the pages an index rebuild frees: the delta
            # is noisy, so the region is charged the store's size after it in proportion to its cells.
            after = dir_bytes(data / "feast")
            store["cells"] += items
            disk = after * items / store["cells"]
            result.update(
                store_bytes_after=after, store_cells_after=store["cells"], disk_bytes_delta=after - feast_before
            )
        result.update(disk_bytes=int(disk), items=round(float(items), 3), unit=unit)
        result["items_per_s"] = round(items / result["wall_s"], 2) if result["wall_s"] else None
        stages[stage] = result
    cells = int(stages["embed"]["items"])
    res = project.params.embed.h3_resolution
    area = cells * h3.average_hexagon_area(res, "km^2")
    for r in stages.values():
        r["km2_per_s"] = round(area / r["wall_s"], 3) if r["wall_s"] else None
    return {
        "size": size.name,
        "region": region,
        "synthetic": size.synthetic,
        "copies": size.copies,
        "source_extract": size.extract,
        "bbox": size.bbox,
        "nominal_km2": size.nominal_km2,
        "area_km2": round(area, 2),
        "cells": cells,
        "h3_resolution": res,
        "extract_bytes": pbf.stat().st_size,
        "stages": stages,
        "total": {
            k: round(sum(s[k] for s in stages.values()), 2)
            for k in ("wall_s", "cpu_s", "user_s", "sys_s", "disk_bytes")
        },
    }


# ---------------------------------------------------------------- fits, capacity, plot
def _slope(x: np.ndarray, y: np.ndarray) -> float | None:
    ok = (x > 0) & (y > 0)
    if ok.sum() < 2 or np.ptp(np.log(x[ok])) == 0:
        return None
    return round(float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0]), 3)


def _linear(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(fixed, per unit): least squares y = a + b·x with a, b ≥ 0; one point: b = y/x."""
    if len(x) < 2 or np.ptp(x) == 0:
        return 0.0, float(y.mean() / x.mean())
    b, a = np.polyfit(x, y, 1)
    if b <= 0:
        return float(y.mean()), 0.0
    if a < 0:
        return 0.0, float((x * y).sum() / (x * x).sum())
    return float(a), float(b)


def fit(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage and in total: log-log slopes and linear constants against the covered area."""
    area = np.asarray([s["area_km2"] for s in sizes], float)
    out: dict[str, Any] = {}
    for stage in [*STAGES, "total"]:
        rows = [s["stages"][stage] if stage != "total" else s["total"] for s in sizes]
        wall = np.asarray([r["wall_s"] for r in rows], float)
        cpu = np.asarray([r["cpu_s"] for r in rows], float)
        disk = np.asarray([r["disk_bytes"] for r in rows], float)
        fixed, per = _linear(area, wall)
        cfixed, cper = _linear(area, cpu)
        _, dper = _linear(area, disk)
        entry = {
            "slope_wall": _slope(area, wall),
            "slope_disk": _slope(area, disk),
            "fixed_s": round(fixed, 2),
            "s_per_km2": round(per, 4),
            "cpu_s_per_km2": round(cper, 4),
            "disk_bytes_per_km2": round(dper),
        }
        if stage != "total":
            rss = np.asarray([r["peak_rss_mb"] for r in rows], float)
            entry["slope_peak_rss"] = _slope(area, rss)
            entry["peak_rss_mb_largest"] = float(rss.max())
        out[stage] = entry
    return out


def capacity(fits: dict[str, Any], workers: tuple[int, ...] = (8, 64)) -> dict[str, Any]:
    """Hours for Germany and the planet's land from the marginal constants (fixed costs left out)."""
    out: dict[str, Any] = {}
    for name, km2 in (("germany", GERMANY_KM2), ("planet_land", PLANET_LAND_KM2)):
        hours = {st: fits[st]["s_per_km2"] * km2 / 3600 for st in STAGES}
        total = sum(hours.values())
        dominant = max(hours, key=hours.get)
        out[name] = {
            "km2": km2,
            "hours_this_machine": {**{k: round(v, 1) for k, v in hours.items()}, "total": round(total, 1)},
            "dominant_stage": dominant,
            "dominant_share": round(hours[dominant] / total, 3) if total else None,
            "disk_tb": round(sum(fits[st]["disk_bytes_per_km2"] for st in STAGES) * km2 / 1e12, 2),
            # metatiles and embed fan out per metatile (Dask); ingest, sample and publish as measured here
            **{
                f"hours_{n}_workers": round(
                    sum(v / (n if st in ("metatiles", "embed") else 1) for st, v in hours.items()), 1
                )
                for n in workers
            },
        }
    return out


def plot(sizes: list[dict[str, Any]], out: Path) -> Path:
    """Log-log: wall time and disk bytes per stage against area; synthetic sizes hollow and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    area = np.asarray([s["area_km2"] for s in sizes], float)
    synth = np.asarray([s["synthetic"] for s in sizes], bool)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, label in ((axes[0], "wall_s", "wall time (s)"), (axes[1], "disk_bytes", "disk (bytes)")):
        for i, stage in enumerate([*STAGES, "total"]):
            y = np.asarray([(s["stages"][stage] if stage != "total" else s["total"])[key] for s in sizes], float)
            color = f"C{i}" if stage != "total" else "k"
            ok = y > 0
            ax.plot(area[ok], y[ok], "-", color=color, label=stage, lw=2 if stage == "total" else 1.2)
            ax.plot(area[ok & ~synth], y[ok & ~synth], "o", color=color, ms=4)
            ax.plot(area[ok & synth], y[ok & synth], "o", mfc="none", color=color, ms=6)
        for s in sizes:
            if s["synthetic"]:
                ax.text(
                    s["area_km2"],
                    0.02,
                    f"{s['size']}\n(synthetic)",
                    transform=ax.get_xaxis_transform(),
                    fontsize=7,
                    ha="center",
                    va="bottom",
                    color="0.35",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("area: land of the embedded cells (km²)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", lw=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("loc2vec bench scale: growth with area (hollow = synthetic copies)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def log_mlflow(project: Project, result: dict[str, Any], files: list[Path]) -> str | None:
    """The run in the project's MLflow store (or $MLFLOW_TRACKING_URI): constants as metrics, JSON and PNG."""
    from loc2vec.core.tracking import flatten_params, setup_mlflow

    mlflow = setup_mlflow(EXPERIMENT, project.paths)
    with mlflow.start_run(run_name="scale") as run:
        mlflow.log_params({"sizes": ",".join(s["size"] for s in result["sizes"]), **result["encoder"]})
        metrics = flatten_params("fit", result["fit"], {})
        mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        for s in result["sizes"]:
            for stage, r in s["stages"].items():
                mlflow.log_metric(f"{stage}.wall_s", r["wall_s"], step=int(s["area_km2"]))
        for f in files:
            mlflow.log_artifact(str(f))
        return run.info.run_id


# ---------------------------------------------------------------- the benchmark
def run(
    project: Project,
    *,
    region: str | None = None,
    n: int | None = None,
    out: str | None = None,
    sizes: str | None = None,
    max_km2: float | None = None,
    keep: bool = False,
) -> dict[str, Any]:
    """Measure every size, fit, write scale.json and scale.png to `out` (default a temporary directory)."""
    from tqdm import tqdm

    if region or n:
        raise ScaleError("bench scale takes --sizes and --max-km2, not --region or --n")
    chosen = parse_sizes(sizes, max_km2)
    out_dir = Path(out) if out else Path(tempfile.mkdtemp(prefix="loc2vec-bench-scale-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    root = out_dir / "work"
    if root.exists():
        shutil.rmtree(root)
    make_workspace(project, root)
    env = child_env(project, root)
    results: list[dict[str, Any]] = []
    created: list[str] = []
    store = {"cells": 0}
    started = time.perf_counter()
    load_start = [round(v, 2) for v in os.getloadavg()]
    encoder: dict[str, Any] = {}

    def before_embed() -> None:
        if not encoder:
            encoder.update(register_encoder(project, root))

    try:
        bar = tqdm(chosen, desc="bench scale", unit="size", file=sys.stderr)
        for size in bar:
            bar.set_postfix_str(size.name)
            work = root / "extracts"
            work.mkdir(exist_ok=True)
            pbf = build_extract(size, project, work)
            created.append(size.region)
            results.append(measure_size(size, project, root, pbf, env, store, before_embed))
            pbf.unlink()
    finally:
        if not keep:
            for r in created:
                drop_region(project, r)
            shutil.rmtree(root, ignore_errors=True)
    fits = fit(results)
    result: dict[str, Any] = {
        "encoder": encoder,
        "online_store": "sqlite",
        "cpu_count": os.cpu_count(),
        "load_average_start_end": [load_start, [round(v, 2) for v in os.getloadavg()]],
        "sizes": results,
        "fit": fits,
        "capacity": capacity(fits),
        "bench_wall_s": round(time.perf_counter() - started, 1),
        "kept": keep,
    }
    png = plot(results, out_dir / "scale.png")
    result["png"] = str(png)
    path = out_dir / "scale.json"
    write_text(path, json.dumps(result, indent=1, default=str) + "\n")
    result["json"] = str(path)
    result["mlflow_run_id"] = log_mlflow(project, result, [path, png])
    return result
