# The two commands: `make run` (the main job) and `make test` (lint, types, tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,fisher]'
	touch $(STAMP)

SAMPLE := examples/fisher/data/two_speakers

run: $(STAMP)
	$(BIN)/python -m examples.fisher diarize $(SAMPLE).wav --reference $(SAMPLE).rttm

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/pytest bench -o python_files="bench_*.py" -o addopts="" -o testpaths=bench --benchmark-only --benchmark-columns=median,iqr,rounds -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
