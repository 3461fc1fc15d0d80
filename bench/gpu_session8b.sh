#!/usr/bin/env bash
# Session 8, device call 2: the projections that share an input run as one matmul each
# (accel.group_shared_input_projections), against the same call without it, one process per mode:
# graphed U-Net call at batch 2 (batch 1 with guidance) and 16, eager (ldm's default) and compiled (batch 2).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
ab() { python3 bench/gpu_streams.py --skip-head-dims --base "first self-attention shared" --runners "+ projections grouped" \
  --rounds 5 "$@"; }
timeout 90 bash -c "$(declare -f ab); ab --modes eager --batches 2,16" > $OUT/groups-eager.log 2>&1; echo "eager exit $?"
timeout ${1:-250} bash -c "$(declare -f ab); ab --modes compile --batches 2" > $OUT/groups-compile.log 2>&1; echo "compile exit $?"
grep -hE "^\| (eager|compile)|projection_groups" $OUT/groups-*.log
grep -iE "error|Traceback" $OUT/*.log | head -5
