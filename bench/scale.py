"""Scaling over GPUs: images/s of `ldm sample --gpus N` and `ldm train --gpus N`, and the scaling efficiency
(images/s at N / (N x images/s at 1)), for N = 1 and every N listed (default: 1 and all the GPUs here).

Runs the real CLI on SD-1.5-shaped random weights (speed does not depend on values): sampling a prompt file of
--images prompts at 512 px, 30 DDIM steps, fp16, --batch-size per process; training as bench/train_speed.py does
(512 px, bf16, latent cache on). Sampling images/s is counted between the first and the last PNG written (so
model loading and the launcher's start are apart; `wall_s` has the whole command):

    python bench/scale.py                      # N = 1 and every GPU of this machine
    python bench/scale.py --gpus 1,2,4,8 --images 512
    python bench/scale.py --tiny --device cpu --gpus 1,2 --images 8   # a smoke run of the script, CPU processes
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Report, add_out_option, out_folder, save_sd15_random

PROMPT_WORDS = ["red", "blue", "green", "cat", "dog", "house", "tree", "boat", "castle", "in the snow", "at night"]


def ldm_command() -> list[str]:
    return [sys.executable, "-m", "ldm_cli"]


def sample_rate(model: Path, prompts: Path, out: Path, gpus: int, args) -> dict:
    cmd = [*ldm_command(), "sample", "--prompt-file", str(prompts), "--model", str(model), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--seed", "1", "--gpus", str(gpus), "-o", str(out), "-q",
           "--device", args.device, *(["--width", "64", "--height", "64"] if args.tiny else [])]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"what": "sample", "gpus": gpus, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    times = sorted(f.stat().st_mtime for f in out.glob("*.png"))
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
    return {"what": "sample", "gpus": gpus, "images": len(times), "images_per_s": rate and round(rate, 3),
            "wall_s": round(wall, 1)}


def train_rate(model: Path, data: Path, out: Path, gpus: int, args) -> dict:
    import json

    cmd = [*ldm_command(), "train", str(data), "--model", str(model), "--out", str(out), "--batch-size",
           str(args.batch_size), "--max-steps", str(args.train_steps), "--log-every", "1", "--lr", "1e-5",
           "--gpus", str(gpus), "--cache-dir", str(args.work / "cache"), "--device", args.device, "-q",
           *(["--resolution", "64"] if args.tiny else ["--resolution", "512", "--mixed-precision", "bf16"])]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"what": "train", "gpus": gpus, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "loss" in line]
    a, b = log[min(args.warmup, len(log) - 2)], log[-1]
    rate = (b["step"] - a["step"]) * args.batch_size * gpus / (b["elapsed_s"] - a["elapsed_s"])
    return {"what": "train", "gpus": gpus, "images_per_s": round(rate, 3), "wall_s": round(wall, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default=None, help="comma list of process counts (default: 1 and all GPUs here)")
    ap.add_argument("--images", type=int, default=256, help="prompts in the sampling run (one image each)")
    ap.add_argument("--steps", type=int, default=30, help="sampler steps")
    ap.add_argument("--batch-size", type=int, default=8, help="images per U-Net batch and process")
    ap.add_argument("--train-steps", type=int, default=30, help="optimizer steps of each training run")
    ap.add_argument("--warmup", type=int, default=10, help="training steps before the timed span")
    ap.add_argument("--device", default="auto", help="auto, or cpu for CPU processes (with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny model at 64 px: checks the script on a CPU")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ldm-scale-bench")
    add_out_option(ap)
    args = ap.parse_args()
    import torch

    counts = [int(n) for n in args.gpus.split(",")] if args.gpus else sorted({1, max(1, torch.cuda.device_count())})
    args.work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from tiny import save_tiny

        model = args.work / "tiny"
        if not (model / "model_index.json").is_file():
            save_tiny(model)
    else:
        model = save_sd15_random(args.work / "sd15-random")
    prompts = args.work / "prompts.txt"
    words = PROMPT_WORDS
    prompts.write_text("".join(f"a {words[i % 3]} {words[3 + i % 5]} {words[8 + i % 3]}\n" for i in range(args.images)))
    data = args.work / "data"
    if not data.is_dir():
        from train_speed import make_data

        make_data(data, max(64, args.batch_size * max(counts) * 4), 256 if args.tiny else 512)
    report = Report(out_folder(args.out), "scale")
    base = {}
    for what, fn, source in (("sample", sample_rate, prompts), ("train", train_rate, data)):
        for n in counts:
            out = args.work / f"{what}-{n}-{time.time_ns()}"
            row = fn(model, source, out, n, args)
            if row.get("images_per_s"):
                base.setdefault(what, row["images_per_s"] if n == 1 else None)
                if base.get(what):
                    row["efficiency_pct"] = round(100 * row["images_per_s"] / (n * base[what]), 1)
            report.emit(row)
            subprocess.run(["rm", "-rf", str(out)])
    keys = ["what", "gpus", "images_per_s", "efficiency_pct", "wall_s", "error"]
    report.table(keys, lambda r: [r.get(k, "") for k in keys] if "what" in r else None)
    report.save()


if __name__ == "__main__":
    main()
