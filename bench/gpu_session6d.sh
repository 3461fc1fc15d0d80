#!/usr/bin/env bash
# Session 6, device call 5: guidance's halves sharing the U-Net's first self-attention (models.call_unet):
# the graphed U-Net call with and without it, same process (eager at U-Net batch 16 and 2, compiled at 16);
# then ldm compile end to end against diffusers' default (agreement, speed; the compiled anchor is left out
# for the device time).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor LDM_CACHE_DIR=/tmp/ldm-cache
timeout 60 python3 bench/gpu_streams.py --skip-head-dims --runners "first self-attention shared" --modes eager \
  --batches 16,2 > $OUT/share-eager.log 2>&1; echo "eager exit $?"
timeout ${1:-170} python3 bench/gpu_streams.py --skip-head-dims --runners "first self-attention shared" --modes compile \
  --batches 16 > $OUT/share-compile.log 2>&1; echo "compile exit $?"
grep -hE "^\| (eager|compile)" $OUT/share-*.log
timeout ${2:-230} python3 bench/gpu_sample.py --modes diffusers,compile --batches 8,1 --img2img > $OUT/e2e.log 2>&1
echo "e2e exit $?"; grep -E "^\{\"agreement|^\|" $OUT/e2e.log; grep -iE "error" $OUT/e2e.log | head -5
