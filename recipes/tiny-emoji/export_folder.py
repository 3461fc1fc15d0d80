"""Write the U-Net's training folder for `ldm train`: composed PNGs with kohya-style .txt captions.

    python export_folder.py emoji.npz OUT_DIR [--backgrounds 4]

Each training (emoji, style) appears on `backgrounds` different colours (chosen by a seeded RNG),
captioned in full ("cat face, 3d style, on a blue background") except for the last three copies,
which get shorter captions ("cat face, 3d style", "a cat face", "cat face") so that short prompts
work too. Held-out names are left out entirely.
"""

import argparse
import random
from pathlib import Path

import numpy as np
import torch
from emoji_data import BG_NAMES, caption, compose, load
from PIL import Image

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("npz", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--backgrounds", type=int, default=6)
    args = ap.parse_args()
    d = load(args.npz)
    rng = random.Random(0)
    args.out.mkdir(parents=True, exist_ok=True)
    n = 0
    for i in np.flatnonzero(~d["held_out"]):
        bgs = rng.sample(range(len(BG_NAMES)), args.backgrounds)
        pix = compose(torch.from_numpy(d["rgba"][[i] * len(bgs)]), torch.tensor(bgs))
        arr = ((pix + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        name, style = d["name"][i], d["style"][i]
        short = [f"{name}, {style} style", f"a {name}", name][:max(0, args.backgrounds - 1)]
        captions = [caption(name, style, BG_NAMES[bg]) for bg in bgs[:len(bgs) - len(short)]] + short
        for bg, a, text in zip(bgs, arr, captions):
            stem = args.out / f"{i:05d}-{bg}"
            Image.fromarray(a).save(stem.with_suffix(".png"))
            stem.with_suffix(".txt").write_text(text)
            n += 1
    print(f"wrote {n} training images to {args.out}")
