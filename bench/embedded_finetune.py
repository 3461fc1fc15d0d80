"""Fine-tuning the embedded model on a new thing: what each learning rate teaches, and what other prompts lose.

    python bench/embedded_finetune.py .data/emoji.npz [--name ghost] [--runs lora:1e-4,lora:1e-3,full:1e-4]

A name the model never saw (held out of its data, default "ghost") in its 3 styles on 16 (style, background)
pairs is the training folder; each run is the real `ldm train` (CPU is enough: 64 px) for --steps steps at
batch 4. Scores (cfg 7.5, 50 DDIM steps, fixed seeds):
  - learnt: mean absolute pixel distance (0-255) between "ghost, STYLE style, on a COLOUR background" samples
    and the real composed picture of that caption, on 6 pairs not in the folder (lower is better; the base
    model's figure is the start);
  - drift: mean absolute pixel change (0-255) of 24 other prompts' images from the base model's, same seeds
    (what the fine-tune costs the rest of the model; 0 is nothing lost).
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent.parent / "recipes" / "tiny-emoji"))

from common import Report, add_out_option, out_folder  # noqa: E402
from emoji_data import BG_NAMES, caption, compose, load  # noqa: E402

LDM = [sys.executable, "-m", "ldm_cli"]


def picture(d, i: int, bg: int) -> np.ndarray:
    x = compose(torch.from_numpy(d["rgba"][[i]]), torch.tensor([bg]))[0]
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def sample(prompts: list[str], out: Path, extra: list[str]) -> np.ndarray:
    """One image per prompt (seed 1 each), through the CLI: uint8 [N, 64, 64, 3] in prompt order."""
    out.mkdir(parents=True)
    (out / "prompts.txt").write_text("".join(p + " | seed=1\n" for p in prompts))
    subprocess.run([*LDM, "sample", "--prompt-file", str(out / "prompts.txt"), "-o", str(out / "img"), "-q",
                    "--device", "cpu", *extra], check=True)
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((out / "img").glob("*.png"))])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("npz", type=Path)
    ap.add_argument("--name", default="ghost", help="a held-out emoji name")
    ap.add_argument("--runs", default="lora:1e-4,lora:1e-3,lora:3e-3,full:1e-5,full:1e-4",
                    help="comma list of lora|full:LR")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--work", type=Path, default=Path(tempfile.mkdtemp(prefix="ldm-ft-")))
    add_out_option(ap)
    args = ap.parse_args()
    d = load(args.npz)
    rows = [i for i in np.flatnonzero(d["name"] == args.name)]
    assert rows and d["held_out"][rows[0]], f"{args.name!r} is not a held-out name of {args.npz}"
    rng = np.random.default_rng(0)
    pairs = [(i, int(b)) for i in rows for b in rng.permutation(len(BG_NAMES))[:8]]
    train, test = pairs[:16], pairs[16:22]
    data = args.work / "data"
    data.mkdir(parents=True)
    for k, (i, bg) in enumerate(train):
        Image.fromarray(picture(d, i, bg)).save(data / f"{k:02d}.png")
        (data / f"{k:02d}.txt").write_text(caption(args.name, d["style"][i], BG_NAMES[bg]))
    test_prompts = [caption(args.name, d["style"][i], BG_NAMES[bg]) for i, bg in test]
    real = np.stack([picture(d, i, bg) for i, bg in test]).astype(float)
    others_idx = rng.choice(np.flatnonzero(~d["held_out"]), 24, replace=False)
    others = [caption(d["name"][i], d["style"][i], BG_NAMES[k % len(BG_NAMES)]) for k, i in enumerate(others_idx)]
    report = Report(out_folder(args.out), "embedded_finetune")
    base_new = sample(test_prompts, args.work / "base-new", [])
    base_others = sample(others, args.work / "base-others", []).astype(float)
    report.emit({"run": "base model", "learnt_distance": round(float(np.abs(base_new - real).mean()), 2), "drift": 0.0})
    for spec in args.runs.split(","):
        mode, lr = spec.split(":")
        run = args.work / spec.replace(":", "-")
        cmd = [*LDM, "train", str(data), "--out", str(run), "--resolution", "64", "--batch-size", "4", "--max-steps",
               str(args.steps), "--lr", lr, "--device", "cpu", "-q", "--cache-dir", str(args.work / "cache")]
        subprocess.run(cmd + (["--lora-rank", "8"] if mode == "lora" else []), check=True)
        use = ["--lora", str(run / "lora")] if mode == "lora" else ["--model", str(run / "model")]
        new = sample(test_prompts, run / "new", use)
        oth = sample(others, run / "others", use).astype(float)
        report.emit({"run": f"{mode} lr {lr}, {args.steps} steps",
                     "learnt_distance": round(float(np.abs(new - real).mean()), 2),
                     "drift": round(float(np.abs(oth - base_others).mean()), 2)})
    report.table(("run", "distance to the real pictures (lower: learnt)", "drift of 24 other prompts"),
                 lambda r: [r["run"], r["learnt_distance"], r["drift"]] if "learnt_distance" in r else None)
    report.save()


if __name__ == "__main__":
    main()
