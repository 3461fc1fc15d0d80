#!/usr/bin/env bash
# Session 7 (run in session 8, from gpu_session8a.sh): item 3's "defaults must not make a one-image run slower than the
# uncompiled path", with the processes alternating (auto, none, auto, none, ...) so that the variation in
# load time between processes (6.1-8.5 s in results/s7-3) falls on both alike; medians at the end.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LDM_CACHE_DIR=/tmp/ldm-cache
unset PYTHONDONTWRITEBYTECODE  # a user's Python keeps its bytecode cache (see results/s3-4)
[ -d /tmp/sd15 ] || python3 bench/make_sd15_random.py /tmp/sd15 > $OUT/make.log 2>&1
python3 -m ldm_cli sample "a cat" --model /tmp/sd15 --seed 1 --out /tmp/o -q  # first-ever: writes the bytecode cache
for i in 1 2 3 4 5; do
  for mode in auto none; do
    s=$(date +%s%N); python3 -m ldm_cli sample "a cat" --model /tmp/sd15 --seed 1 --out /tmp/o -q --accel $mode; e=$(date +%s%N)
    echo "{\"accel\": \"$mode\", \"round\": $i, \"wall_s\": $(( (e - s) / 1000000 ))e-3}" | tee -a $OUT/ttfi.jsonl
  done
done
python3 - $OUT/ttfi.jsonl <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for mode in ("auto", "none"):
    walls = sorted(r["wall_s"] for r in rows if r["accel"] == mode)
    print(f"| {mode} | {len(walls)} | {statistics.median(walls):.2f} | {walls[0]:.2f}-{walls[-1]:.2f} |")
PY
