# loc2vec: `make run` (set-up + whole pipeline) and `make test` (set-up + test suite).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
L2V := $(VENV)/bin/loc2vec
PYTHON ?= python3
REGIONS ?=
export PREFECT_HOME ?= $(CURDIR)/.prefect
# A fresh PREFECT_HOME's first ephemeral server start can take over a minute on 2 cores.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 300
# No outbound telemetry (these machines are offline: each attempt logs an ERROR).
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# DVC runs stage commands through the shell: the venv's bin must be on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup system venv db db-stop test run repro lint bench ui-mlflow ui-prefect clean-venv

setup: system venv db

system:
	@bash scripts/setup_system.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

db: venv
	$(L2V) db setup

db-stop:
	$(L2V) db stop

test: setup
	$(VENV)/bin/pytest -q

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy loc2vec/core loc2vec/serving loc2vec/evaluation

bench: setup
	$(L2V) bench render --region liechtenstein --json

# The DVC pipeline directly (`dvc repro`); `make run` runs the same stages as a Prefect flow.
repro: setup
	$(VENV)/bin/dvc repro

# Set-up, then the Prefect `pipeline` flow (every DVC stage, one task each) on params.yaml's
# pipeline.regions, or on REGIONS=a,b (written to params.yaml); it ends with an online feature lookup.
run: setup
	$(L2V) flow pipeline $(if $(REGIONS),--regions $(REGIONS),)

ui-mlflow: venv
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000

ui-prefect: venv
	$(VENV)/bin/prefect server start --port 4200

clean-venv:
	rm -rf $(VENV)
