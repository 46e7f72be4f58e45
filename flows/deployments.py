"""Deployments: weekly refresh_osm, daily publish, an unscheduled pipeline — served from one process.

    prefect server start                                   # one terminal (schedules need a real server)
    PREFECT_API_URL=http://127.0.0.1:4200/api loc2vec flow serve

`loc2vec flow serve` (loc2vec/cli/flows.py; it replaces `python -m flows.deployments`) calls
`serve_deployments`: `prefect.serve` registers the deployments and runs their scheduled runs in
subprocesses of that process (no work pool needed); each run imports its flow as a module
(flows.refresh:refresh_osm) from the checkout. The same deployments are declared in prefect.yaml for a
worker instead (`prefect deploy --all`, `prefect worker start --pool loc2vec`); tests/test_flows.py checks
that both declare the same schedules. Schedules come from params.yaml `orchestrate:` (refresh_cron, publish_cron,
timezone), read by the caller (the command line) and passed in.

Concurrency: each deployment allows one active run (later ones are enqueued), the stage tasks carry the
tag `loc2vec-dvc`, whose tag concurrency limit (1) `serve` creates, and every flow holds its file lock
(flows/lock.py), which also covers runs started outside Prefect's scheduler.
"""

from __future__ import annotations

from typing import Any

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from flows.pipeline import pipeline
from flows.publish import publish
from flows.refresh import refresh_osm
from loc2vec.core.config import Params

STAGE_TAG = "loc2vec-dvc"  # flows.pipeline.stage_task's tag: one DVC stage at a time across all runs
TAGS = ["loc2vec"]


def one_at_a_time() -> ConcurrencyLimitConfig:
    """One active run per deployment; a run scheduled while one is active waits its turn."""
    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def schedules(params: Params) -> dict[str, dict[str, Any]]:
    """Deployment name → its flow, cron, timezone and default parameters (the single declaration)."""
    cfg, region = params.orchestrate, params.regions.default
    return {
        "weekly-refresh": {
            "flow": refresh_osm,
            "cron": cfg.refresh_cron,
            "timezone": cfg.timezone,
            "parameters": {"region": region},
        },
        "daily-publish": {"flow": publish, "cron": cfg.publish_cron, "timezone": cfg.timezone, "parameters": {}},
        "on-demand": {"flow": pipeline, "cron": None, "timezone": cfg.timezone, "parameters": {}},
    }


def deployments(params: Params) -> list[RunnerDeployment]:
    """The deployments, built locally (no API call until they are served)."""
    out = []
    for name, spec in schedules(params).items():
        crons = [Cron(spec["cron"], timezone=spec["timezone"])] if spec["cron"] else None
        out.append(
            spec["flow"].to_deployment(
                name=name,
                schedules=crons,
                parameters=spec["parameters"],
                concurrency_limit=one_at_a_time(),
                tags=TAGS,
                # flows.refresh:refresh_osm, imported as a module from the repository root: a file path
                # would put flows/ itself on sys.path, where its modules could shadow packages.
                entrypoint_type=EntrypointType.MODULE_PATH,
                description=(spec["flow"].description or "").splitlines()[0] if spec["flow"].description else None,
            )
        )
    return out


def ensure_tag_limit(tag: str = STAGE_TAG, limit: int = 1) -> None:
    """Prefect's tag concurrency limit for the DVC stage tasks (idempotent)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=tag, concurrency_limit=limit)


def serve_deployments(params: Params) -> None:
    """Register the deployments with the Prefect API (PREFECT_API_URL) and run their schedules until stopped."""
    from prefect import serve

    ensure_tag_limit()
    serve(*deployments(params))
