"""The `publish` flow: Feast materialize-incremental only (the daily schedule).

    python -m flows.publish [--online-store sqlite|postgres]

It writes the offline rows newer than the last materialization to the online store — cheap, and what a
day needs: new rows come with a new model version or a new import, both published (feast apply + full
materialization) by the pipeline's `publish` stage. See loc2vec.publish.materialize_incremental_only.

Guarded by data/.locks/publish.lock (two publish runs never overlap) and, inside, by loc2vec.publish's
own lock, which the pipeline's publish stage takes too: the online store has one writer at a time.
A dropped database connection (PostgreSQL online store) is retried with backoff.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.lock import exclusive
from loc2vec.config import load_params
from loc2vec.fanout import orchestrate_config, retry_options

ARTIFACT_KEY = "loc2vec-publish-summary"


@task(
    name="materialize-incremental", task_run_name="materialize-incremental", cache_policy=NO_CACHE, persist_result=False
)
def materialize_task(online_store: str | None = None) -> dict[str, Any]:
    from loc2vec.publish import materialize_incremental_only  # imports Feast (seconds): only when it runs

    return materialize_incremental_only(online_store=online_store)


@flow(name="loc2vec-publish", log_prints=True, persist_result=False)
def publish(online_store: str | None = None) -> dict[str, Any]:
    """Materialize-incremental to the online store (params publish.online_store unless given)."""
    cfg = orchestrate_config()
    with exclusive("publish", timeout_s=cfg.lock_timeout_s, root=load_params().root):
        report = materialize_task.with_options(**retry_options(cfg))(online_store)
    rows = "\n".join(f"| {k} | {v} |" for k, v in report.items())
    create_markdown_artifact(markdown=f"# loc2vec publish (materialize-incremental)\n\n| | |\n|---|---|\n{rows}\n",
                             key=ARTIFACT_KEY, description="Feast materialize-incremental")  # fmt: skip
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.publish", description=__doc__.splitlines()[0])
    p.add_argument("--online-store", choices=["sqlite", "postgres"], help="default: params/LOC2VEC_ONLINE_STORE")
    args = p.parse_args(argv)
    print(json.dumps(publish(online_store=args.online_store), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
