# The two commands of the README: `make lab` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NOTEBOOK ?= notebooks/attention_explorer.ipynb

.PHONY: lab test install browser clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,lab,hub]"
	# keras-hub is only a test oracle; its metadata asks for tensorflow-text,
	# which phi3lab does not need, so install it without dependencies.
	$(BIN)/pip install --quiet --no-deps "keras-hub>=0.32"
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium for the browser tests (never a browser download).
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "note: /usr/bin/chromium missing; browser tests will be skipped (run: sudo apt-get install chromium)"; fi

lab: $(STAMP)
	$(BIN)/jupyter lab $(NOTEBOOK)

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -rs --timeout=900 tests --nbmake notebooks --nbmake-timeout=300; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) .pytest_cache
