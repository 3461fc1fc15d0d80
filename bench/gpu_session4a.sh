#!/usr/bin/env bash
# Session 4, device call 1: where a batch-8 U-Net call's time goes (attention backends, kernel kinds,
# compile variants) -- bench/gpu_b8_breakdown.py. Logs under $OUT. results/s4-1 came from the script at commit
# 8dbc158, whose "base" and "cudnn-attn" rows both ran with flash forced; today that run is "flash,freeze+flash".
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
timeout ${1:-560} python3 bench/gpu_b8_breakdown.py --variants ${2:-flash,freeze+flash} > $OUT/breakdown.log 2>&1
echo "exit $?"; grep -E "^\{|^\|" $OUT/breakdown.log | cut -c1-1500; grep -iE "error|warn" $OUT/breakdown.log | head -5
