"""The `refresh_osm` flow: fetch a new extract, verify it, version it with DVC, and run the pipeline if
the data changed.

    loc2vec flow refresh --region liechtenstein [--source URL|PATH] [--sha256 HEX] [--no-pipeline]

(the weekly-refresh deployment runs the same flow). Like the pipeline flow, it loads params.yaml when it
starts (and again after editing it) and takes every location from the project's paths.

How the extract is versioned, and why not `dvc add`: data/osm/<region>.osm.pbf is an output of the
`ingest@<region>` stage (its command, `loc2vec fetch`, copies the registered source there, verified),
and a path can be tracked by a stage or by a .dvc file, not both. So the registry is the version's
definition and the stage does the versioning:

1. Fetch the source (URL or path) and verify its sha256 — before anything is touched, so a failed
   download or a wrong checksum leaves params.yaml, dvc.lock and the database as they were. Downloads
   go to the regions.download_dir cache (data/scratch/osm when that is where the ingest stage puts its
   output).
2. Write source and sha256 to params.yaml regions.registry.<region> (in place, comments kept), and
   add the region to pipeline.regions if it is not there (only pipeline regions have stages).
3. `dvc repro --single-item ingest@<region>`: the registry entry is a param of the stage, so a new
   checksum re-runs it: the extract is copied into data/osm, imported (staging schema, atomic swap),
   cached by DVC and recorded in dvc.lock (DVC commit). Retried like any stage on transient failures.
4. `dvc push ingest@<region>`: the extract goes to the DVC remote.
5. Changed = the extract's md5 in dvc.lock differs from before (or the stage had not run yet). Only
   then the `pipeline` flow runs (a subflow, under the same lock): every stage downstream of the
   import is stale; the others are skipped by DVC.

Committing params.yaml and dvc.lock to git is left to the caller (`git_commit=True` does it for those
two files only).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.dvc_stages import stage_env
from flows.lock import exclusive
from flows.params_edit import set_pipeline_regions, set_region_source
from flows.pipeline import pipeline, prefect_api_url, push_task, stage_task
from loc2vec.cli.project import Project
from loc2vec.core.config import RegionSpec, params_path
from loc2vec.core.errors import ConfigError
from loc2vec.core.names import check_region_name
from loc2vec.core.paths import ProjectPaths
from loc2vec.orchestration.transient import retry_options
from loc2vec.osm.extracts import fetch_extract, sha256_file

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def extract_out(paths: ProjectPaths, region: str) -> str:
    """The extract's path as the ingest stage outputs it (relative to the repository, as dvc.lock names it)."""
    return paths.extract(region).relative_to(paths.root).as_posix()


def locked_md5(lock: Path, out: str) -> str | None:
    """The md5 a dvc.lock records for an output (None: never produced by a stage)."""
    if not lock.is_file():
        return None
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for entry in stage.get("outs", []) or []:
            if entry.get("path") == out:
                return entry.get("md5")
    return None


def _source_as_registered(source: str, root: Path) -> str:
    """A URL as is; a path absolute, or relative to the repository when it lies inside it."""
    if source.startswith(("http://", "https://")):
        return source
    path = Path(source).expanduser()
    path = path if path.is_absolute() else (Path.cwd() / path)
    path = path.resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def download_dir(paths: ProjectPaths, region: str) -> Path:
    """Where a downloaded extract goes: regions.download_dir, unless that is the ingest stage's output
    directory (DVC owns what is there): data/scratch/osm then."""
    target = paths.download_dir.resolve()
    return paths.scratch / "osm" if target == paths.extract(region).parent.resolve() else target


@task(name="fetch-extract", cache_policy=NO_CACHE, persist_result=False)
def fetch_task(region: str, source: str, sha256: str, root: str, downloads: str) -> str:
    """Download (or find) the extract and verify its sha256; returns the verified local path."""
    spec = RegionSpec(name=region, source=source, sha256=sha256)
    path = fetch_extract(spec, Path(root), Path(downloads))
    if sha256_file(path) != sha256:  # fetch_extract verified it; a file changed under us is no version
        raise ConfigError(f"{path} changed while it was verified")
    return str(path)


@flow(name="loc2vec-refresh-osm", log_prints=True, persist_result=False)
def refresh_osm(
    region: str | None = None,
    source: str | None = None,
    sha256: str | None = None,
    run_pipeline: bool = True,
    push: bool = True,
    git_commit: bool = False,
) -> dict[str, Any]:
    """Refresh a region's extract (default: the default region from its registered source); see the module doc.

    sha256 is required for a new source; without one the registered checksum re-verifies the registered source.
    """
    logger = get_run_logger()
    params_file = params_path()
    project = Project.load(params_file)
    params, paths = project.params, project.paths
    root, cfg = paths.root, params.orchestrate
    region = check_region_name(region or params.regions.default, params.reserved_schemas)
    registered = params.regions.registry.get(region)
    source = source or (registered.source if registered else None)
    if not source:
        raise ConfigError(f"region {region!r} is not registered: give its source (URL or path) and sha256")
    source = _source_as_registered(source, root)
    same_source = registered is not None and _source_as_registered(registered.source, root) == source
    expected = (sha256 or (registered.sha256 if same_source and registered else None) or "").lower()
    if not SHA256_RE.fullmatch(expected):
        raise ConfigError(f"refresh_osm {region}: a sha256 (64 hex digits) of the extract is required, got {sha256!r}")

    with exclusive(paths.lock("pipeline"), timeout_s=cfg.lock_timeout_s):
        options = retry_options(cfg)
        local = fetch_task.with_options(**options)(
            region, source, expected, str(root), str(download_dir(paths, region))
        )
        logger.info("%s: %s verified (sha256 %s…)", region, local, expected[:12])

        out = extract_out(paths, region)
        before = locked_md5(paths.dvc_lock, out)
        registry_changed = set_region_source(params_file, region, source, expected)
        pipeline_regions = list(Project.load(params_file).params.pipeline.regions)
        if region not in pipeline_regions:
            set_pipeline_regions(params_file, [*pipeline_regions, region])
            logger.info("%s added to pipeline.regions", region)

        api = prefect_api_url()
        stage = f"ingest@{region}"
        ingest = stage_task.with_options(**options)(stage=stage, root=str(root), api_url=api)
        after = locked_md5(paths.dvc_lock, out)
        if push:
            push_task.with_options(**options)(str(root), [stage], api)
        changed = after != before
        result: dict[str, Any] = {
            "region": region,
            "source": source,
            "sha256": expected,
            "md5_before": before,
            "md5_after": after,
            "registry_changed": registry_changed,
            "ingest": ingest,
            "changed": changed,
            "pushed": push,
        }
        if git_commit and (registry_changed or changed):
            message = f"refresh_osm: {region} extract sha256 {expected[:12]}"
            run_git(root, ["commit", "-m", message, "--", str(params_file), str(paths.dvc_lock)])
            result["git_commit"] = message
        if changed and run_pipeline:
            logger.info("%s: the extract changed (md5 %s → %s): running the pipeline", region, before, after)
            result["pipeline"] = pipeline()
        elif not changed:
            logger.info("%s: the extract is unchanged (md5 %s): nothing to run", region, after)
    return result


def run_git(root: Path, args: list[str]) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, env=stage_env())
    if proc.returncode != 0:
        raise ConfigError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout
