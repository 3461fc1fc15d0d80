#!/usr/bin/env bash
# Session 3, device call 4: time to first image of fresh `ldm sample` processes (SD-1.5-sized, 512 px,
# 50 steps), with Python's bytecode cache allowed (the device sets PYTHONDONTWRITEBYTECODE=1, so every
# process there recompiles the sources of torch's and diffusers' imported modules; a pip install has
# them compiled). Logs under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LDM_CACHE_DIR=/tmp/ldm-cache
python3 bench/make_sd15_random.py /tmp/sd15 > $OUT/make.log 2>&1
cli() {  # label, then extra options
  local label=$1; shift
  s=$(date +%s%N); python3 -m ldm_cli sample "a cat" --model /tmp/sd15 --seed 1 --out /tmp/o -q "$@"; e=$(date +%s%N)
  echo "{\"cli\": \"$label\", \"wall_ms\": $(( (e - s) / 1000000 ))}" | tee -a $OUT/cli.txt
}
cli "defaults, PYTHONDONTWRITEBYTECODE=1 (device default)"
unset PYTHONDONTWRITEBYTECODE
cli "defaults, bytecode cache on, process 1 (writes the cache)"
cli "defaults, bytecode cache on, process 2"
cli "defaults, bytecode cache on, process 3"
cli "--accel none, bytecode cache on" --accel none
cli "--accel none, bytecode cache on, again" --accel none
cli "defaults, bytecode cache on, process 4"
python3 bench/ttfi_phases.py /tmp/sd15 auto 2>&1 | grep "^{" | tee -a $OUT/phases.txt
python3 bench/ttfi_phases.py /tmp/sd15 none 2>&1 | grep "^{" | tee -a $OUT/phases.txt
