# The two commands: `make run` (the main job) and `make test` (lint, types, tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-ol lint typecheck pytest docs chaos bench bench-scale bench-peers clean

# The distribution was called "lampy" before (a name taken on the package index): a venv made
# then still holds it, and it would claim the same files, so it goes first.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip uninstall --quiet --yes lampy 2>/dev/null || true
	$(BIN)/pip install --quiet -e '.[dev,fisher]'
	touch $(STAMP)

SAMPLE := examples/fisher/data/two_speakers
OUT := out/fisher

# Diarize the bundled sample on the default executor, write the RTTM and PNG under $(OUT), and
# time the same run on the inline executor for comparison. More options: make run ARGS="--chunks 4".
ARGS ?=
run: $(STAMP)
	$(BIN)/python -m examples.fisher diarize $(SAMPLE).wav --reference $(SAMPLE).rttm \
		--out $(OUT) --compare-inline $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

# The OpenLambda suites alone: on `lampy worker` and on OpenLambda's own worker (built and run
# from ../shared/olreal; LAMPY_TEST_OLREAL_DIR picks its directory). More options: ARGS="-x".
test-ol: $(STAMP)
	$(BIN)/pytest -m openlambda $(ARGS)

# The API reference (pdoc) of what lampy and lampy.testing export, in build/docs/.
docs: $(STAMP)
	$(BIN)/python docs/build_api.py build/docs

# The full chaos suite: 10 seeds x 1,000 chunks under 20% mixed faults (make test runs 2 x 300).
chaos: $(STAMP)
	LAMPY_CHAOS_FULL=1 $(BIN)/pytest -m chaos tests/runtime/openlambda/test_chaos.py

BENCH := -o python_files="bench_*.py" -o addopts="" -o testpaths=bench -o faulthandler_timeout=0 --benchmark-only --benchmark-columns=median,iqr,rounds -p no:cacheprovider
bench: $(STAMP)
	$(BIN)/pytest bench $(BENCH)

# Only the scaling table (bench/bench_scale.py): rewrites its section of bench/RESULTS.md and
# keeps the others.
bench-scale: $(STAMP)
	$(BIN)/pytest bench/bench_scale.py $(BENCH)

# Peers for the comparison rows: Dask, TensorFlow and joblib in lampy's venv; pyAudioAnalysis in
# its own (it needs numpy < 2).
PAA := bench/.peers/paa
bench-peers: $(STAMP)
	$(BIN)/pip install --quiet 'dask[distributed]>=2025.1' tensorflow-cpu joblib
	$(PYTHON) -m venv $(PAA)
	$(PAA)/bin/pip install --quiet numpy==1.26.4 scipy==1.13.1 scikit-learn==1.5.2 \
		matplotlib==3.9.2 hmmlearn==0.3.3 imbalanced-learn==0.12.4 eyeD3 pydub tqdm plotly \
		simplejson pyAudioAnalysis==0.3.14

clean:
	rm -rf $(VENV) build out *.egg-info .pytest_cache .benchmarks
