#!/usr/bin/env bash
# Session 9, device call 3: why the fused GEGLU, faster alone, made the compiled U-Net slower (kernel
# table with and without it), and two inductor settings that cut kernel launches (cooperative
# reductions, combo kernels), each as a variant of the compiled batch-16 U-Net (bench/gpu_b8_breakdown.py).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
timeout ${1:-540} python3 bench/gpu_b8_breakdown.py --skip-attention --skip-vae \
  --variants ${2:-cl-cat,cl-cat+geglu,cl-cat+coop,cl-cat+combo} > $OUT/breakdown.log 2>&1; echo "breakdown exit $?"
grep -E "^\||^compiling" $OUT/breakdown.log
grep -iE "error|Traceback" $OUT/*.log | head -5
