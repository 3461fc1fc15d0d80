#!/usr/bin/env bash
# One device call: CLI time to first image (graphs, default), graphs NCHW bench, compile cold bench.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cat > /tmp/ldm <<'PY'
#!/usr/bin/env python3
from ldm_cli.cli import main
main()
PY
chmod +x /tmp/ldm
python3 bench/make_sd15_random.py /tmp/sd15 2>&1 | grep -v Warn | tail -2
for i in 1 2; do
  s=$(date +%s.%N); /tmp/ldm sample "a cat" --model /tmp/sd15 --seed 1 --out /tmp/o -q; e=$(date +%s.%N)
  echo "{\"cli\": \"ldm sample (accel auto = graphs), process $i\", \"wall_s\": $(echo "$e - $s" | bc)}"
done
ls /tmp/o
python3 bench/gpu_sample.py --modes graphs --batches 1,8 2>&1 | grep -E '^\{|^\|'
python3 bench/gpu_sample.py --modes compile --batches 1,8 2>&1 | grep -E '^\{|^\|'
