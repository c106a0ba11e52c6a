# The two commands of the README: `make lab` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NOTEBOOK ?= notebooks/attention_explorer.ipynb
PORT ?= 8888
IP ?= 127.0.0.1
LAB_ARGS ?=
CHROMIUM ?= /usr/bin/chromium

.PHONY: lab test lint install browser clean bench-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,lab,hub]"
	# keras-hub is only a test oracle; its metadata asks for tensorflow-text,
	# which phi3lab does not need, so install it without dependencies.
	$(BIN)/pip install --quiet --no-deps "keras-hub>=0.32"
	# circuit-tracer is only a test oracle (its pruning and its graph JSON schema,
	# tests/test_attribution_graph.py); its metadata pins transformers<=4.57 and asks
	# for nnsight, which those modules do not import, so install it without dependencies.
	$(BIN)/pip install --quiet --no-deps "circuit-tracer==0.5.0"
	touch $(STAMP)

# TensorFlow and grain for keras-hub's own test helpers (tests/test_keras_hub_suite.py),
# test-time only: installed into a side folder that only that test's subprocess puts on
# PYTHONPATH, without dependencies, so the venv's numpy, jax, keras and protobuf stay
# as they are. The list adds the few of their dependencies the venv lacks.
KERAS_HUB_SUITE := $(VENV)/keras-hub-suite
KERAS_HUB_SUITE_STAMP := $(KERAS_HUB_SUITE)/.installed
KERAS_HUB_SUITE_PACKAGES := tensorflow-cpu==2.21.0 grain==0.2.18 grpcio array-record astunparse \
	flatbuffers gast google-pasta termcolor etils portpicker

$(KERAS_HUB_SUITE_STAMP): | $(STAMP)
	$(BIN)/pip install --quiet --upgrade --no-deps --target $(KERAS_HUB_SUITE) $(KERAS_HUB_SUITE_PACKAGES)
	touch $@

install: $(STAMP) $(KERAS_HUB_SUITE_STAMP)

# Debian's Chromium for the browser tests (never a browser download). Without it
# (not root, no apt-get, offline) the browser tests skip, naming this command.
browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "note: could not install chromium with apt-get; browser tests will be skipped"; \
	else echo "note: $(CHROMIUM) missing; browser tests will be skipped (run: sudo apt-get install chromium)"; fi

# JupyterLab on the front-door notebook, on $(IP):$(PORT), for whoever runs it: as
# root (containers, cloud VMs) it adds --allow-root; without a display it opens no
# browser and prints where to point one. More JupyterLab options: LAB_ARGS="...".
lab: $(STAMP)
	@token="$${JUPYTER_TOKEN:-$$($(BIN)/python -c 'import secrets; print(secrets.token_hex(24))')}"; \
	args="--ip=$(IP) --port=$(PORT) --ServerApp.port_retries=0"; \
	if [ "$$(id -u)" = 0 ]; then args="$$args --allow-root"; fi; \
	if [ "$$(uname -s)" = Linux ] && [ -z "$$DISPLAY$$WAYLAND_DISPLAY" ]; then \
		args="$$args --no-browser"; open="No display here: open this URL in a browser"; \
	else open="Opening it in your browser; or open this URL"; fi; \
	echo; echo "  JupyterLab on $(NOTEBOOK). $$open:"; \
	echo; echo "      http://127.0.0.1:$(PORT)/lab/tree/$(notdir $(NOTEBOOK))?token=$$token"; \
	echo; echo "  Ctrl-C stops it. Port $(PORT) taken? make lab PORT=8890"; echo; \
	JUPYTER_TOKEN="$$token" exec $(BIN)/jupyter lab $$args $(LAB_ARGS) $(NOTEBOOK)

lint: $(STAMP)
	$(BIN)/ruff check phi3lab tests benchmarks scripts
	$(BIN)/ruff format --check phi3lab tests benchmarks scripts

# The suite runs in a few processes (one per group of test files, then the
# notebooks), so memory that compiled programs and test models leave behind
# in one process never adds up over the whole suite. Each group runs on
# TEST_WORKERS pytest-xdist workers (whole files per worker, so a module's
# fixtures load once): most of a test is single-threaded compiling, so two
# workers keep both cores of a 2-core machine busy. The browser tests share
# one JupyterLab and run in one worker. All groups and the notebooks' kernels
# share one fresh JAX compilation cache (PHI3LAB_CACHE_DIR), removed at the
# end, so a program compiled by one group is loaded, not compiled, by the
# next. pytest's exit 5 ("no tests") in a group is not a failure.
TEST_WORKERS ?= 2
TEST_GROUPS = "tests/browser" "tests/test_[a-h]*.py" "tests/test_[i-s]*.py" "tests/test_[t-z]*.py" "--nbmake notebooks"

test: $(STAMP) $(KERAS_HUB_SUITE_STAMP) browser lint
	@status=0; cache=$$(mktemp -d -t phi3lab-test-cache-XXXXXX); \
	for group in $(TEST_GROUPS); do \
		case "$$group" in tests/browser) workers=0;; *) workers=$(TEST_WORKERS);; esac; \
		echo "== pytest $$group"; \
		PHI3LAB_CACHE_DIR=$$cache $(BIN)/python -m pytest -q -rs --timeout=900 --nbmake-timeout=300 \
			-n $$workers --dist loadfile $$group; rc=$$?; \
		if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then status=$$rc; fi; \
	done; rm -rf "$$cache"; exit $$status

# TransformerLens 4 (TransformerBridge) for the comparison rows of
# benchmarks/trace.py and benchmarks/activations.py. SAELens (a test oracle)
# pins transformer-lens<4 and brings 3.x into the venv, so 4.x goes into a side
# folder that only the benchmark processes put first on sys.path
# (benchmarks/_transformer_lens.py), without dependencies: the venv already
# holds them, and torch, numpy, jax and keras stay as they are
# (PIP_ARGS=--dry-run shows what it would install).
TRANSFORMER_LENS_4 := $(VENV)/transformer-lens-4
PIP_ARGS ?=
bench-deps: $(STAMP)
	$(BIN)/pip install $(PIP_ARGS) --quiet --upgrade --no-deps --target $(TRANSFORMER_LENS_4) "transformer-lens==4.3.*"

clean:
	rm -rf $(VENV) .pytest_cache
