# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install browser clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	rm -rf runs/demo
	$(BIN)/sela train --out runs/demo

# The HTML report's test renders it in headless Chromium. Installed here (Debian's package, as root) so that
# the test runs instead of skipping on a fresh machine; quick and silent when a browser is already there.
browser:
	@if (command -v chromium || command -v chromium-browser || command -v google-chrome) >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium for the HTML report test (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null \
	    || echo "note: installing chromium failed; the browser test skips (and fails when CI=true)"; \
	else echo "note: no chromium and no root apt-get; the browser test skips (and fails when CI=true)"; fi

test: install browser
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
