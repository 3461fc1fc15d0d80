#!/usr/bin/env bash
# Session 3, device call 3: the acceptance run for batch 1/8 and img2img: diffusers default, the compiled
# diffusers anchor and ldm --accel compile in one process, on identical weights and seeds. Logs under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LDM_CACHE_DIR=/tmp/ldm-cache
timeout 570 python3 bench/gpu_sample.py --modes diffusers,diffusers-compile,compile --batches 1,8 --img2img \
  > $OUT/acceptance.log 2>&1; grep -E "^\{|^\|" $OUT/acceptance.log
