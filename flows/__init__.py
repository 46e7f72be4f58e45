"""Prefect flows and deployments: `pipeline` (pipeline.py), `refresh_osm` (refresh.py), `publish` (publish.py).

They run the same stages as dvc.yaml (one Prefect task per DVC stage, dvc_stages.py), each under a file
lock (lock.py), editing params.yaml in place when they change it (params_edit.py). An edge, like the
command line: each flow loads params.yaml when it starts and passes typed sections and the project's paths
down to loc2vec. Run them with `loc2vec flow pipeline|refresh|publish`; `loc2vec flow serve` serves the
deployments (deployments.py; prefect.yaml declares the same ones for a worker).
"""
