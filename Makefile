# `make install && make test` is the whole set-up; .ci/run runs exactly these two.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the tested versions (constraints.txt says how to move them); CONSTRAINTS= installs the newest instead
CONSTRAINTS ?= constraints.txt

.PHONY: install test lint clean embedded-model

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

test:
	# One torch thread per pytest worker: two workers x two threads on two cores thrash. worksteal and the
	# slow tests collected first (tests/conftest.py) keep both workers busy to the end.
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist worksteal tests

lint:
	$(BIN)/ruff check ldm_cli tests bench

clean:
	rm -rf $(VENV) .pytest_cache

# The embedded model, rebuilt from scratch: the data needs npm (the registry), the training a CUDA GPU.
# The settings are the shipped model's run (README, "The embedded model"): its U-Net stopped 730 s after its
# start (latent cache, compile, then 594 s of steps on an H100); 800 s here.
# The new folder replaces ldm_cli/embedded only once it is whole (copied beside it, then renamed).
EMBED_WORK ?= /tmp/ldm-embedded
EMBED_SETTINGS ?= MORE_WEARERS=1 SCENES_PER_KIND=20000 SINGLE_BACKGROUNDS=6 BATCH=1024 LR=3e-4 VAE_SECONDS=60 \
  CLIP_SECONDS=60
embedded-model:
	mkdir -p $(EMBED_WORK)
	$(BIN)/python recipes/tiny-emoji/make_dataset.py $(EMBED_WORK)
	PATH=$(CURDIR)/$(BIN):$$PATH $(EMBED_SETTINGS) bash recipes/tiny-emoji/run.sh $(EMBED_WORK) 800
	rm -rf ldm_cli/embedded.new ldm_cli/embedded.old && cp -r $(EMBED_WORK)/embedded ldm_cli/embedded.new
	mv ldm_cli/embedded ldm_cli/embedded.old && mv ldm_cli/embedded.new ldm_cli/embedded && rm -rf ldm_cli/embedded.old
