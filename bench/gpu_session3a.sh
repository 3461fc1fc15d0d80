#!/usr/bin/env bash
# Session 3, device call 1: where loading spends its time, fresh `ldm sample` processes, tiled decode
# at 1024 px, and the tuned compile at batch 1. Logs under $OUT.
# LDM_FAST_LOAD switched a loader of our own that this call measured as no faster; it was removed after
# it, so today both settings run the same diffusers loading.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LDM_CACHE_DIR=/tmp/ldm-cache
python3 bench/make_sd15_random.py /tmp/sd15 > $OUT/make.log 2>&1
for i in 1 2 3; do
  s=$(date +%s%N); python3 -m ldm_cli sample "a cat" --model /tmp/sd15 --seed 1 --out /tmp/o -q; e=$(date +%s%N)
  echo "{\"cli\": \"ldm sample (defaults), process $i\", \"wall_ms\": $(( (e - s) / 1000000 ))}" | tee -a $OUT/cli.txt
done
s=$(date +%s%N); LDM_FAST_LOAD=0 python3 -m ldm_cli sample "a cat" --model /tmp/sd15 --seed 1 --out /tmp/o -q; e=$(date +%s%N)
echo "{\"cli\": \"ldm sample LDM_FAST_LOAD=0\", \"wall_ms\": $(( (e - s) / 1000000 ))}" | tee -a $OUT/cli.txt
for fl in 1 0 1 0; do LDM_FAST_LOAD=$fl python3 bench/ttfi_phases.py /tmp/sd15 auto 2>&1 | sed "s/^/fast_load=$fl /" | tee -a $OUT/phases.txt; done
LDM_FAST_LOAD=0 python3 bench/profile_load.py /tmp/sd15 > $OUT/load-profile-from_pretrained.txt 2>&1
python3 bench/profile_load.py /tmp/sd15 > $OUT/load-profile-fast.txt 2>&1
grep "^load" $OUT/load-profile-*.txt
timeout 150 python3 bench/gpu_tiled.py > $OUT/tiled.log 2>&1; grep "^{" $OUT/tiled.log
timeout 240 python3 bench/gpu_sample.py --modes compile --batches 1 > $OUT/compile-b1.log 2>&1; grep -E "^\{|^\|" $OUT/compile-b1.log
