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

# The demo records its exchanges in the working tree (an empty
# EXCHANGE_LOG_URL turns that off; any other value replaces it) and logs
# readable lines when run at a terminal.
run: $(RUNTIME_STAMP)
	EXCHANGE_LOG_URL="$${EXCHANGE_LOG_URL-sqlite:///.gateway/exchanges.db}" LOG_FORMAT="$${LOG_FORMAT-auto}" $(BIN)/python -m gateway

# The browser client's unit tests run on node; without node `make test` fails
# rather than pass with a part untested. Under CI=true a skipped or todo
# node test fails the run too, as a skipped pytest test does (tests/ci_skips.py).
JS_TAP := $(VENV)/js-tests.tap

test: $(STAMP)
	$(BIN)/python -m pytest -q
	@command -v node >/dev/null 2>&1 || { echo "make test: node not found;" \
	    "install Node.js >= 18 (Debian: nodejs) to run tests/js" >&2; exit 1; }
	@node --test --test-reporter=tap tests/js/ > $(JS_TAP); status=$$?; cat $(JS_TAP); \
	    test $$status -eq 0 || exit $$status; \
	    case "$$CI" in true|TRUE|True|1|yes) \
	        if grep -Eq '^# (skipped|todo) [1-9]' $(JS_TAP); then \
	            echo "make test: node tests skipped under CI=true" >&2; exit 1; fi;; \
	    esac

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy gateway actors

ttft: $(RUNTIME_STAMP)
	$(BIN)/python -m gateway.suite $(if $(TARGET),--target $(TARGET),) $(TTFT_ARGS)

bench: $(STAMP)
	$(BIN)/python -m tests.perf $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
