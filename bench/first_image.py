"""Time to first image: whole fresh `ldm sample` processes (imports, load, first image, PNG written),
one prompt, 512 px, 50 steps, on an SD-1.5-shaped random model saved as a diffusers folder (2 GB fp16).

Processes with different --accel modes alternate (auto, none, auto, none, ...) so that the variation
between processes (file cache, clocks) falls on all modes alike; medians and ranges at the end. The
first process of all is timed apart (it writes Python's bytecode cache and warms the file cache).

    python bench/first_image.py                         # --accel auto vs none, 5 rounds
    python bench/first_image.py --modes auto,compile --rounds 3
    python bench/first_image.py --family sdxl --rounds 2     # SDXL-shaped (7 GB fp16), 1024 px
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="auto,none", help="--accel modes to alternate")
    ap.add_argument("--rounds", type=int, default=5, help="processes per mode")
    ap.add_argument("--family", default="sd15", choices=("sd15", "sdxl"),
                    help="SD-1.5-shaped (512 px) or SDXL-shaped (1024 px) random weights")
    ap.add_argument("--model", type=Path, default=None,
                    help="where the random model is saved (made if missing; default: a folder in the temp dir)")
    from common import add_out_option

    add_out_option(ap)
    return ap.parse_args()


def one(model: Path, mode: str, out: Path) -> float:
    cmd = [sys.executable, "-m", "ldm_cli", "sample", "a cat", "--model", str(model), "--seed", "1", "--out", str(out),
           "-q", "--accel", mode]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - t0


def main():
    args = parse()
    from common import Report, out_folder, save_sd15_random, save_sdxl_random

    report = Report(out_folder(args.out), "first_image")
    args.model = args.model or Path(tempfile.gettempdir()) / f"ldm-bench-{args.family}"
    (save_sdxl_random if args.family == "sdxl" else save_sd15_random)(args.model)
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        first = one(args.model, modes[0], Path(tmp))
        report.emit(dict(family=args.family, accel=modes[0], round="first process", wall_s=round(first, 2)))
        for i in range(args.rounds):
            for mode in modes:
                report.emit(dict(accel=mode, round=i + 1, wall_s=round(one(args.model, mode, Path(tmp)), 2)))
    for mode in modes:
        walls = sorted(r["wall_s"] for r in report.rows if r.get("accel") == mode and r["round"] != "first process")
        report.emit(dict(summary=mode, processes=len(walls), median_s=round(statistics.median(walls), 2),
                         min_s=walls[0], max_s=walls[-1]))
    report.table(("--accel", "processes", "median s", "range s"),
                 lambda r: [r["summary"], r["processes"], r["median_s"], f"{r['min_s']}-{r['max_s']}"]
                 if "summary" in r else None)
    report.save()


if __name__ == "__main__":
    main()
