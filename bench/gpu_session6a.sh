#!/usr/bin/env bash
# Session 6, device call 1: the U-Net call as concurrent half-batches on CUDA streams inside one CUDA graph
# (bench/gpu_streams.py), eager (ldm's default on CUDA) and compiled, batch 16 and 2; SDPA over head dims.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
timeout ${1:-540} python3 bench/gpu_streams.py --modes ${2:-eager,compile} --batches ${3:-16,2} > $OUT/streams.log 2>&1
echo "streams exit $?"; grep -E "^\||first call|Error|error" $OUT/streams.log | head -60
