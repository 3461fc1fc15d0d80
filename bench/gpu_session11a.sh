#!/usr/bin/env bash
# Session 11, device call 1: two precision levers for batch 8 that earlier sessions named but never measured.
# 1) cuBLAS accumulating fp16 matmuls in fp16: the compiled, graphed U-Net call at batch 16 and 2 with and
#    without (one process, interleaved rounds), then ldm --accel compile end to end with it against
#    diffusers' default (speed and agreement).
# 2) FP8 (E4M3, per-tensor scales) weights and inputs of the U-Net's linear / linear+conv layers, simulated:
#    agreement with diffusers' default at batch 1.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor LDM_CACHE_DIR=/tmp/ldm-cache
timeout ${1:-240} python3 bench/gpu_streams.py --skip-head-dims --modes compile --batches 16,2 --rounds ${2:-5} \
  --base "+ projections grouped" --runners "+ fp16 accumulation" > $OUT/fp16acc-unet.log 2>&1; echo "streams exit $?"
timeout ${3:-200} python3 bench/gpu_sample.py --modes diffusers,compile+fp16acc --batches 1,8 \
  > $OUT/fp16acc-sample.log 2>&1; echo "fp16acc sample exit $?"
timeout ${4:-120} python3 bench/gpu_sample.py --modes diffusers,none+fp8lin,none+fp8all --batches 1 \
  > $OUT/fp8-agreement.log 2>&1; echo "fp8 sample exit $?"
grep -hE "^\| |first call" $OUT/*.log
grep -hE "agreement" $OUT/*.log
grep -iE "error|Traceback" $OUT/*.log | head -5
