"""Training data: a folder of images with captions, in the layouts users already have.

- kohya style: `cat.png` + `cat.txt` or `cat.caption` (the caption), anywhere below the folder;
- diffusers imagefolder: `metadata.jsonl` (or `.csv`) with `file_name` and `text` columns.
Unreadable or caption-less images (unless an instance prompt is given) are skipped and counted (`strict` makes them errors).
"""

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ldm_cli.errors import LdmError, check
from ldm_cli.io.images import IMAGE_SUFFIXES, open_image, pil_to_pixels

MAX_CAPTION_BYTES = 64 * 1024
MAX_METADATA_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str
    bucket: tuple[int, int] | None = None  # (width, height) trained at; None: the square of --resolution


def find_examples(root: str | Path, strict: bool = False, default_caption: str = "") -> tuple[list[Example], list[str]]:
    """All (image, caption) pairs under root, sorted by path, and a list of skip reasons. Images without
    a caption get `default_caption` (DreamBooth's instance prompt), or are skipped when it is empty."""
    root = Path(root)
    check(root.is_dir(), f"{root}: data folder not found")
    captions: dict[Path, str] = {}
    for meta in sorted(root.rglob("metadata.jsonl")) + sorted(root.rglob("metadata.csv")):
        captions.update(_read_metadata(meta))
    examples, skipped = [], []
    seen = set()
    for path in sorted(root.rglob("*")):  # rglob does not follow symlinked folders: no loops
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        real = path.resolve()
        if real in seen:
            continue
        seen.add(real)
        caption = captions.get(path.resolve())
        sidecar = next((p for p in (path.with_suffix(".txt"), path.with_suffix(".caption")) if p.is_file()), None)
        if caption is None and sidecar is not None:
            try:
                with open(sidecar, "rb") as f:  # bounded: a caption is a line or a paragraph, not 50 MB
                    raw = f.read(MAX_CAPTION_BYTES + 1)
                caption = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                skipped.append(f"{sidecar}: caption is not UTF-8")
                continue
            if len(raw) > MAX_CAPTION_BYTES:
                skipped.append(f"{sidecar}: caption is longer than {MAX_CAPTION_BYTES} bytes")
                continue
        caption = caption or default_caption
        if not caption:
            skipped.append(f"{path}: no caption")
            continue
        examples.append(Example(path, caption))
    if strict and skipped:
        raise LdmError(f"{skipped[0]} (and {len(skipped) - 1} more); fix them or drop --strict")
    check(examples != [], f"{root}: no captioned images found (sidecar .txt/.caption or metadata.jsonl/.csv)")
    return examples, skipped


def _read_metadata(meta: Path) -> dict[Path, str]:
    out = {}
    try:
        with open(meta, "rb") as f:
            raw = f.read(MAX_METADATA_BYTES + 1)
        check(len(raw) <= MAX_METADATA_BYTES, f"{meta}: larger than {MAX_METADATA_BYTES} bytes")
        text = raw.decode("utf-8")
        if meta.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.split("\n") if line.strip()]
        else:
            rows = list(csv.DictReader(text.splitlines()))
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error, OSError) as e:
        raise LdmError(f"{meta}: cannot read ({type(e).__name__}: {str(e)[:160]}); fix it, or move it out of the "
                       "data folder") from None
    except RecursionError:  # "[[[[..." nested thousands deep
        raise LdmError(f"{meta}: JSON nested too deeply; fix it, or move it out of the data folder") from None
    for row in rows:
        name, text = (row.get("file_name"), row.get("text")) if isinstance(row, dict) else (None, None)
        if isinstance(name, str) and name and "\x00" not in name and isinstance(text, str):
            out[(meta.parent / name).resolve()] = text.strip()[:MAX_CAPTION_BYTES]
    return out


def shuffle_tags(caption: str, keep: int, rng: random.Random) -> str:
    """kohya's --shuffle_caption: the comma-separated tags after the first `keep` in a new order."""
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep], tags[keep:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def load_pixels(ex: Example, resolution: int, rng: random.Random, random_crop: bool = False,
                flip: bool = False) -> torch.Tensor:
    """The example's pixels at its bucket (or the --resolution square): [3, H, W]."""
    return load_pixels_and_crop(ex, resolution, rng, random_crop, flip)[0]


def load_pixels_and_crop(ex: Example, resolution: int, rng: random.Random, random_crop: bool = False,
                         flip: bool = False) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Resize to cover the example's bucket (by default the resolution square: the short side to `resolution`),
    crop it (centre or random), maybe flip; and what SDXL's micro-conditioning records of it (as diffusers'
    train_text_to_image_sdxl.py): the original (height, width) and the crop's (top, left) in the resized
    image, its left edge mirrored when flipped."""
    from ldm_cli.train.buckets import cover_crop

    bw, bh = ex.bucket or (resolution, resolution)
    im = open_image(ex.path)
    w0, h0 = im.size
    w, h, left, top = cover_crop((w0, h0), (bw, bh))
    im = im.resize((w, h), Image.BICUBIC)
    if random_crop:
        left, top = rng.randint(0, w - bw), rng.randint(0, h - bh)
    im = im.crop((left, top, left + bw, top + bh))
    if flip and rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
        left = w - bw - left
    return pil_to_pixels(im, bw, bh)[0], (h0, w0, top, left)


def centre_crop_of(ex: Example, resolution: int) -> tuple[int, int, int, int]:
    """What load_pixels_and_crop records for the centre crop, from the image's header alone."""
    from ldm_cli.io.images import image_size
    from ldm_cli.train.buckets import cover_crop

    w0, h0 = image_size(ex.path)
    _, _, left, top = cover_crop((w0, h0), ex.bucket or (resolution, resolution))
    return h0, w0, top, left
