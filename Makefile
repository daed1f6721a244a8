# The two set-up commands of the README: `make run` and `make test`. Both create the virtualenv on demand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test test-calendar lint bench bench-peers clean

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

# The calendar-dependent tests (@pytest.mark.calendar) again, with the clock at the last seconds of a month
# and of a year: a partition, retention or usage window computed from the wrong month fails here. CI runs it
# after `make test`.
CALENDAR_CLOCKS ?= 2027-01-31T23:59:58Z 2026-12-31T23:59:58Z
test-calendar: $(STAMP)
	@for clock in $(CALENDAR_CLOCKS); do \
		echo "== calendar tests at $$clock"; \
		RR_TEST_FROZEN_CLOCK=$$clock $(BIN)/python -m pytest -m calendar -q || exit 1; \
	done

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m bench.overhead

# LiteLLM's proxy and Portkey's gateway into bench/.peers/ (idempotent), for `bench.overhead --peers ...`.
bench-peers: $(STAMP)
	$(BIN)/python -m bench.peers setup

clean:
	rm -rf $(VENV) .data .pytest_cache .ruff_cache
