"""Does a resumed `ldm train` go on as the unbroken run would have, on a GPU's fast path?

    python bench/train_resume.py [--steps 20] [--compile full] [--batch-size 8]

Runs the real CLI three times on an SD-1.5-shaped random model and the 512 px folder of train_speed.py
(bf16, latent cache): A, --steps steps unbroken; B, the first half (its last step checkpointed), then
`--resume latest` to --steps. Compares B's losses after the resume with A's at the same steps: the largest
and mean relative difference (CPU runs are bitwise equal, tests/; on CUDA kernels may differ run to run,
so the figure to state is the noise, against the fast-vs-plain tolerance of 1e-2).
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from train_speed import make_data


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--compile", default="full", choices=("none", "regional", "full", "graphs"))
    ap.add_argument("--model", type=Path, help="a model folder (default: an SD-1.5-shaped random one, 512 px)")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ldm-train-bench")
    from common import Report, add_out_option, out_folder, save_sd15_random

    add_out_option(ap)
    args = ap.parse_args()
    report = Report(out_folder(args.out), "train_resume")
    model, data = args.model or save_sd15_random(args.work / "sd15"), args.work / "data-512"
    if not data.is_dir():
        make_data(data, 256, 512)
    half = args.steps // 2

    def train(out: Path, steps: int, *more: str) -> None:
        cmd = [sys.executable, "-m", "ldm_cli", "train", str(data), "--model", str(model), "--out", str(out),
               "--resolution", str(args.resolution), "--batch-size", str(args.batch_size), "--max-steps", str(steps),
               "--mixed-precision", "bf16", "--lr", "1e-5", "--log-every", "1", "--checkpoint-every", str(half),
               "--compile", args.compile, "--cache-dir", str(args.work / "cache"), *more]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)}\n{p.stderr[-2000:]}")

    a, b = args.work / "resume-a", args.work / "resume-b"
    for out in (a, b):
        shutil.rmtree(out, ignore_errors=True)
    train(a, args.steps)
    train(b, half)
    train(b, args.steps, "--resume", "latest")
    la, lb = losses(a), losses(b)
    after = range(half + 1, args.steps + 1)
    rel = [abs(lb[s] - la[s]) / abs(la[s]) for s in after]
    report.emit({"steps": args.steps, "resumed_at": half, "compile": args.compile, "batch": args.batch_size,
                 "max_rel_diff": float(f"{max(rel):.2e}"), "mean_rel_diff": float(f"{sum(rel) / len(rel):.2e}"),
                 "bitwise": all(la[s] == lb[s] for s in after),
                 "losses": [[s, round(la[s], 5), round(lb[s], 5)] for s in after]})
    report.save()


if __name__ == "__main__":
    main()
