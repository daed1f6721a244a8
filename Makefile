# The two set-up commands of the README: `make run` and `make test`. Both create the virtualenv on demand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint bench bench-peers clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/rr-dev

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m bench.overhead

# LiteLLM's proxy and Portkey's gateway into bench/.peers/ (idempotent), for `bench.overhead --peers ...`.
bench-peers: $(STAMP)
	$(BIN)/python -m bench.peers setup

clean:
	rm -rf $(VENV) .data .pytest_cache .ruff_cache
