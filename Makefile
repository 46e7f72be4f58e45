# loc2vec: `make run` (set-up + whole pipeline) and `make test` (set-up + test suite).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
L2V := $(VENV)/bin/loc2vec
PYTHON ?= python3
REGIONS ?= liechtenstein
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: setup system venv db db-stop test run repro lint bench clean-venv

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

bench: setup
	$(L2V) bench render --region liechtenstein --json

# DVC runs stage commands through the shell: the venv's bin must be on PATH.
repro: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

# Until the Prefect pipeline flow lands, `make run` reproduces the DVC pipeline.
run: repro

clean-venv:
	rm -rf $(VENV)
