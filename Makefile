# The two commands the README opens with bootstrap .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint typecheck pytest chaos bench soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[server,postgres,dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/syncengine run

lint: $(STAMP)
	$(VENV)/bin/ruff check syncengine tests bench
	$(VENV)/bin/ruff format --check syncengine tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test: lint typecheck pytest

chaos: $(STAMP)
	$(VENV)/bin/syncengine scenario run scenarios/*.toml --seeds 20

# Long runs, outside `make test`: the real-process runs marked slow (two shipped scenarios
# with real processes, four PostgreSQL-backed servers with kills), then 100 more seeds of
# every scenario (about an hour on 2 cores).
soak: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m slow
	$(VENV)/bin/syncengine scenario run scenarios/*.toml --seed 1000 --seeds 100

bench: $(STAMP)
	$(VENV)/bin/syncengine bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
