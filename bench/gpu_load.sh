#!/usr/bin/env bash
# Phases of fresh processes (auto and none), then whole `ldm sample` processes, warm file cache.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
[ -d /tmp/sd15 ] || python3 bench/make_sd15_random.py /tmp/sd15 > /dev/null 2>&1
python3 -c "import time,torch; t=time.time(); open('/tmp/sd15/unet/diffusion_pytorch_model.safetensors','rb').read(); print('{\"read_unet_file_s\": %.2f}' % (time.time()-t))"
for m in auto none auto none; do python3 bench/ttfi_phases.py /tmp/sd15 $m 2>&1 | grep -E "^\{|Error"; done
for m in auto none auto none; do
  s=$(date +%s%N); python3 -m ldm_cli sample "a cat" --model /tmp/sd15 --seed 1 --out /tmp/o -q --accel $m; e=$(date +%s%N)
  echo "{\"cli\": \"ldm sample --accel $m\", \"wall_ms\": $(( (e - s) / 1000000 ))}"
done
