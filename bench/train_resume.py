"""Does a resumed `ldm train` go on as the unbroken run would have, on a GPU's fast path?

    python bench/train_resume.py [--steps 20] [--compile full] [--batch-size 8]
    python bench/train_resume.py --model ldm_cli/embedded --resolution 64 --batch-size 256 --compile graphs \
        --plain --train-args "--from-scratch --unet-config recipes/tiny-emoji/unet.json --ema --ema-decay 0.999 \
        --min-snr-gamma 5 --validate-every 10 --validation-prompt 'a cat wearing a top hat'"   # the embedded recipe's

Runs the real CLI three times on an SD-1.5-shaped random model and the 512 px folder of train_speed.py
(bf16, latent cache): A, --steps steps unbroken; B, the first half (its last step checkpointed), then
`--resume latest` to --steps. Compares B's losses after the resume with A's at the same steps: the largest
and mean relative difference (CPU runs are bitwise equal, tests/; on CUDA kernels may differ run to run,
so the figure to state is the noise, against the fast-vs-plain tolerance of 1e-2). --plain also runs A with
--compile none and compares A's losses with those (the fast path against the plain one, end to end); --train-args
adds ldm train options to every run (EMA, validation grids, ...), whose outputs the row lists.
"""

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from train_speed import make_data


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r}


def rel_diff(la: dict, lb: dict, steps) -> dict:
    rel = [abs(lb[s] - la[s]) / abs(la[s]) for s in steps]
    return {"max_rel_diff": float(f"{max(rel):.2e}"), "mean_rel_diff": float(f"{sum(rel) / len(rel):.2e}")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--compile", default="full", choices=("none", "regional", "full", "graphs"))
    ap.add_argument("--model", type=Path, help="a model folder (default: an SD-1.5-shaped random one, 512 px)")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--plain", action="store_true", help="also run A with --compile none and compare")
    ap.add_argument("--train-args", default="", help="more ldm train options for every run (one string)")
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
               "--mixed-precision", "bf16", "--lr", "1e-5", "--log-every", "1", "--keep-checkpoints", "1",
               "--cache-dir", str(args.work / "cache"), *shlex.split(args.train_args), *more]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)}\n{p.stderr[-2000:]}")

    a, b = args.work / "resume-a", args.work / "resume-b"
    for out in (a, b):
        shutil.rmtree(out, ignore_errors=True)
    fast = ("--compile", args.compile)
    train(a, args.steps, *fast)
    la = losses(a)
    shutil.rmtree(a)  # an SD-1.5 checkpoint with its AdamW moments is ~10 GB: one on disk at a time
    train(b, half, *fast)  # its end checkpoint, at `half`, is the one resumed
    train(b, args.steps, *fast, "--resume", "latest")
    lb = losses(b)
    after = range(half + 1, args.steps + 1)
    row = {"steps": args.steps, "resumed_at": half, "compile": args.compile, "batch": args.batch_size,
           "train_args": args.train_args, **rel_diff(la, lb, after), "bitwise": all(la[s] == lb[s] for s in after),
           "losses": [[s, round(la[s], 5), round(lb[s], 5)] for s in after],
           "made": sorted(str(p.relative_to(b)) for p in b.iterdir()),
           "validation": sorted(p.name for p in (b / "validation").glob("*")) if (b / "validation").is_dir() else []}
    if args.plain:
        plain = args.work / "resume-plain"
        shutil.rmtree(plain, ignore_errors=True)
        train(plain, args.steps, "--compile", "none")
        lp = losses(plain)
        shutil.rmtree(plain)
        row["against_plain"] = rel_diff(la, lp, range(1, args.steps + 1))
        row["plain_losses"] = [round(lp[s], 5) for s in sorted(lp)]
    report.emit(row)
    report.save()


if __name__ == "__main__":
    main()
