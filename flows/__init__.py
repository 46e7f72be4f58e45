"""Prefect flows and deployments (`pipeline`, `refresh_osm`, `publish`).

They run the same stages as dvc.yaml; they land with the orchestration issue. Until then,
`make run` reproduces the DVC pipeline directly.
"""
