# Set-up is part of every target: a fresh Debian machine needs nothing but python3 and make.
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARGS ?=

.PHONY: setup data browser run test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: it takes the local CPU wheel, so nothing later pulls CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

# Debian's Chromium for the MLflow UI test (Playwright drives it; its own browser download cannot work here).
browser: $(CHROMIUM)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq chromium

run: setup data
	$(PY) -m pipeline run $(ARGS)

test: setup data browser
	$(PY) -m pytest -q tests

bench: setup data
	$(PY) -m benchmarks.syncbn
	$(PY) -m benchmarks.normalize
	$(PY) -m benchmarks.parquet_io
	$(PY) -m benchmarks.progress_cost
	$(PY) -m benchmarks.pipeline_vs_ddp
	$(PY) -m benchmarks.train_start
	$(PY) -m benchmarks.search

clean:
	rm -rf runs mlflow.db mlartifacts test-artifacts
