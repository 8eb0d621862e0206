# latentbank: `make demo` and `make test` work on a fresh machine with only Python >= 3.11.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU hosts: the pinned CPU wheel. GPU hosts: set TORCH_SPEC (e.g. "torch>=2.10") or
# install torch into $(VENV) yourself first; any torch >= 2.10 satisfies the project.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.latentbank-installed
# A whole MLflow (server, `mlflow models serve`, onnxruntime) in a virtualenv of its own, as
# a team runs it beside latentbank: the bridge's tests start its server (tests/workers).
MLFLOW_VENV ?= .venv-mlflow
MLFLOW_STAMP := $(MLFLOW_VENV)/.installed
MLFLOW_SPEC ?= mlflow>=3,<4

.PHONY: install check test test-system lint docs bench bench-likelihood bench-mnist faults demo images compose-test clean

install: $(STAMP)

# torch first, so the project's "torch>=2.10" is already met and pip fetches no CUDA wheels.
$(STAMP): pyproject.toml clients/python/pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check -e './clients/python[pandas,progress]'
	@touch $(STAMP)

$(MLFLOW_STAMP): Makefile
	@test -x $(MLFLOW_VENV)/bin/python || $(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/python -m pip install --quiet --disable-pip-version-check "$(MLFLOW_SPEC)" onnx onnxruntime
	@touch $(MLFLOW_STAMP)

# The layer contracts (pyproject's [tool.importlinter]) and ruff first: a broken
# boundary fails the run before the suite starts. Each run gets its own temporary root
# (kept when it fails): pytest makes its shared default root private (0700) at start,
# which would cut a concurrent run's PostgreSQL (another user) off its data folder.
PYTEST := tmp=$$(mktemp -d /tmp/latentbank-test.XXXXXX) && $(PY) -m pytest --basetemp=$$tmp

# The fast lane, to run after every change: lint, then the unit tests and those against an
# in-process PostgreSQL; no whole stack (the `stack` marker: uvicorn, a worker, `latentbank
# up`, Chromium, mkdocs) and nothing `slow`.
check: lint
	$(PYTEST) -m "not system and not stack and not slow" $(PYTEST_ARGS); rc=$$?; [ $$rc -ne 0 ] || rm -rf $$tmp; exit $$rc

# Everything but the system suites: the fast lane and the whole-stack tests.
test: lint
	$(PYTEST) -m "not system" $(PYTEST_ARGS); rc=$$?; [ $$rc -ne 0 ] || rm -rf $$tmp; exit $$rc

# The suites that drive a whole stack from outside for minutes: one trial of every fault,
# the schemathesis fuzzer, the MLflow bridge against a real MLflow server (.venv-mlflow).
# .ci/run runs them after `make test`.
test-system: $(STAMP) $(MLFLOW_STAMP)
	$(PYTEST) -m system $(PYTEST_ARGS); rc=$$?; [ $$rc -ne 0 ] || rm -rf $$tmp; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check .

# The documentation site (mkdocs.yml) into out/site; the reference pages are generated from
# the code (tools/docs_hooks.py). `make test` builds it with --strict (tests/docs) and runs
# every tutorial's code against a real stack. While editing: $(VENV)/bin/mkdocs serve.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir out/site

# The full fault-injection run (about 40 minutes): the README's table of recovery figures.
faults: $(STAMP)
	$(PY) bench/faults.py $(FAULTS_ARGS)

# Each bench prints its own tables and records its goals; goals.py prints them as one.
bench: $(STAMP)
	rm -f out/bench/goals.json
	$(PY) bench/train.py $(BENCH_ARGS)
	$(PY) bench/store.py $(BENCH_ARGS)
	$(PY) bench/scale.py --rows 200000
	$(PY) bench/embed.py $(BENCH_ARGS)
	$(PY) bench/serve.py $(BENCH_ARGS)
	$(PY) bench/ingest.py $(BENCH_ARGS)
	$(PY) bench/rgb.py
	$(PY) bench/goals.py

# The likelihood studies (about 40 minutes): the trainer's defaults against the
# PyTorch-examples loop at equal epochs, and Burda et al.'s Table 1 in kind (README).
bench-likelihood: $(STAMP)
	$(PY) bench/likelihood.py $(BENCH_ARGS)
	$(PY) bench/iwae.py $(BENCH_ARGS)

# Binarised MNIST and Fashion-MNIST through the service beside the IWAE paper's Table 1
# (README, "Model quality on real data"): BENCH_MNIST_ARGS="--epochs 40" (the default;
# hours on 2 CPU cores) or "--protocol full" (3,280 epochs: a GPU worker).
bench-mnist: $(STAMP)
	$(PY) bench/mnist.py $(BENCH_MNIST_ARGS)

# The whole service on embedded defaults: `latentbank up` in the background, digits through
# the HTTP API, a summary, then the stack is stopped. DEMO_ARGS: see `latentbank demo --help`.
demo: $(STAMP)
	$(PY) -m service.cli demo $(DEMO_ARGS)

# The production topology with Docker on this machine (docker/): base images from
# debootstrap, the images built without a registry, then docker/compose.local.yml up,
# scaled, and faulted at the container level (docker/compose_test.py; about 25 minutes
# the first time, most of it building). .ci/run runs compose-test after test-system.
images:
	bash docker/images.sh

compose-test: $(STAMP)
	$(PY) docker/compose_test.py $(COMPOSE_ARGS)

clean:
	rm -rf out .pytest_cache .ruff_cache
