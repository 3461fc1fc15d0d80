#!/usr/bin/env bash
# Session 5, device call 1: the compiled batch-16 U-Net's Triton kernels one by one (profiler list, and
# inductor's own per-kernel GB/s), then inductor's pointwise autotuning and horizontal fusion. Logs under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
timeout ${1:-540} python3 bench/gpu_b8_breakdown.py --skip-attention --skip-vae --variants ${2:-base,bandwidth,pw-autotune,combo} \
  > $OUT/breakdown.log 2>&1; echo "breakdown exit $?"; grep -E "^\||^compiling|^bandwidth" $OUT/breakdown.log | cut -c1-600
for f in $OUT/bandwidth-*.txt; do [ -f "$f" ] && sort -t' ' -k1 -rn "$f" | head -3; done
grep -iE "error|Traceback" $OUT/*.log | head -5
