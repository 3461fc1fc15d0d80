#!/usr/bin/env bash
# Session 6, device call 3: our Triton attention kernel (fp16 exp2, ones column) vs SDPA/cuDNN at SD-1.5's shapes.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD  # bench/gpu_b8_breakdown.py's cuda_ms imports ldm_cli (no diffusers needed)
timeout ${1:-300} python3 bench/gpu_attention_kernel.py > $OUT/attention_kernel.log 2>&1
echo "exit $?"; grep -E "^\||Error" $OUT/attention_kernel.log | head -40
