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
# tcmalloc for every process a target starts (pytest, DVC stages, Prefect tasks, spawned workers): glibc's
# malloc spends a third of the CPU time in the kernel on CPU training (loc2vec/cli/allocator.py). Looked up
# when the recipe runs, after `make setup` has installed it.
TCMALLOC = LD_PRELOAD="$$(ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 2>/dev/null | head -n 1)"

.PHONY: setup system venv db db-stop test run repro lint bench serve ui-mlflow ui-prefect clean-venv

setup: system venv db

system:
	@bash scripts/setup_system.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[pipeline,dev,peers]'  # the tested versions (constraints.txt)
	@touch $@

db: venv
	$(L2V) db setup
	$(L2V) redis start --if-selected

db-stop:
	$(L2V) db stop

# The suite in TEST_WORKERS pytest-xdist processes (whole test modules per worker, in order; each worker with its
# own test database and project): in one process it kept about one of CI's two cores busy (subprocess start-up,
# PostGIS, servers). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: setup
	$(TCMALLOC) $(VENV)/bin/pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy loc2vec/core loc2vec/serving loc2vec/evaluation

bench: setup
	$(TCMALLOC) $(L2V) bench render --region liechtenstein --json

# The DVC pipeline directly (`dvc repro`); `make run` runs the same stages as a Prefect flow.
repro: setup
	$(TCMALLOC) $(VENV)/bin/dvc repro

# Set-up, then the Prefect `pipeline` flow (every DVC stage, one task each) on params.yaml's
# pipeline.regions, or on REGIONS=a,b (written to params.yaml); it ends with an online feature lookup.
run: setup
	$(TCMALLOC) $(L2V) flow pipeline $(if $(REGIONS),--regions $(REGIONS),)

# Feast's feature server over the published store, on 127.0.0.1 (params serve.port; PORT=… overrides).
serve: venv
	$(L2V) serve $(if $(PORT),--port $(PORT),)

ui-mlflow: venv
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000

ui-prefect: venv
	$(VENV)/bin/prefect server start --port 4200

clean-venv:
	rm -rf $(VENV)
