#!/usr/bin/env bash
# Session 5, device calls 2-4 (variants as bench/RESULTS.md lists them): the compiled batch-16 U-Net's Triton kernels one by one with inductor's generated
# code kept (gzipped, under $OUT/code), and variants of inductor's kernel generation. Logs under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
timeout ${1:-540} python3 bench/gpu_b8_breakdown.py --skip-attention --skip-vae --variants ${2:-base,cl-cat,cl-cat+pdl} \
  > $OUT/breakdown.log 2>&1; echo "breakdown exit $?"; grep -E "^\||^compiling" $OUT/breakdown.log | cut -c1-600
[ -n "$KEEP_CODE" ] && { mkdir -p $OUT/code; for f in $(find /tmp/inductor -name "*.py" -size +200k | xargs -r ls -S | head -4); do gzip -c $f > $OUT/code/$(basename $f).gz; done; }
grep -iE "error|Traceback" $OUT/*.log | head -5
