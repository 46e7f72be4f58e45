"""The `pipeline` flow: the DVC stages as Prefect tasks, with retries, a lock, and a summary artifact.

    loc2vec flow pipeline [--regions a,b] [--stages embed,publish] [--from-stage train] [--force] [--push]

(`make run`; the on-demand deployment runs the same flow.) How stages map to tasks: `dvc dag` lists the
stages (ingest@R, sample@R, render@R, train, promote, embed@R, publish@R, suite_inputs@R, evaluate@R: foreach stages
expanded for params.yaml's pipeline.regions); each selected stage is one task run, `dvc repro
--single-item <stage>`, in dependency order and serially (DVC's repo lock forbids concurrent repros; the
parallelism is inside stages: loc2vec.orchestration.runners). DVC skips a stage whose deps and params did
not change, so a re-run costs seconds.

Like the command line, the flow is an edge: it loads params.yaml (`Project.load()`) when it starts, and
again after it changed pipeline.regions, and takes every location from the project's paths.

`regions`: written to params.yaml's pipeline.regions (in place, comments kept; flows/params_edit.py)
before anything runs, and left there: params.yaml, dvc.lock and the outputs then agree, and a later
`dvc repro` or `dvc status` sees the same pipeline. Like `dvc exp run -S`, without the experiment refs.

Retries: a stage whose output says the database refused or dropped a connection (or another DVC process
held the repo lock) is retried with exponential backoff (orchestrate.retries, retry_backoff_s); any
other failure — a bad param, a checksum mismatch, a bug — fails the run at once.

The concurrency guard: the project's pipeline lock (data/.locks/pipeline.lock, flows/lock.py) for the
whole run; refresh_osm takes the same lock. A second run waits orchestrate.lock_timeout_s, then fails
naming the holder.

At the end: a markdown artifact `loc2vec-pipeline-summary` (stages, the evaluation metrics of the
pipeline's regions, data/evaluate/<R>.json, the training summary and its MLflow run link), and the same
as a returned dict. `print_report` (the command's last step) adds one online feature lookup and the UI
links.
"""

from __future__ import annotations

import json
import os
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
from loc2vec.cli.project import Project
from loc2vec.core.config import OrchestrateConfig, Params, params_path
from loc2vec.core.errors import ConfigError
from loc2vec.core.names import check_region_name
from loc2vec.core.paths import ProjectPaths
from loc2vec.orchestration.transient import retry_options

ARTIFACT_KEY = "loc2vec-pipeline-summary"
VADUZ = (47.1410, 9.5209)  # the README's example lookup (Liechtenstein's capital)


def prefect_api_url() -> str | None:
    """The API this flow reports to (an ephemeral server's too): handed to stage subprocesses."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return str(client.api_url)
    except Exception:  # no API: stages then resolve their own runner (orchestration.runners, `auto`)
        return None


@task(name="dvc-stage", task_run_name="{stage}", tags=["loc2vec-dvc"], cache_policy=NO_CACHE, persist_result=False)
def stage_task(stage: str, root: str, api_url: str | None = None, force: bool = False) -> dict[str, Any]:
    """One DVC stage (`dvc repro --single-item`); retried by the flow's options when transient."""
    ctx = TaskRunContext.get()
    result = repro_stage(stage, Path(root), stage_env(api_url), force=force)
    result["attempts"] = ctx.task_run.run_count if ctx else 1
    get_run_logger().info(
        "%s: %s in %.1f s (attempt %d)",
        stage,
        "ran" if result["ran"] else "up to date",
        result["seconds"],
        result["attempts"],
    )
    return result


@task(name="dvc-push", cache_policy=NO_CACHE, persist_result=False)
def push_task(root: str, targets: list[str] | None = None, api_url: str | None = None) -> None:
    """`dvc push` of the given stages' outputs (all when None) to the default remote."""
    run_dvc(["push", *(targets or [])], Path(root), stage_env(api_url))


def check_regions(regions: list[str], params: Params) -> list[str]:
    """Names that DVC's ingest stage can fetch: registered in params.yaml (or the ad-hoc registry)."""
    out = []
    for region in regions:
        region = check_region_name(region.strip(), params.reserved_schemas)
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
    params_file = params_path()
    project = Project.load(params_file)
    root, cfg = project.paths.root, project.params.orchestrate
    with exclusive(project.paths.lock("pipeline"), timeout_s=cfg.lock_timeout_s):
        if regions:
            regions = check_regions(list(regions), project.params)
            if set_pipeline_regions(params_file, regions):
                logger.info("params.yaml pipeline.regions := %s", regions)
                project = Project.load(params_file)
        regions = list(project.params.pipeline.regions)
        api = prefect_api_url()
        graph = stage_graph(root, stage_env(api))
        selected = graph.select(stages, from_stage)
        logger.info("stages (%d): %s", len(selected), ", ".join(selected))
        run = stage_task.with_options(**retry_options(cfg))
        results = [run(stage=s, root=str(root), api_url=api, force=force) for s in selected]
        if push:
            push_task.with_options(**retry_options(cfg))(str(root), None, api)
        summary = summarize(project.paths, regions, results, cfg)
        create_markdown_artifact(
            markdown=summary["markdown"], key=ARTIFACT_KEY, description=f"loc2vec pipeline: {', '.join(regions)}"
        )
    return summary


# ---------------------------------------------------------------- the summary


def read_metrics(paths: ProjectPaths, regions: list[str]) -> dict[str, dict[str, Any]]:
    """The evaluation of each of these regions (data/evaluate/<R>.json) → {region: tasks}, where tasks is
    {task: {featureset: {"logreg"|"knn": {accuracy, macro_f1}}}}. Only these regions: a file left by an
    earlier run over other regions is no result of this one."""
    out: dict[str, dict[str, Any]] = {}
    for region in regions:
        try:
            data = json.loads(paths.evaluation(region).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("tasks"), dict):
            out[region] = data["tasks"]
    return out


def evaluated_models(paths: ProjectPaths, regions: list[str]) -> dict[str, str]:
    """{region: "name version N"} of the model whose published embeddings each evaluation read (its meta.model)."""
    out: dict[str, str] = {}
    for region in regions:
        try:
            model = json.loads(paths.evaluation(region).read_text())["meta"]["model"]
            out[region] = f"{model['name']} version {model['version']}"
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def promotion_line(paths: ProjectPaths, evaluated: dict[str, str] | None = None) -> str | None:
    """One sentence on the champion gate's last decision (data/promotion.json), or None before any.

    `evaluated` ({region: "name version N"}, `evaluated_models`): where the embeddings evaluated are not of the
    decision's champion, the sentence says so. That happens in a fresh clone: DVC finds the gate's inputs and its
    committed decision unchanged and does not run it, while the clone's own registry numbers its first version 1.
    """
    try:
        p = json.loads(paths.promotion.read_text())
        if p["candidate_version"] == p["previous_champion_version"]:  # the first version: nothing to compare with
            scored = "not scored" if p["candidate_score"] is None else f"its gate score {_f(p['candidate_score'])}"
            line = (
                f"Champion gate: version {p['candidate_version']} is the champion, with nothing to compare it with "
                f"({scored})."
            )
        elif p.get("same_weights_as_champion"):  # a retrain that reproduced the champion's bytes: nothing to score
            line = (
                f"Champion gate: candidate version {p['candidate_version']} has the weights of champion version "
                f"{p['previous_champion_version']} (not scored; the champion stays version {p['champion_version']})."
            )
        else:
            verdict = (
                f"promoted: version {p['champion_version']} is the champion"
                if p["promoted"]
                else f"not promoted: the champion stays version {p['champion_version']}"
            )
            line = (
                f"Champion gate: candidate version {p['candidate_version']} scored {_f(p['candidate_score'])} "
                f"against champion version {p['previous_champion_version']}'s {_f(p['champion_score'])} ({verdict})."
            )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    champion = f"{p.get('model_name', '')} version {p['champion_version']}".strip()
    others = sorted({model for model in (evaluated or {}).values() if not model.endswith(champion)})
    if others:
        line += (
            f" That is the decision recorded in {paths.promotion.name} (the gate did not run here: DVC found its"
            f" inputs unchanged); the embeddings evaluated here are of {', '.join(others)} of this checkout's registry."
        )
    return line


def mlflow_link(paths: ProjectPaths, run_id: str | None, ui: str) -> dict[str, Any]:
    """The MLflow UI address of a run: http://<ui>/#/experiments/<experiment>/runs/<run>.

    The run's experiment comes from the project's tracking store (loc2vec.core.tracking: the local
    sqlite:///<root>/mlflow.db, or MLFLOW_TRACKING_URI's server, which is then also the UI). A local store
    that does not exist yet is not created for a link.
    """
    if not run_id:
        return {}
    from loc2vec.core.tracking import tracking_uri

    uri = tracking_uri(paths)
    experiment = None
    try:
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
            raise FileNotFoundError(uri)
        from mlflow import MlflowClient  # imports in seconds: only when there is a run to link

        experiment = str(MlflowClient(uri).get_run(run_id).info.experiment_id)
        if uri.startswith(("http://", "https://")):
            ui = uri
    except Exception:  # a link is a convenience: never fail a finished pipeline over it
        experiment = None
    url = f"{ui.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}" if experiment is not None else None
    return {"run_id": run_id, "experiment_id": experiment, "tracking_uri": uri, "url": url}


def _f(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "–"


def summarize(
    paths: ProjectPaths, regions: list[str], results: list[dict[str, Any]], cfg: OrchestrateConfig
) -> dict[str, Any]:
    """The run's summary: stages, the regions' metrics, training, MLflow link, and all of it as markdown."""
    metrics = read_metrics(paths, regions)
    training_path = paths.model_dir / "summary.json"
    training = json.loads(training_path.read_text()) if training_path.is_file() else {}
    run_path = paths.model_dir / "run.json"  # the run's provenance (the summary, a DVC metric, has none)
    if run_path.is_file():
        training = {**training, **json.loads(run_path.read_text())}
    mlflow = mlflow_link(paths, training.get("mlflow_run_id"), cfg.mlflow_ui)

    md = [
        f"# loc2vec pipeline: {', '.join(regions) or '(no regions)'}",
        "",
        "## Stages",
        "",
        "| stage | result | attempts | seconds |",
        "|---|---|---|---|",
    ]
    md += [
        f"| {r['stage']} | {'ran' if r['ran'] else 'up to date'} | {r.get('attempts', 1)} | {r['seconds']} |"
        for r in results
    ] or ["| (none selected) | | | |"]
    md += ["", "## Downstream evaluation", ""]
    evaluated = evaluated_models(paths, regions)
    if evaluated:
        md += [f"Embeddings evaluated: {region}: {model}." for region, model in evaluated.items()] + [""]
    if metrics:
        md += [
            "| evaluation | task | featureset | logreg macro-F1 | logreg accuracy | hgb macro-F1 | hgb accuracy |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, tasks in metrics.items():
            for task_name, featuresets in tasks.items():
                for fs, models in featuresets.items():
                    if fs.startswith("lift"):  # the suite's lift of best_baseline+loc2vec(_wide) over best_baseline
                        lifts = [
                            f"{_f(v.get('lift'))} [{', '.join(_f(c) for c in v.get('ci95') or ())}] "
                            f"over {v.get('best_baseline')}"
                            for v in (models.get("logreg", {}), models.get("hgb", {}))
                        ]
                        md.append(f"| {name} | {task_name} | {fs} | {lifts[0]} | | {lifts[1]} | |")
                        continue
                    lr, other = models.get("logreg", {}), models.get("hgb") or models.get("knn") or {}
                    fs = fs if "hgb" in models or "knn" not in models else f"{fs} (kNN, not hgb)"  # older JSONs
                    md.append(
                        f"| {name} | {task_name} | {fs} | {_f(lr.get('macro_f1'))} | {_f(lr.get('accuracy'))} "
                        f"| {_f(other.get('macro_f1'))} | {_f(other.get('accuracy'))} |"
                    )
    else:
        md.append(f"No evaluation of {', '.join(regions) or 'any region'} yet (data/evaluate/<region>.json).")
    md += ["", "## Model", ""]
    if training:
        md.append(
            f"Best validation triplet accuracy {_f(training.get('best_val_triplet_accuracy'))} at step "
            f"{training.get('best_step')} of {training.get('steps')} ({training.get('stopped')})."
        )
    gate = promotion_line(paths, evaluated)
    if gate:
        md.append(gate)
    if mlflow.get("url"):
        md.append(
            f"MLflow run: [{mlflow['run_id']}]({mlflow['url']}) (`mlflow ui --backend-store-uri sqlite:///mlflow.db`)"
        )
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
        "evaluated_models": evaluated,
        "artifact_key": ARTIFACT_KEY,
        "markdown": "\n".join(md) + "\n",
    }


# ---------------------------------------------------------------- the report `make run` prints


def example_location(paths: ProjectPaths, regions: list[str]) -> tuple[float, float] | None:
    """Vaduz when Liechtenstein is in the pipeline, else the centre of the first region's import extent."""
    if "liechtenstein" in regions:
        return VADUZ
    for region in regions:
        record = paths.ingest_record(region)
        if record.is_file():
            west, south, east, north = json.loads(record.read_text())["bbox"]
            return (round((south + north) / 2, 5), round((west + east) / 2, 5))
    return None


def print_report(summary: dict[str, Any], project: Project, *, lookup: bool = True) -> None:
    """The run's summary, one online feature lookup (`loc2vec features`), and where to look next."""
    root, cfg = project.paths.root, project.params.orchestrate
    print(summary["markdown"])
    where = example_location(project.paths, summary.get("regions") or [])
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
    port = project.params.serve.port
    print(
        f"Feature server: make serve  (loc2vec serve --port {port}; `loc2vec services` lists what to ask for), then\n"
        f"  curl -s -X POST http://127.0.0.1:{port}/get-online-features -H 'Content-Type: application/json' "
        """-d '{"feature_service": "latest", "entities": {"h3_cell": ["<cell from loc2vec features>"]}}'"""
    )
