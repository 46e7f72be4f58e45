"""The `publish` flow: Feast materialize-incremental only (the daily schedule).

    loc2vec flow publish [--online-store sqlite|postgres]

(the daily-publish deployment runs the same flow). It writes the offline rows newer than the last
materialization to the online store — cheap, and what a day needs: new rows come with a new model version
or a new import, both published (feast apply + full materialization) by the pipeline's `publish@R` stages.
See loc2vec.serving.publish.materialize_incremental_only.

Like the other flows, it loads params.yaml when it starts and passes the store's settings down. Guarded
by the project's publish lock (data/.locks/publish.lock: two publish runs never overlap) and, inside, by
loc2vec.serving.publish's own lock, which the pipeline's publish stages take too: the online store has
one writer at a time. A dropped database connection (PostgreSQL online store) is retried with backoff.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.lock import exclusive
from loc2vec.cli.project import Project
from loc2vec.orchestration.transient import retry_options
from loc2vec.serving.store import StoreSettings

ARTIFACT_KEY = "loc2vec-publish-summary"


@task(
    name="materialize-incremental", task_run_name="materialize-incremental", cache_policy=NO_CACHE, persist_result=False
)
def materialize_task(settings: StoreSettings) -> dict[str, Any]:
    from loc2vec.serving.publish import materialize_incremental_only  # imports Feast (seconds): only when it runs

    return materialize_incremental_only(settings)


@flow(name="loc2vec-publish", log_prints=True, persist_result=False)
def publish(online_store: str | None = None) -> dict[str, Any]:
    """Materialize-incremental to the online store (params publish.online_store unless given)."""
    project = Project.load()
    params, paths = project.params, project.paths
    settings = StoreSettings.from_config(params.publish, params.embed, paths, project.info, online_store)
    cfg = params.orchestrate
    with exclusive(paths.lock("publish"), timeout_s=cfg.lock_timeout_s):
        report = materialize_task.with_options(**retry_options(cfg))(settings)
    rows = "\n".join(f"| {k} | {v} |" for k, v in report.items())
    create_markdown_artifact(
        markdown=f"# loc2vec publish (materialize-incremental)\n\n| | |\n|---|---|\n{rows}\n",
        key=ARTIFACT_KEY,
        description="Feast materialize-incremental",
    )
    return report
