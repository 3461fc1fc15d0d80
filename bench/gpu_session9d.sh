#!/usr/bin/env bash
# Session 9, device call 4: SM clock, power and throttle reasons under the compiled U-Net's sustained load
# at batch 16 and 2, with the profiler's kernel sums cold and hot (bench/gpu_clocks.py).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
nvidia-smi -q -d CLOCK,POWER,PERFORMANCE > $OUT/nvidia-smi-q.txt 2>&1
timeout ${1:-400} python3 bench/gpu_clocks.py > $OUT/clocks.log 2>&1; echo "clocks exit $?"
grep -E "^\||first call" $OUT/clocks.log
grep -iE "error|Traceback" $OUT/clocks.log | head -5
