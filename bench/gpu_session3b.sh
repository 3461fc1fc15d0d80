#!/usr/bin/env bash
# Session 3, device call 2: the tuned compile at batch 1 and 8, then fresh `ldm sample` processes with
# Python's bytecode cache writable (as any pip install has it). Logs under $OUT.
# Mistake kept for the record: PYTHONPYCACHEPREFIX does not undo the device's PYTHONDONTWRITEBYTECODE=1 and
# makes Python ignore the existing __pycache__ folders, so these processes were slower (32-37 s);
# gpu_session3d.sh unsets PYTHONDONTWRITEBYTECODE instead.
python3 -c "import sys, os; print('dont_write_bytecode', sys.dont_write_bytecode, 'prefix', sys.pycache_prefix, 'torch dir writable', os.access(__import__('torch').__path__[0], os.W_OK))" | tee $OUT/env.txt
env | grep -i python | tee -a $OUT/env.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LDM_CACHE_DIR=/tmp/ldm-cache
timeout 420 python3 bench/gpu_sample.py --modes compile --batches 1,8 > $OUT/compile.log 2>&1; grep -E "^\{|^\|" $OUT/compile.log
python3 bench/make_sd15_random.py /tmp/sd15 > $OUT/make.log 2>&1
export PYTHONPYCACHEPREFIX=/tmp/pycache
for i in 1 2 3; do
  s=$(date +%s%N); python3 -m ldm_cli sample "a cat" --model /tmp/sd15 --seed 1 --out /tmp/o -q; e=$(date +%s%N)
  echo "{\"cli\": \"ldm sample (defaults), bytecode cache on, process $i\", \"wall_ms\": $(( (e - s) / 1000000 ))}" | tee -a $OUT/cli.txt
done
python3 bench/ttfi_phases.py /tmp/sd15 auto 2>&1 | tee -a $OUT/phases.txt
