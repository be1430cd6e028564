# make run: the server with embedded defaults (no Redis, dev sign-in) on http://127.0.0.1:3020/
# make test: the whole suite; installs Debian's redis-server, nginx and chromium first when
#   missing (scripts/install-test-deps.sh, the step .ci/run uses too), then starts its own
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-deps lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[fast,test,dev]'
	touch $(STAMP)

run: $(STAMP)
	CHAT_COOKIE_SECURE=0 $(BIN)/chatserver

# The tests drive real redis-server, nginx and chromium processes.
test-deps:
	PY=$(PY) scripts/install-test-deps.sh

test: test-deps $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check chatserver tests
	$(BIN)/mypy

bench: $(STAMP)
	bench/run.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache tests/output
