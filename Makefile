# Two things most people want: `make demo` (set up, then fine-tune on the embedded server) and
# `make test` (set up, then run the whole suite). `make setup` is idempotent.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip

.PHONY: setup demo test bench

$(VENV)/.installed: pyproject.toml constraints.txt
	# The dashboard tests drive Debian's Chromium (Playwright never downloads a browser here).
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# constraints.txt pins torch to the CPU build on this machine; the package itself asks only torch>=2.4.
	$(PIP) install --quiet -c constraints.txt -e '.[server,dev]'
	# The official SDK 0.25.0 beside 0.38.0, for the compatibility test (same dependencies, own directory).
	$(PIP) install --quiet --no-deps --target .venv-tinker025 tinker==0.25.0
	touch $@

setup: $(VENV)/.installed

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/tinkex demo

test: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

bench: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/python bench/step_latency.py
