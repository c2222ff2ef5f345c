# The two commands of the README: `make example` and `make test`.
# Each creates the virtualenv (.venv) and installs the npm packages on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup example test lint bench-smoke clean fuzz fuzz-decoders fuzz-floods

$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

setup: $(VENV)/.installed node_modules/.installed

example: setup
	$(PY) app_example.py

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest

# The long part of the reliability suite (docs/reliability.md): ~100,000 generated inputs through
# every decoder (FUZZ_EXAMPLES per target), then floods and faults against real servers.
FUZZ_EXAMPLES ?= 15000

fuzz: fuzz-decoders fuzz-floods

fuzz-decoders: setup
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_fuzz.py -q -s --timeout=0

fuzz-floods: setup
	$(PY) benchmarks/reliability.py

clean:
	rm -rf $(VENV) node_modules
