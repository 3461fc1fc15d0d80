#!/usr/bin/env bash
# Session 9, device call 2: the feed-forward's GEGLU fused into its matmul (bench/gpu_geglu.py), persistent TMA kernel.
# 1. the kernel alone over SD-1.5's feed-forward shapes vs the unfused compiled path (bench/gpu_geglu.py);
# 2. the compiled U-Net, graphed, at batch 16 and 2, with and without it (the projections grouped in both).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
timeout 200 python3 bench/gpu_geglu.py > $OUT/geglu.log 2>&1; echo "geglu exit $?"
grep -E "^\|" $OUT/geglu.log; grep bf16 $OUT/geglu.log
timeout ${1:-330} python3 bench/gpu_streams.py --skip-head-dims --geglu-configs $OUT/geglu_best.json --base "+ projections grouped" --runners "+ GEGLU fused" \
  --rounds 5 --modes compile --batches 16,2 > $OUT/unet.log 2>&1; echo "unet exit $?"
grep -E "^\| compile|geglu_fused|first call" $OUT/unet.log
grep -iE "error|Traceback" $OUT/*.log | head -5
