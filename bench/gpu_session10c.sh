#!/usr/bin/env bash
# Session 10, device call 3: the compiled VAE decoder (batch 8) and U-Net (batch 16) in NCHW with inductor's
# layout optimisation off, against channels-last as ldm compiles them (bench/gpu_b8_breakdown.py `nchw`).
# Session 10a's `nchw` VAE rows changed only the module's layout, which inductor overrides.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
timeout ${1:-330} python3 bench/gpu_b8_breakdown.py --skip-attention --variants ${2:-cl-cat,cl-cat+nchw} \
  --vae-variants base,nchw,base,nchw > $OUT/nchw.log 2>&1; echo "breakdown exit $?"
grep -hE "^\| |vae_variant" $OUT/*.log | cut -c1-330
grep -iE "error|Traceback" $OUT/*.log | head -5
