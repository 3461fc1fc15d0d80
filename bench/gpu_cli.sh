#!/usr/bin/env bash
# Time to first image for a command-line user: fresh `ldm sample` processes with an SD-1.5-sized
# model (random weights), 512px, 50 steps, from process start to PNG. First with --accel auto
# (CUDA graphs, no disk cache), then --accel compile with an empty inductor cache (first-ever run)
# and again with that cache warm (the second invocation).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LDM_CACHE_DIR=/tmp/ldm-cache-fresh
rm -rf /tmp/ldm-cache-fresh
[ -d /tmp/sd15 ] || python3 bench/make_sd15_random.py /tmp/sd15 > /dev/null 2>&1
timeit() {  # label, then the command
  local label=$1; shift
  python3 - "$label" "$@" <<'PY'
import json, subprocess, sys, time
t0 = time.perf_counter()
r = subprocess.run([sys.executable, "-m", "ldm_cli", *sys.argv[2:]], capture_output=True, text=True)
print(json.dumps({"cli": sys.argv[1], "rc": r.returncode, "wall_s": round(time.perf_counter() - t0, 2),
                  "stderr_tail": r.stderr.strip().splitlines()[-1:] }), flush=True)
PY
}
for i in 1 2; do timeit "accel auto (graphs), process $i" sample "a cat" --model /tmp/sd15 --seed 1 --out /tmp/o -q; done
for i in 1 2; do timeit "accel compile, process $i" sample "a cat" --model /tmp/sd15 --seed 1 --out /tmp/o -q --accel compile; done
timeit "accel none, one image" sample "a cat" --model /tmp/sd15 --seed 1 --out /tmp/o -q --accel none
python3 bench/ttfi_phases.py /tmp/sd15 auto 2>&1 | grep "^{"
ls /tmp/o | head
