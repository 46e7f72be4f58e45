"""Feast's feature server for a project's store, on 127.0.0.1 only.

`loc2vec serve` runs Feast's own HTTP server (`FeatureStore.serve`: gunicorn + FastAPI, the same as `feast
serve`) over the store consumers read (the read-only role for PostgreSQL). It reads the registry that
publish swaps in whole, and re-reads it every `registry_ttl_s` seconds, so a running server picks up a new
publish without a restart and never sees a half-written registry.

Endpoints (Feast's): `POST /get-online-features` with `{"feature_service": "transport_mode_v7", "entities":
{"h3_cell": [...]}}` (or `"features": ["location_embedding_v7:embedding", ...]`), `GET /health`.
"""

from __future__ import annotations

import logging

from loc2vec.serving.store import StoreSettings, feature_store

log = logging.getLogger(__name__)
HOST = "127.0.0.1"  # never another interface: the server has no authentication


def serve(settings: StoreSettings, port: int, *, registry_ttl_s: int = 5, workers: int = 1) -> None:
    """Serve the store over HTTP on 127.0.0.1:`port` until stopped (SIGINT/SIGTERM)."""
    store = feature_store(settings)
    store.refresh_registry()  # fail now, with the store's error, if nothing was published
    log.info("feature server on http://%s:%d (%s store)", HOST, port, settings.kind)
    store.serve(
        host=HOST,
        port=port,
        type_="http",
        no_access_log=True,
        workers=workers,
        registry_ttl_sec=registry_ttl_s,
    )
