# Two entry points: `make train` (set up, then run the main job) and `make test` (set up, then run the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup train test test-all lint bench

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[all]"
	touch $@

setup: $(VENV)/.installed

train: setup
	$(PY) scripts/train.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow" $(ARGS)

lint: setup
	$(VENV)/bin/ruff check lightning_prune tests scripts benchmarks
	$(VENV)/bin/ruff format --check lightning_prune tests scripts benchmarks
	$(VENV)/bin/mypy lightning_prune
