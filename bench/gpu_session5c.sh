#!/usr/bin/env bash
# Session 5, device call 6 (the last of the budget): the ChannelsLastGroupNorm experiment (in gpu_b8_breakdown.py), batch-16 U-Net (with the
# concatenation pass; its baseline is results/s5-4's cl-cat row) and the batch-8 VAE
# decoder (nn.GroupNorm, then ChannelsLastGroupNorm). Most important first: a cut-off run keeps what it printed.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
timeout ${1:-400} python3 bench/gpu_b8_breakdown.py --skip-attention --calls 10 --variants ${2:-cl-cat+cl-gn} \
  --vae-variants ${3:-base,cl-gn} > $OUT/breakdown.log 2>&1; echo "breakdown exit $?"
grep -E "^\{\"(variant|vae)" $OUT/breakdown.log | cut -c1-330
