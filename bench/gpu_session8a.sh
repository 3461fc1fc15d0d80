#!/usr/bin/env bash
# Session 8, device call 1: (1) where a batch-1 (U-Net batch 2) compiled call's time goes: kernels by kind,
# how many, their sum vs the graphed call (the gaps); (2) bench/gpu_session7b.sh: time to first image,
# --accel auto and none processes alternating. Logs under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
timeout ${1:-240} python3 bench/gpu_b8_breakdown.py --skip-attention --skip-vae --batch 2 --variants ${2:-cl-cat} \
  > $OUT/breakdown-b2.log 2>&1; echo "breakdown exit $?"; grep -E "^\||^compiling" $OUT/breakdown-b2.log | cut -c1-600
bash bench/gpu_session7b.sh
grep -iE "error|Traceback" $OUT/*.log | head -5
