# Everything runs from .venv; `make install` builds it from setup.cfg, and every
# other target depends on it, so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint ttft bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev,fast]'
	touch $(STAMP)

# The demo records its exchanges in the working tree (an empty
# EXCHANGE_LOG_URL turns that off; any other value replaces it).
run: $(STAMP)
	EXCHANGE_LOG_URL="$${EXCHANGE_LOG_URL-sqlite:///.gateway/exchanges.db}" $(BIN)/python -m gateway

test: $(STAMP)
	$(BIN)/python -m pytest -q
	@if command -v node >/dev/null 2>&1; then node --test tests/js/; \
	else echo "node not found: the browser client's unit tests (tests/js) did not run"; fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy gateway actors

ttft: $(STAMP)
	$(BIN)/python -m gateway.suite $(if $(TARGET),--target $(TARGET),)

bench: $(STAMP)
	$(BIN)/python -m tests.perf $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
