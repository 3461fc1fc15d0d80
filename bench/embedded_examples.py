"""The examples grid of the docs: each prompt of a prompt file, four seeds, with the model as `ldm sample` runs it.

    python bench/embedded_examples.py [--prompts prompts/examples.txt] [--model FOLDER] [--out docs/embedded]

One row per prompt (its text before any '|'; the line's overrides are left out, so every row has the same
settings): seeds 0-3, 50 DDIM steps, the model's own defaults (ldm_defaults.json: cfg 5 for the embedded
model, else 7.5), the model's native size, each picture scaled up 2x (nearest) so
64 px can be seen; the prompt is written under its row. Writes OUT/examples.png; CPU: about a minute.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
from common import out_folder  # noqa: E402

from ldm_cli.io.prompts import read_prompt_file  # noqa: E402
from ldm_cli.jobs import Settings  # noqa: E402
from ldm_cli.models.defaults import EMBEDDED_MODEL, with_model_defaults  # noqa: E402
from ldm_cli.models.options import LoadOptions  # noqa: E402
from ldm_cli.sample import pipeline  # noqa: E402
from ldm_cli.sample.run import load as load_model  # noqa: E402

ROOT = Path(__file__).parent.parent
SEEDS = 4
SCALE = 2
LABEL_H = 18


def row(c, prompt: str, settings: Settings) -> np.ndarray:
    """uint8 [size, SEEDS * size, 3]: the prompt at seeds 0..SEEDS-1."""
    pics = pipeline.txt2img(c, [prompt] * SEEDS, [""] * SEEDS, list(range(SEEDS)), settings)
    pics = (pics * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return np.concatenate(list(pics), axis=1)


def grid(rows: list[tuple[str, np.ndarray]]) -> Image.Image:
    w = rows[0][1].shape[1] * SCALE
    out = Image.new("RGB", (w, len(rows) * (rows[0][1].shape[0] * SCALE + LABEL_H)), "white")
    draw, y = ImageDraw.Draw(out), 0
    for prompt, pixels in rows:
        pic = Image.fromarray(pixels).resize((w, pixels.shape[0] * SCALE), Image.NEAREST)
        out.paste(pic, (0, y))
        y += pic.height
        draw.text((4, y + 3), prompt, fill="black")
        y += LABEL_H
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=Path, default=ROOT / "prompts" / "examples.txt")
    ap.add_argument("--model", default=str(EMBEDDED_MODEL))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "embedded")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    c = load_model(LoadOptions(model=args.model, device=device, dtype="fp32", accel="none")).components
    size = c.unet.config.sample_size * c.vae_scale
    settings = with_model_defaults(Settings(steps=50, width=size, height=size), args.model, set())
    prompts = [p.split("|")[0].strip() for p, _, _ in read_prompt_file(args.prompts)]
    path = out_folder(args.out) / "examples.png"
    grid([(p, row(c, p, settings)) for p in prompts]).save(path)
    print(f"wrote {path} ({len(prompts)} prompts x {SEEDS} seeds)")


if __name__ == "__main__":
    main()
