#!/usr/bin/env bash
# How the embedded model is built on the GPU machine (one device call; no network there):
#   carry .whl (diffusers, typer and pydantic, ... for Python 3.12), .data/emoji.npz (from make_dataset.py) and,
#   when there is one, .data/judge.pt (judge.py, trained on a CPU beforehand; else the recipe trains it).
#   VAE_SECONDS=60 CLIP_SECONDS=60 bash recipes/tiny-emoji/gpu_call.sh UNET_SECONDS
# A call is at most 10 minutes; for a longer U-Net, a second call right after the first (the machine is
# still warm, /tmp/emoji still there) goes on from the first one's checkpoint:
#   FROM=unet bash recipes/tiny-emoji/gpu_call.sh UNET_SECONDS
# Returns under $OUT: the fp16 model folder as tar parts, metrics and the validation grids.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
W=/tmp/emoji && mkdir -p $W && cp .data/emoji.npz $W/ && { cp .data/judge.pt $W/ 2>/dev/null || true; }
timeout 530 bash recipes/tiny-emoji/run.sh $W "${1:-300}" > $OUT/recipe.log 2>&1; grep -v -i "warn\|Writing model\|Loading weights" $OUT/recipe.log | tail -40
tar cf - -C $W embedded | split -b 15M - $OUT/embedded.tar.part-
# at most 8 files come back: the tar parts (3), the log, one metrics file, two pictures
cat $W/vae/metrics.json $W/clip/metrics.json $W/embedded_judge.jsonl $W/unet-run/log.jsonl > $OUT/metrics.txt 2>/dev/null
cp $W/embedded_judge_examples.png $OUT/ 2>/dev/null
ls $W/unet-run/validation | tail -1 | xargs -I{} cp $W/unet-run/validation/{} $OUT/validation-last.png
ls -la $OUT
