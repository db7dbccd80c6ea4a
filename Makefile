# Two entry points for a fresh machine: `make demo` and `make test`. Each installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export UV_COMPILE_BYTECODE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export PAYLATER_HOME ?= $(CURDIR)/var

.PHONY: install postgres demo test lint fmt bench lock clean

$(BIN)/.installed: pyproject.toml requirements.lock
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	uv venv --quiet --allow-existing -p 3.11 $(VENV)
	uv pip install --quiet -p $(BIN)/python -r requirements.lock
	uv pip install --quiet -p $(BIN)/python --no-deps -e .
	@touch $@

install: $(BIN)/.installed

# A real PostgreSQL server from Debian's packages, started when none runs.
postgres:
	@bash scripts/ensure_postgres.sh

lock:
	uv pip compile pyproject.toml --extra dev -p 3.11 --no-header --no-annotate -o requirements.lock

demo: install
	@bash scripts/demo.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy paylater flows tasks registry bentos worker datagen tests bench

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Two pytest-xdist workers, each running whole test files (a file's servers start once): the
# suite waits on subprocesses and servers as much as it computes, so two workers on two cores take
# about half the serial time (9:00 against 16:56 in one run each, 2026-11-29); a third worker
# gained nothing (8:52).
# PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2

test: install postgres
	@bash scripts/ensure_test_tools.sh
	$(MAKE) --no-print-directory lint
	source var/postgres.env && $(BIN)/pytest -q -p no:cacheprovider --durations=20 \
		-n $(PYTEST_WORKERS) --dist loadfile tests

bench: install postgres
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
	source var/postgres.env && $(BIN)/python -m bench

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache
