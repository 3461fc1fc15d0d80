#!/usr/bin/env bash
# Load-time check after loading straight to the GPU (device_map): phases of a fresh process, twice.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
[ -d /tmp/sd15 ] || python3 bench/make_sd15_random.py /tmp/sd15 > /dev/null 2>&1
for i in 1 2; do python3 bench/ttfi_phases.py /tmp/sd15 auto 2>&1 | grep -E "^\{|Error"; done
s=$(date +%s%N); python3 -m ldm_cli sample "a cat" --model /tmp/sd15 --seed 1 --out /tmp/o -q; e=$(date +%s%N)
echo "{\"cli\": \"ldm sample, accel auto, warm file cache\", \"wall_s\": $(( (e - s) / 1000000 ))e-3}"
