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

test: install postgres
	@bash scripts/ensure_test_tools.sh
	$(MAKE) --no-print-directory lint
	source var/postgres.env && $(BIN)/pytest -q -p no:cacheprovider --durations=20 tests

bench: install postgres
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
	source var/postgres.env && $(BIN)/python -m bench

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache
