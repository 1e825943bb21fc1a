# chatproxy: `make run` serves the demo, `make test` runs the whole suite. Both work on a fresh clone.
PYTHON ?= python3.11
VENV := .venv
LEGACY_VENV := .venv-legacy
PY := $(VENV)/bin/python
LEGACY_PY := $(LEGACY_VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
SIM_PORT ?= 8001

.PHONY: run test test-current test-legacy test-js lint bench sysdeps clean

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# The JavaScript clients tests/test_clients.py drives (the openai Node SDK, the Vercel AI SDK), as pinned.
CLIENTS_JS := tests/clients
$(CLIENTS_JS)/node_modules/.installed: $(CLIENTS_JS)/package.json $(CLIENTS_JS)/package-lock.json
	cd $(CLIENTS_JS) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(LEGACY_VENV)/.installed: requirements-legacy.txt pyproject.toml
	test -x $(LEGACY_PY) || $(PYTHON) -m venv $(LEGACY_VENV)
	$(LEGACY_PY) -m pip install --quiet --upgrade pip
	$(LEGACY_PY) -m pip install --quiet -r requirements-legacy.txt
	$(LEGACY_PY) -m pip install --quiet --no-deps -e .
	touch $@

# The demo: with no OPENAI_API_KEY the built-in simulator is the upstream, over real HTTP.
run: $(VENV)/.installed
	$(PY) manage.py migrate --noinput
	$(PY) -m project.demo --host $(HOST) --port $(PORT) --simulator-port $(SIM_PORT)

sysdeps:
	bash scripts/ensure-debian-packages.sh

test: $(VENV)/.installed $(LEGACY_VENV)/.installed sysdeps
	$(MAKE) lint
	$(MAKE) test-current
	$(MAKE) test-legacy
	$(MAKE) test-js

test-current: $(VENV)/.installed $(CLIENTS_JS)/node_modules/.installed
	$(PY) -m pytest -q

# The upstream-facing tests again, with openai 0.27.x instead of the current SDK.
test-legacy: $(LEGACY_VENV)/.installed
	$(LEGACY_PY) -m pytest -q -m upstream

test-js:
	node --test tests/js/

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Benchmarks (not part of `make test`; ~12 min on a fresh clone): tables and a plot in bench/results/ (bench/README.md).
# `make bench BENCH_ARGS=--quick` is a ~2.5 min smoke run.
bench: $(VENV)/.installed $(LEGACY_VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-bench.txt
	$(PY) -m bench --legacy-python $(LEGACY_PY) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(LEGACY_VENV) .pytest_cache .mypy_cache .ruff_cache
