# `make run` runs the main job on its embedded default (local folder store, local worker
# processes, the shipped model); `make test` runs the whole test suite. Both create or
# reuse the virtual environment in .venv and install the project into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cai-installed

.PHONY: run test install bench clean-runs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==26.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m cai_helpers $(RUN_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m cai_helpers.bench $(BENCH_ARGS)

clean-runs:
	rm -rf runs data/store
