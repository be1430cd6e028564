# make run: the server with embedded defaults (no Redis, dev sign-in) on http://127.0.0.1:3020/
# make test: the whole suite (starts its own redis-server, nginx and chromium; see .ci/run)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[fast,test,dev]'
	touch $(STAMP)

run: $(STAMP)
	CHAT_COOKIE_SECURE=0 $(BIN)/chatserver

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check chatserver tests
	$(BIN)/mypy

bench: $(STAMP)
	bench/run.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache tests/output
