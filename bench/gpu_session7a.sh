#!/usr/bin/env bash
# Session 7, device call 2: the head-dim-40 attention kernel with 48-wide tiles, ftz exp2, polynomial exp2, pipelining.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD  # bench/gpu_b8_breakdown.py's cuda_ms imports ldm_cli (no diffusers needed)
timeout ${1:-300} python3 bench/gpu_attention_split.py > $OUT/attention_split.log 2>&1
echo "exit $?"; grep -E "^\||Error" $OUT/attention_split.log | head -40
