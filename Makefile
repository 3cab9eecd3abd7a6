# Set-up from a fresh machine with only Python 3.11: `make demo` and `make test` do everything.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or run: make PYTHON=python3 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and exactly pinned, then the project with that pin held.
	$(PIP) install --quiet $(TORCH_PIN)
	$(PIP) install --quiet -e ".[test]" $(TORCH_PIN)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hessfree demo --out results/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest

# Benchmarks against Captum and dattri (not part of the test run).
$(VENV)/.bench: $(STAMP)
	$(PIP) install --quiet -e ".[test,bench]" $(TORCH_PIN)
	touch $(VENV)/.bench

bench: $(VENV)/.bench
	$(PY) benchmarks/peers.py

clean:
	rm -rf $(VENV) results
