# Two entry points: `make demo` and `make test`. Both create .venv and install on first use, and are
# quick afterwards (the install stamp is refreshed only when pyproject.toml changes).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
# pytest's own -x/-k etc. can be passed with: make test PYTEST_ARGS="-k loader"
PYTEST_ARGS ?=

.PHONY: demo test lint format install browser gpu-wheels bench-data bench-train clean-data cluster-demo cluster-up cluster-down

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# The wheels `python -m pipeline.bench.gpu` needs beyond torch on a bare Python 3.12 GPU machine (README,
# "Performance"): pure Python but for pydantic-core; into .gpu-wheels/ (git-ignored).
GPU_WHEELS := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions webdataset==1.0.2 braceexpand
gpu-wheels: | $(BIN)/python
	$(BIN)/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .gpu-wheels $(GPU_WHEELS)

# Debian packages the tests need (headless Chromium for the browser test of the MLflow UI, a C++ compiler for
# torch.compile's CPU backend), installed when absent if this runs as root (as CI does); otherwise it stops at once
# with the one command to run.
SYSTEM_PACKAGES := chromium:chromium g++:g++
browser:
	@missing=""; for entry in $(SYSTEM_PACKAGES); do command -v $${entry%%:*} >/dev/null 2>&1 || missing="$$missing $${entry#*:}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "error: the tests need Debian packages:$$missing; run: sudo apt-get install -y$$missing"; exit 2; fi; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq $$missing >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $$missing; }; \
	fi

demo: $(STAMP)
	$(BIN)/imagenet-pipeline demo

test: lint browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff, configured in pyproject.toml: lint and formatting checked by `make test`; `make format` applies both.
LINTED := pipeline tests jobs
lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

format: $(STAMP)
	$(BIN)/ruff check --fix $(LINTED)
	$(BIN)/ruff format $(LINTED)

# A real 2-node Ray cluster on this machine (token auth, MLflow server), the training job submitted with
# `ray job submit`, checks, then the dashboard and MLflow UI addresses. The cluster keeps running until
# `make cluster-down`.
cluster-demo: $(STAMP)
	$(BIN)/imagenet-pipeline cluster demo

cluster-up: $(STAMP)
	$(BIN)/imagenet-pipeline cluster up

cluster-down: $(STAMP)
	$(BIN)/imagenet-pipeline cluster down

bench-data: $(STAMP)
	$(BIN)/imagenet-pipeline bench-data

bench-train: $(STAMP)
	$(BIN)/imagenet-pipeline bench-train

clean-data:
	rm -rf data/demo
