# `make install && make test` is the whole set-up; .ci/run runs exactly these two.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test lint clean embedded-model

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

# The embedded model, rebuilt from scratch: the data needs npm (the registry), the training a CUDA GPU.
EMBED_WORK ?= /tmp/ldm-embedded
embedded-model:
	mkdir -p $(EMBED_WORK)
	$(BIN)/python recipes/tiny-emoji/make_dataset.py $(EMBED_WORK)
	PATH=$(CURDIR)/$(BIN):$$PATH bash recipes/tiny-emoji/run.sh $(EMBED_WORK) 1800
	rm -rf ldm_cli/embedded && cp -r $(EMBED_WORK)/embedded ldm_cli/embedded
