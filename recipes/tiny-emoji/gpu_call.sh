#!/usr/bin/env bash
# How the embedded model was built on the GPU machine (one device call; no network there):
#   carry .whl (diffusers, typer, ... for Python 3.12) and .data/emoji.npz (from make_dataset.py).
#   bash recipes/tiny-emoji/gpu_call.sh UNET_SECONDS
# Returns under $OUT: the fp16 model folder as tar parts, metrics and the validation grids.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
W=/tmp/emoji && mkdir -p $W && cp .data/emoji.npz $W/
timeout 530 bash recipes/tiny-emoji/run.sh $W "${1:-300}" > $OUT/recipe.log 2>&1; grep -v -i "warn\|Writing model\|Loading weights" $OUT/recipe.log | tail -40
tar cf - -C $W embedded | split -b 15M - $OUT/embedded.tar.part-
cp $W/vae/metrics.json $OUT/vae-metrics.json; cp $W/clip/metrics.json $OUT/clip-metrics.json
cp $W/unet-run/log.jsonl $OUT/unet-log.jsonl
ls $W/unet-run/validation | tail -1 | xargs -I{} cp $W/unet-run/validation/{} $OUT/validation-last.png
ls -la $OUT
