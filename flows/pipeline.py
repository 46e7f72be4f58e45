"""The `pipeline` flow: the DVC stages as Prefect tasks, with retries, a lock, and a summary artifact.

    python -m flows.pipeline [--regions a,b] [--stages embed,publish] [--from-stage train] [--force]

How stages map to tasks: `dvc dag` lists the stages (ingest@R, sample@R, render@R, train, embed@R,
publish, evaluate@R: foreach stages expanded for params.yaml's pipeline.regions); each selected stage is
one task run, `dvc repro --single-item <stage>`, in dependency order and serially (DVC's repo lock
forbids concurrent repros; the parallelism is inside stages: loc2vec/fanout.py). DVC skips a stage whose
deps and params did not change, so a re-run costs seconds.

`regions`: written to params.yaml's pipeline.regions (in place, comments kept; flows/params_edit.py)
before anything runs, and left there: params.yaml, dvc.lock and the outputs then agree, and a later
`dvc repro` or `dvc status` sees the same pipeline. Like `dvc exp run -S`, without the experiment refs.

Retries: a stage whose output says the database refused or dropped a connection (or another DVC process
held the repo lock) is retried with exponential backoff (orchestrate.retries, retry_backoff_s); any
other failure — a bad param, a checksum mismatch, a bug — fails the run at once.

The concurrency guard: data/.locks/pipeline.lock (flows/lock.py) for the whole run; refresh_osm takes
the same lock. A second run waits orchestrate.lock_timeout_s, then fails naming the holder.

At the end: a markdown artifact `loc2vec-pipeline-summary` (stages, the evaluation metrics of
data/evaluate/*.json, the training summary and its MLflow run link), and the same as a returned dict.
`print_report` (the CLI's last step) adds one online feature lookup and the UI links.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from flows.dvc_stages import repro_stage, run_dvc, stage_env, stage_graph
from flows.lock import exclusive
from flows.params_edit import set_pipeline_regions
from loc2vec.config import ConfigError, load_params, params_path
from loc2vec.fanout import OrchestrateConfig, orchestrate_config, retry_options
from loc2vec.osm import check_region_name

ARTIFACT_KEY = "loc2vec-pipeline-summary"
VADUZ = (47.1410, 9.5209)  # the README's example lookup (Liechtenstein's capital)


def prefect_api_url() -> str | None:
    """The API this flow reports to (an ephemeral server's too): handed to stage subprocesses."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return str(client.api_url)
    except Exception:  # no API: stages then resolve their own runner (loc2vec/fanout.py, `auto`)
        return None


@task(name="dvc-stage", task_run_name="{stage}", tags=["loc2vec-dvc"], cache_policy=NO_CACHE, persist_result=False)
def stage_task(stage: str, root: str, api_url: str | None = None, force: bool = False) -> dict[str, Any]:
    """One DVC stage (`dvc repro --single-item`); retried by the flow's options when transient."""
    ctx = TaskRunContext.get()
    result = repro_stage(stage, Path(root), stage_env(api_url), force=force)
    result["attempts"] = ctx.task_run.run_count if ctx else 1
    get_run_logger().info("%s: %s in %.1f s (attempt %d)", stage, "ran" if result["ran"] else "up to date",
                          result["seconds"], result["attempts"])  # fmt: skip
    return result


@task(name="dvc-push", cache_policy=NO_CACHE, persist_result=False)
def push_task(root: str, targets: list[str] | None = None, api_url: str | None = None) -> None:
    """`dvc push` of the given stages' outputs (all when None) to the default remote."""
    run_dvc(["push", *(targets or [])], Path(root), stage_env(api_url))


def check_regions(regions: list[str]) -> list[str]:
    """Names that DVC's ingest stage can fetch: registered in params.yaml (or the ad-hoc registry)."""
    params = load_params()
    out = []
    for region in regions:
        region = check_region_name(region.strip())
        if region not in params.regions.registry:
            known = ", ".join(sorted(params.regions.registry))
            raise ConfigError(f"unknown region {region!r} (known: {known}); register it with refresh_osm first")
        if region not in out:
            out.append(region)
    if not out:
        raise ConfigError("regions: give at least one region")
    return out


@flow(name="loc2vec-pipeline", log_prints=True, persist_result=False)
def pipeline(
    regions: list[str] | None = None,
    stages: list[str] | None = None,
    from_stage: str | None = None,
    force: bool = False,
    push: bool = False,
) -> dict[str, Any]:
    """Run the DVC pipeline stage by stage (see the module doc); returns the run's summary."""
    logger = get_run_logger()
    params = load_params()
    root, cfg = params.root, orchestrate_config()
    with exclusive("pipeline", timeout_s=cfg.lock_timeout_s, root=root):
        if regions:
            regions = check_regions(list(regions))
            if set_pipeline_regions(params_path(), regions):
                logger.info("params.yaml pipeline.regions := %s", regions)
        regions = list(load_params().section("pipeline").get("regions") or [])
        api = prefect_api_url()
        graph = stage_graph(root, stage_env(api))
        selected = graph.select(stages, from_stage)
        logger.info("stages (%d): %s", len(selected), ", ".join(selected))
        run = stage_task.with_options(**retry_options(cfg))
        results = [run(stage=s, root=str(root), api_url=api, force=force) for s in selected]
        if push:
            push_task.with_options(**retry_options(cfg))(str(root), None, api)
        summary = summarize(root, regions, results, cfg)
        create_markdown_artifact(markdown=summary["markdown"], key=ARTIFACT_KEY,
                                 description=f"loc2vec pipeline: {', '.join(regions)}")  # fmt: skip
    return summary


# ---------------------------------------------------------------- the summary


def read_metrics(root: Path) -> dict[str, dict[str, Any]]:
    """data/evaluate/<name>.json → {name: tasks}: {task: {featureset: {"logreg"|"knn": {accuracy, macro_f1}}}}."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted((root / "data" / "evaluate").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("tasks"), dict):
            out[path.stem] = data["tasks"]
    return out


def mlflow_link(root: Path, run_id: str | None, ui: str) -> dict[str, Any]:
    """The MLflow UI address of a run: http://<ui>/#/experiments/<experiment>/runs/<run>.

    The experiment id comes from the local store (sqlite:///mlflow.db, read-only, no MLflow import), or
    from MLFLOW_TRACKING_URI's server, which is then also the UI.
    """
    if not run_id:
        return {}
    from loc2vec.tracking import user_tracking_uri

    uri = user_tracking_uri() or f"sqlite:///{root / 'mlflow.db'}"
    experiment = None
    try:
        if uri.startswith("sqlite:///"):
            db = Path(uri.removeprefix("sqlite:///"))
            if db.is_file():
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                    row = conn.execute("SELECT experiment_id FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
                experiment = str(row[0]) if row else None
        elif uri.startswith(("http://", "https://")):
            from mlflow import MlflowClient

            experiment = MlflowClient(uri).get_run(run_id).info.experiment_id
            ui = uri
    except Exception:  # a link is a convenience: never fail a finished pipeline over it
        experiment = None
    url = f"{ui.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}" if experiment is not None else None
    return {"run_id": run_id, "experiment_id": experiment, "tracking_uri": uri, "url": url}


def _f(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "–"


def summarize(root: Path, regions: list[str], results: list[dict[str, Any]], cfg: OrchestrateConfig) -> dict[str, Any]:
    """The run's summary: stages, metrics, training, MLflow link, and all of it as markdown."""
    metrics = read_metrics(root)
    training_path = root / "data" / "model" / "summary.json"
    training = json.loads(training_path.read_text()) if training_path.is_file() else {}
    mlflow = mlflow_link(root, training.get("mlflow_run_id"), cfg.mlflow_ui)

    md = [f"# loc2vec pipeline: {', '.join(regions) or '(no regions)'}", "", "## Stages", "",
          "| stage | result | attempts | seconds |", "|---|---|---|---|"]  # fmt: skip
    md += [f"| {r['stage']} | {'ran' if r['ran'] else 'up to date'} | {r.get('attempts', 1)} | {r['seconds']} |"
           for r in results] or ["| (none selected) | | | |"]  # fmt: skip
    md += ["", "## Downstream evaluation", ""]
    if metrics:
        md += ["| evaluation | task | featureset | logreg macro-F1 | logreg accuracy | kNN macro-F1 | kNN accuracy |",
               "|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, tasks in metrics.items():
            for task_name, featuresets in tasks.items():
                for fs, models in featuresets.items():
                    lr, knn = models.get("logreg", {}), models.get("knn", {})
                    md.append(f"| {name} | {task_name} | {fs} | {_f(lr.get('macro_f1'))} | {_f(lr.get('accuracy'))} "
                              f"| {_f(knn.get('macro_f1'))} | {_f(knn.get('accuracy'))} |")  # fmt: skip
    else:
        md.append("No evaluation yet (data/evaluate/*.json).")
    md += ["", "## Model", ""]
    if training:
        md.append(f"Best validation triplet accuracy {_f(training.get('best_val_triplet_accuracy'))} at step "
                  f"{training.get('best_step')} of {training.get('steps')} ({training.get('stopped')}).")  # fmt: skip
    if mlflow.get("url"):
        md.append(f"MLflow run: [{mlflow['run_id']}]({mlflow['url']})"
                  " (`mlflow ui --backend-store-uri sqlite:///mlflow.db`)")  # fmt: skip
    elif mlflow:
        md.append(f"MLflow run {mlflow['run_id']} ({mlflow['tracking_uri']})")
    else:
        md.append("No training summary yet (data/model/summary.json).")
    return {
        "regions": regions,
        "stages": results,
        "metrics": metrics,
        "training": training,
        "mlflow": mlflow,
        "artifact_key": ARTIFACT_KEY,
        "markdown": "\n".join(md) + "\n",
    }


# ---------------------------------------------------------------- the report `make run` prints


def example_location(root: Path, regions: list[str]) -> tuple[float, float] | None:
    """Vaduz when Liechtenstein is in the pipeline, else the centre of the first region's import extent."""
    if "liechtenstein" in regions:
        return VADUZ
    for region in regions:
        record = root / "data" / "ingest" / f"{region}.json"
        if record.is_file():
            west, south, east, north = json.loads(record.read_text())["bbox"]
            return (round((south + north) / 2, 5), round((west + east) / 2, 5))
    return None


def print_report(summary: dict[str, Any], *, lookup: bool = True) -> None:
    """The run's summary, one online feature lookup (`loc2vec features`), and where to look next."""
    root = load_params().root
    cfg = orchestrate_config()
    print(summary["markdown"])
    where = example_location(root, summary.get("regions") or [])
    if lookup and where:
        lat, lon = where
        cmd = [str(Path(sys.executable).parent / "loc2vec"), "features", "--lat", str(lat), "--lon", str(lon)]
        print(f"$ loc2vec features --lat {lat} --lon {lon}")
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=stage_env())
        print((proc.stdout or proc.stderr).strip())
    api = os.environ.get("PREFECT_API_URL")
    prefect_ui = api.removesuffix("/").removesuffix("/api") if api else cfg.prefect_ui
    print("\nPrefect UI:  " + prefect_ui + (" (start it with `prefect server start`)" if not api else ""))
    link = (summary.get("mlflow") or {}).get("url")
    print("MLflow UI:   " + (link or cfg.mlflow_ui) + "  (mlflow ui --backend-store-uri sqlite:///mlflow.db)")


def _names(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--regions", help="comma-separated regions; written to params.yaml pipeline.regions")
    p.add_argument("--stages", help="comma-separated stages or base names (embed = every embed@R)")
    p.add_argument("--from-stage", help="this stage and everything downstream of it")
    p.add_argument("--force", action="store_true", help="run the selected stages even if DVC finds them unchanged")
    p.add_argument("--push", action="store_true", help="dvc push the outputs at the end")
    p.add_argument("--no-lookup", action="store_true", help="skip the example online feature lookup")
    args = p.parse_args(argv)
    summary = pipeline(regions=_names(args.regions), stages=_names(args.stages), from_stage=args.from_stage,
                       force=args.force, push=args.push)  # fmt: skip
    print_report(summary, lookup=not args.no_lookup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
