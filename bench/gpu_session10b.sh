#!/usr/bin/env bash
# Session 10, device call 2: session 10a's A/B again, now that gpu_streams.py guards on module hooks
# (in 10a the "+ first ResNet shared" copy replayed the other copy's compiled graph: first call 0.1 s).
# Guidance's halves sharing the first ResNet block too vs the first self-attention only, both with the
# grouped projections, compiled, graphed U-Net call at batch 16 and 2, interleaved rounds.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
timeout ${1:-420} python3 bench/gpu_streams.py --skip-head-dims --modes compile --batches 16,2 --rounds ${2:-7} \
  --base "+ projections grouped" --runners "+ first ResNet shared" > $OUT/resnet-shared.log 2>&1; echo "streams exit $?"
grep -hE "^\| compile|first call" $OUT/*.log
grep -iE "error|Traceback" $OUT/*.log | head -5
