# Common commands. `make run` and `make test` work on a fresh machine with only Python.
.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel of torch by default; a GPU host overrides it (make TORCH_SPEC='torch==2.13.0' ...
# with its CUDA index configured in pip). Installed before the project, so the project's
# own `torch>=2.4` is already satisfied and never resolves a multi-GB CUDA build here.
TORCH_SPEC ?= torch==2.13.0
LOCAL_WHEELS := $(wildcard /opt/wheels)
PIP_LOCAL := $(if $(LOCAL_WHEELS),--find-links $(LOCAL_WHEELS),)

.PHONY: help install run test test-unit test-integration lint fmt migrate bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

# Also installs the example model plugin (docs/models.md): the tests exercise its entry point.
$(VENV)/.installed: pyproject.toml examples/kiln-plugin-resnet/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_LOCAL) "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(PIP_LOCAL) -e '.[dev,text]'
	$(PY) -m pip install -q $(PIP_LOCAL) --no-deps -e examples/kiln-plugin-resnet
	touch $@

install: $(VENV)/.installed ## Create .venv and install Kiln with its dev tools

run: install ## Run web, worker(s) and scheduler in the foreground (Ctrl-C stops all)
	$(VENV)/bin/kiln run

test: install ## Run the whole test suite (unit and integration)
	$(VENV)/bin/pytest

test-unit: install ## Run the tests that need no server
	$(VENV)/bin/pytest tests/unit

test-integration: install ## Run the tests against real Redis, PostgreSQL and workers
	$(VENV)/bin/pytest tests/integration

lint: install ## ruff check and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: install ## Format and autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

migrate: install ## Upgrade the database to the latest schema
	$(VENV)/bin/kiln migrate

bench: install ## Run the benchmarks (prints ratios; needs a Redis at KILN_REDIS_URL)
	$(PY) bench/queue_overhead.py

clean: ## Remove the virtualenv and local data
	rm -rf $(VENV) var
