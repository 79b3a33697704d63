# Every target CI and the README use. `make test` and `make demo` set up .venv on their own.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SCHEDULES ?= 50

.PHONY: help setup proto docs lint typecheck unit test faults demo bench clean

help:  ## list targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with the pinned CPU build of torch and the dev tools

proto: $(STAMP)  ## regenerate shared/gen from proto/
	$(PY) scripts/gen_proto.py

docs: $(STAMP)  ## regenerate docs/configuration.md from the settings declarations
	$(PY) scripts/gen_config_docs.py

lint: $(STAMP)  ## ruff check and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)  ## mypy --strict over the three packages
	$(VENV)/bin/mypy

unit: $(STAMP)  ## unit tests only (fast)
	$(PY) -m pytest tests/unit -q

test: $(STAMP)  ## everything CI runs: lint, types, all tests
	$(MAKE) lint typecheck
	$(PY) -m pytest -q

faults: $(STAMP)  ## seeded fault schedules against real processes (SCHEDULES=50; root for the tmpfs)
	$(PY) -m tests.faults --schedules $(SCHEDULES)

demo: $(STAMP)  ## the online-learning loop: an agent, the inference service, a trainer
	$(VENV)/bin/python scripts/demo.py

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
