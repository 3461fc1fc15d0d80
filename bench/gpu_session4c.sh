#!/usr/bin/env bash
# Session 4, device call 4: which attention kernel PyTorch picks (bench/gpu_attn_check.py), then the
# compiled batch-16 U-Net as ldm compiles it vs inductor's matmul autotuning (gpu_b8_breakdown.py). Logs under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
timeout 100 python3 bench/gpu_attn_check.py > $OUT/attn_check.log 2>&1; echo "attn_check exit $?"
grep -E "^\{" $OUT/attn_check.log | cut -c1-400
timeout ${1:-420} python3 bench/gpu_b8_breakdown.py --skip-attention --skip-vae --variants ${2:-base,autotune-mm} \
  > $OUT/breakdown.log 2>&1; echo "breakdown exit $?"; grep -E "^\{|^\||^compiling" $OUT/breakdown.log | cut -c1-1200
grep -iE "error|Traceback" $OUT/*.log | head -5
