#!/usr/bin/env bash
# Session 4, device call 2: the acceptance run (as gpu_session3c.sh) with cuDNN attention in ldm's path:
# diffusers default, the compiled diffusers anchor and ldm --accel compile in one process. Logs under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LDM_CACHE_DIR=/tmp/ldm-cache
timeout ${1:-570} python3 bench/gpu_sample.py --modes ${2:-diffusers,diffusers-compile,compile} --batches ${3:-1,8} --img2img \
  > $OUT/acceptance.log 2>&1; echo "exit $?"; grep -E "^\{|^\|" $OUT/acceptance.log; grep -iE "error" $OUT/acceptance.log | head -5
