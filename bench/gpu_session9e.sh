#!/usr/bin/env bash
# Session 9, device call 5: is the compiled diffusers anchor power-capped at batch 8 too? Each of the two
# (anchor, ldm compile) in its own process at batch 8, nvidia-smi sampling clock and power every 100 ms;
# the samples drawing over 500 W (the denoising loop) summarized per process.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
for mode in diffusers-compile compile; do
  nvidia-smi --query-gpu=clocks.sm,power.draw,clocks_event_reasons.active --format=csv,noheader,nounits -lms 100 \
    > $OUT/smi-$mode.csv 2>&1 &
  smi=$!
  timeout ${1:-250} python3 bench/gpu_sample.py --modes $mode --batches 8 --reps 3 > $OUT/sample-$mode.log 2>&1
  echo "$mode exit $?"; kill $smi
  python3 - $OUT/smi-$mode.csv $mode <<'PY'
import statistics, sys
rows = [[float(v) if i < 2 else v.strip() for i, v in enumerate(l.split(","))] for l in open(sys.argv[1]) if l[0].isdigit()]
busy = [r for r in rows if r[1] > 500]
print(f"| {sys.argv[2]} | {len(busy)} of {len(rows)} | {statistics.median(r[0] for r in busy) if busy else '-'} | "
      f"{min((r[0] for r in busy), default='-')} | {statistics.median(r[1] for r in busy) if busy else '-'} | "
      f"{sorted({r[2] for r in busy})} |")
PY
  grep -E "^\| .*txt2img" $OUT/sample-$mode.log
done
grep -iE "error|Traceback" $OUT/*.log | head -5
