"""Training data: a folder of images with captions, in the layouts users already have.

- kohya style: `cat.png` + `cat.txt` (the caption), anywhere below the folder;
- diffusers imagefolder: `metadata.jsonl` (or `.csv`) with `file_name` and `text` columns.
Unreadable or caption-less images are skipped and counted (`strict` makes them errors).
"""

import csv
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm_cli.errors import LdmError, check
from ldm_cli.images import IMAGE_SUFFIXES, open_image, pil_to_pixels


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str


def find_examples(root: str | Path, strict: bool = False) -> tuple[list[Example], list[str]]:
    """All (image, caption) pairs under root, sorted by path, and a list of skip reasons."""
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
        sidecar = path.with_suffix(".txt")
        if caption is None and sidecar.is_file():
            try:
                caption = sidecar.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                skipped.append(f"{sidecar}: caption is not UTF-8")
                continue
        if not caption:
            skipped.append(f"{path}: no caption")
            continue
        examples.append(Example(path, caption))
    if strict and skipped:
        raise LdmError(f"{skipped[0]} (and {len(skipped) - 1} more); fix them or drop --strict")
    check(examples != [], f"{root}: no captioned images found (sidecar .txt or metadata.jsonl/.csv)")
    return examples, skipped


def _read_metadata(meta: Path) -> dict[Path, str]:
    out = {}
    try:
        if meta.suffix == ".jsonl":
            rows = [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            rows = list(csv.DictReader(meta.read_text(encoding="utf-8").splitlines()))
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise LdmError(f"{meta}: cannot read ({type(e).__name__}: {e})") from None
    for row in rows:
        if isinstance(row, dict) and row.get("file_name") and isinstance(row.get("text"), str):
            out[(meta.parent / row["file_name"]).resolve()] = row["text"].strip()
    return out


def load_pixels(ex: Example, resolution: int, rng: random.Random, random_crop: bool = False,
                flip: bool = False) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square (centre or random), maybe flip: [3, R, R]."""
    im = open_image(ex.path)
    w, h = im.size
    scale = resolution / min(w, h)
    im = im.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left = rng.randint(0, w - resolution) if random_crop else (w - resolution) // 2
    top = rng.randint(0, h - resolution) if random_crop else (h - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return pil_to_pixels(im, resolution, resolution)[0]


# ---- the latent cache --------------------------------------------------------------------------------
# With frozen encoders, each image's VAE posterior and each caption's text embedding never change, so
# they are computed once and kept on disk: <cache>/<settings key>/img/<image sha256>.safetensors and
# .../txt/<caption sha256>.safetensors. The settings key covers the encoders' weights, the resolution
# and the crop, so a change in any of them starts a new folder instead of reusing stale entries.
# Stored: the posterior's parameters (mean and log-variance), not a sample, so every step still draws
# a fresh latent from them exactly as the uncached path does: the two give the same losses.


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_atomic(tensors: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


@dataclass
class EncodedData:
    """In memory for the run: posterior parameters per image and embeddings per caption ('' included)."""
    moments: dict[Path, torch.Tensor]
    context: dict[str, torch.Tensor]
    encoded: int  # entries computed in this run (0 when the cache had everything)
    seconds: float


def _load_or_encode(items: dict, key: str, encode, batch_size: int) -> tuple[dict, int]:
    """items: {id: (cache file, input)}. Cached entries are loaded; the rest are encoded in batches of
    inputs with `encode`, stored, and counted. Returns ({id: tensor}, number encoded)."""
    out, todo = {}, []
    for ident, (path, value) in items.items():
        if path.is_file():
            out[ident] = load_file(path)[key]
        else:
            todo.append((ident, path, value))
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        for (ident, path, _), tensor in zip(chunk, encode([value for _, _, value in chunk])):
            _write_atomic({key: tensor}, path)
            out[ident] = tensor.cpu()
    return out, len(todo)


def encode_dataset(examples: list[Example], folder: Path, resolution: int, encode_pixels, encode_captions,
                   batch_size: int = 8) -> EncodedData:
    """Load what `folder` has, encode (in batches) and store what it lacks, return it all."""
    t0 = time.perf_counter()
    images = {ex.path: (folder / "img" / f"{file_sha256(ex.path)}.safetensors", ex) for ex in examples}
    moments, n_img = _load_or_encode(
        images, "moments",
        lambda exs: encode_pixels(torch.stack([load_pixels(ex, resolution, random.Random(0)) for ex in exs])),
        batch_size)
    captions = {cap: (folder / "txt" / f"{text_sha256(cap)}.safetensors", cap)
                for cap in sorted({ex.caption for ex in examples} | {""})}
    context, n_txt = _load_or_encode(captions, "context", encode_captions, batch_size)
    return EncodedData(moments, context, n_img + n_txt, time.perf_counter() - t0)
