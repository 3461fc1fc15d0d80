# `make install && make test` is the whole set-up; .ci/run runs exactly these two.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test lint clean

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"

test:
	# One torch thread per pytest worker: two workers x two threads on two cores thrash.
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 tests

lint:
	$(BIN)/ruff check ldm_cli tests bench

clean:
	rm -rf $(VENV) .pytest_cache
