# Everything runs from .venv, built from setup.cfg, so a fresh clone needs
# nothing but python3. Two stamps: the runtime (the package and its `fast`
# extra: what `make run` and `make ttft` need) and, on top of it, the test
# and dev tools (pytest, playwright, mypy, py-spy: what `make test`, `make
# lint` and `make bench` need). `make install` builds the whole of it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed

.PHONY: install run test lint ttft bench clean

install: $(STAMP)

$(RUNTIME_STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[fast]'
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP)
	$(BIN)/pip install --quiet -e '.[test,dev,fast]'
	touch $(STAMP)

run: $(RUNTIME_STAMP)
	$(BIN)/python -m gateway

test: $(STAMP)
	$(BIN)/python -m pytest -q
	@if command -v node >/dev/null 2>&1; then node --test tests/js/; \
	else echo "node not found: the browser client's unit tests (tests/js) did not run"; fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy gateway actors

ttft: $(RUNTIME_STAMP)
	$(BIN)/python -m gateway.suite $(if $(TARGET),--target $(TARGET),)

bench: $(STAMP)
	$(BIN)/python -m tests.perf $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
