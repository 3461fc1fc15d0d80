#!/usr/bin/env bash
# Wheels for a GPU machine with no network that already has torch, transformers, accelerate and peft (the
# benches and the embedded model's recipe run there with PYTHONPATH pointing at the installed wheels):
#   bash bench/offline_wheels.sh [DIR] [PYTHON_VERSION]      # here, with pip's registry: DIR=.whl, 3.12
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl   # there
# The versions are this checkout's (.venv); typer needs pydantic (typer._adapters) and rich needs pygments.
set -euo pipefail
DIR=${1:-.whl}; PYV=${2:-3.12}
PY=${PY:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
NAMES=(diffusers typer click shellingham rich markdown-it-py mdurl pygments pydantic pydantic-core annotated-types
       typing-inspection)
SPECS=(); for n in "${NAMES[@]}"; do SPECS+=("$n==$(version "$n")"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR" "${SPECS[@]}"
ls "$DIR"
