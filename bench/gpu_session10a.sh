#!/usr/bin/env bash
# Session 10, device call 1: guidance's halves sharing the first ResNet block too (then models.SharedHalves, now
# gpu_streams.share_first_resnet) against session 8's code (first self-attention only), with grouped projections, compiled,
# graphed U-Net call at batch 16 and 2, 5 interleaved rounds (bench/gpu_streams.py); then the compiled
# batch-8 VAE decoder channels-last (ldm's layout) vs NCHW (bench/gpu_b8_breakdown.py).
# As run (commit 766bf97, results/s10-1) the A/B was invalid (gpu_streams.py did not yet guard on hooks) and
# `nchw` changed only the module's layout; at later commits both scripts do what session 10b/10c measured.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
timeout ${1:-380} python3 bench/gpu_streams.py --skip-head-dims --modes compile --batches 16,2 --rounds 5 \
  --base "+ projections grouped" --runners "+ first ResNet shared" > $OUT/resnet-shared.log 2>&1; echo "streams exit $?"
timeout ${2:-150} python3 bench/gpu_b8_breakdown.py --skip-attention --variants "" --vae-variants base,nchw,base,nchw \
  > $OUT/vae-layout.log 2>&1; echo "breakdown exit $?"
grep -hE "^\| compile|vae_variant" $OUT/*.log | cut -c1-400
grep -iE "error|Traceback" $OUT/*.log | head -5
