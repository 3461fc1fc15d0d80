"""Training throughput: `ldm train` on an SD-1.5-sized U-Net at 512px in bf16.

Runs the real CLI (one process, or `--gpus N` through accelerate's launcher) on random SD-1.5-shaped
weights (speed does not depend on values) and a generated folder of 512px captioned images, with and
without the latent cache, and prints one JSON line per run and a table:

    python bench/train_speed.py --runs nocache:1,cache:1          # one GPU
    python bench/train_speed.py --runs cache:1,cache:2            # scaling, on a 2-GPU machine
    python bench/train_speed.py --family sdxl --runs cache:1 --batch-size 4 --images 64   # SDXL at 1024px
    python bench/train_speed.py --runs cache:1,cache:1 --batch-size 32 --compile full   # cold, then warm compile

images/s is measured between logged steps (after warm-up), so start-up and cache building are apart;
first step s: from the command to ldm's "first step done" line (TORCHINDUCTOR_CACHE_DIR decides what is warm),
and where it went: before train() (imports, reading the folder), then ldm's own phases (models, data, set-up,
the first step with its compilation);
MFU = images/s x 3 x forward TFLOP / peak: SD-1.5's U-Net forward at 64x64 latents ~0.80 TFLOP; SDXL's
at 128x128 latents 6.76 TFLOP (counted by torch.utils.flop_counter.FlopCounterMode on the SDXL-shaped
U-Net of sdxl_speed.py, attention included); training = 3x forward.
"""

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PEAK_TFLOPS
from PIL import Image, ImageDraw

TRAIN_TFLOP_PER_IMAGE = {"sd15": 3 * 0.80, "sdxl": 3 * 6.76}
RESOLUTION = {"sd15": 512, "sdxl": 1024}
LOG_EVERY = 5
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle"]


def make_data(root: Path, n: int, size: int) -> None:
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        colour, back, shape = rng.choice(COLOURS), rng.choice(COLOURS), rng.choice(SHAPES)
        im = Image.new("RGB", (size, size), back)
        d = ImageDraw.Draw(im)
        x, y, r = rng.randint(100, size - 100), rng.randint(100, size - 100), rng.randint(40, 90)
        if shape == "circle":
            d.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif shape == "square":
            d.rectangle((x - r, y - r, x + r, y + r), fill=colour)
        else:
            d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
        im.save(root / f"{i:04d}.png")
        (root / f"{i:04d}.txt").write_text(f"a {colour} {shape} on a {back} background")


def first_step_phases(line: str) -> dict:
    """ldm train's first-step note split into seconds: before train() (imports, reading the folder), then
    train()'s own phases (models, data, set-up, the first step with its compilation)."""
    since = [float(x) for x in re.findall(r"([0-9.]+) s after the", line)]  # the start, the command
    phases = {name.replace("the ", "").replace("-", "_"): float(x)
              for name, x in re.findall(r"(models|data|set-up|the step) ([0-9.]+) s", line)}
    return {"before_train": round(since[1] - since[0], 1), **phases} if len(since) == 2 else phases


def run(ldm: list[str], data: Path, model: Path, out: Path, cache: bool, gpus: int, args) -> dict:
    cmd = [*ldm, "train", str(data), "--model", str(model), "--out", str(out), "--resolution", str(RESOLUTION[args.family]),
           "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--mixed-precision", "bf16",
           "--log-every", str(LOG_EVERY), "--lr", "1e-5", "--gpus", str(gpus), "--cache-dir", str(args.cache_dir)]
    if not cache:
        cmd.append("--no-cache")
    if args.compile:
        cmd += ["--compile", args.compile]
    t0 = time.perf_counter()
    first_step_s, phases, lines = None, {}, []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        for line in p.stdout:  # the time to the first step as the user sees it: from the command
            lines.append(line)
            if first_step_s is None and "first step done" in line:
                first_step_s, phases = round(time.perf_counter() - t0, 1), first_step_phases(line)
    wall = time.perf_counter() - t0
    (args.results / f"train_speed-{out.name}.log").write_text("".join(lines))
    error = ("".join(lines).strip().splitlines() or ["?"])[-1] if p.returncode != 0 else None
    log_file = out / "log.jsonl"
    log = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.is_file() else []
    # elapsed_s is taken when the losses are read back (every LOG_EVERY steps): time from a flush to a flush
    flushes = [r for r in log if r["step"] % LOG_EVERY == 0 or r is log[-1]]
    start = next((r for r in flushes if r["step"] >= args.warmup), None)
    if start is None or start is flushes[-1]:
        return {"run": out.name, "error": error or "too few logged steps after the warm-up"}
    a, b = start, flushes[-1]
    images = (b["step"] - a["step"]) * args.batch_size * gpus
    ips = images / (b["elapsed_s"] - a["elapsed_s"])
    cache_note = next((line.strip() for line in lines if "latent cache" in line), "")
    return {"run": out.name, "gpus": gpus, "cache": cache, "batch_per_gpu": args.batch_size, "images_per_s": round(ips, 2),
            "mfu_pct": round(100 * ips * TRAIN_TFLOP_PER_IMAGE[args.family] / (PEAK_TFLOPS * gpus), 1),
            "wall_s": round(wall, 1), "first_step_s": first_step_s,
            "first_step_phases_s": phases,
            "final_loss": round(b["loss"], 4), "cache_note": cache_note.split(": ", 1)[-1],
            **({"error_after_timing": error} if error else {})}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="nocache:1,cache:1", help="comma list of cache|nocache:GPUS")
    ap.add_argument("--batch-size", type=int, default=8, help="images per step and GPU")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=10, help="steps before the timed span")
    ap.add_argument("--family", default="sd15", choices=("sd15", "sdxl"), help="SD-1.5-shaped at 512px, SDXL at 1024px")
    ap.add_argument("--compile", choices=("auto", "none", "regional", "full", "graphs"), help="ldm train's --compile")
    ap.add_argument("--images", type=int, default=256, help="generated training images")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ldm-train-bench",
                    help="folder for the model, data, cache and runs")
    from common import add_out_option

    add_out_option(ap)
    args = ap.parse_args()
    from common import Report, out_folder, save_sd15_random, save_sdxl_random

    args.results = out_folder(args.out)
    report = Report(args.results, "train_speed")
    args.cache_dir = args.work / "cache"
    save = save_sdxl_random if args.family == "sdxl" else save_sd15_random
    model, data = save(args.work / args.family), args.work / f"data-{RESOLUTION[args.family]}"
    if not data.is_dir():
        make_data(data, args.images, RESOLUTION[args.family])
    ldm = [sys.executable, "-m", "ldm_cli"]
    for k, spec in enumerate(args.runs.split(",")):  # a spec given twice runs twice (a warm compile cache)
        mode, gpus = spec.split(":")
        out = args.work / f"{args.family}-{mode}-{gpus}gpu-{k}"
        shutil.rmtree(out, ignore_errors=True)
        report.emit(run(ldm, data, model, out, mode == "cache", int(gpus), args))
        shutil.rmtree(out, ignore_errors=True)  # its weights and checkpoint (SD-1.5: ~14 GB); its printed log is in --out
    report.table(("run", "GPUs", "images/s", "MFU", "first step s", "of it: before train / models / data / set-up / step",
                  "wall s", "cache"),
                 lambda r: [r["run"], r.get("gpus"), r.get("images_per_s"), f"{r.get('mfu_pct')}%", r.get("first_step_s"),
                            " / ".join(str(v) for v in r.get("first_step_phases_s", {}).values()),
                            r.get("wall_s"), r.get("cache_note") or r.get("error", "")]
                 if "run" in r and "gpu" not in r else None)
    report.save()


if __name__ == "__main__":
    main()
