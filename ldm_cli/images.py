"""Images in and out: loading init images, tensors <-> PIL, grids, PNG metadata, atomic writes."""

import json
import os
import re
import struct
import tempfile
import unicodedata
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from ldm_cli.config import MAX_SEED, Job, validate
from ldm_cli.errors import RUNTIME, LdmError, check

MAX_PIXELS = 8192 * 8192  # refuse larger images instead of decompressing them (decompression bombs)
MAX_METADATA_BYTES = 1 << 20
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# What PIL raises on damaged files besides OSError: a PNG with a cut-short header gives ValueError or
# SyntaxError, a broken compressed stream zlib.error, a short chunk struct.error (all found by fuzzing).
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error)
WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB, with one clear error for anything unreadable."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = MAX_PIXELS
            with Image.open(path) as im:
                im.seek(0)  # first frame of an animation
                im.load()
                return _to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise LdmError(f"{path}: image is larger than {MAX_PIXELS} pixels; resize it first") from None
    except FileNotFoundError:
        raise LdmError(f"{path}: no such image file") from None
    except UNREADABLE as e:
        raise LdmError(f"{path}: cannot read image ({_first_line(e)})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale to 8 bits instead of clipping
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray((arr / max(arr.max(), 1) * 255).round().astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the header only, with the same errors as open_image."""
    try:
        with warnings.catch_warnings():  # the header alone is read; the size is checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
    except Image.DecompressionBombError:  # PIL refuses past 2x its own limit before we see the size
        raise LdmError(f"{path}: image is larger than {MAX_PIXELS} pixels; resize it first") from None
    except FileNotFoundError:
        raise LdmError(f"{path}: no such image file") from None
    except UNREADABLE as e:
        raise LdmError(f"{path}: cannot read image ({_first_line(e)})") from None
    check(w * h <= MAX_PIXELS, f"{path}: image is larger than {MAX_PIXELS} pixels; resize it first")
    check(w >= 8 and h >= 8, f"{path}: image is {w}x{h}; img2img needs at least 8x8 pixels")
    return w, h


def list_images(path: str | Path) -> list[str]:
    """IMAGE arguments may be a folder: its images, sorted by name (not recursive)."""
    p = Path(path)
    if p.is_dir():
        found = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        check(found != [], f"{p}: folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        return found
    check(p.exists(), f"{p}: no such image file or folder")
    return [str(p)]


def pil_to_pixels(im: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] float32 in [-1, 1], resized (Lanczos, like diffusers) if needed."""
    if im.size != (width, height):
        im = im.resize((width, height), resample=Image.LANCZOS)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2.0 - 1.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> PIL images, rounded like diffusers' numpy_to_pil."""
    arr = images.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(a) for a in (arr * 255).round().astype(np.uint8)]


def grid(images: list[Image.Image]) -> Image.Image:
    cols = int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out


# ---- metadata ---------------------------------------------------------------------------------------

def parameters_text(job: Job, model: str, width: int, height: int, lora: str = "") -> str:
    """A1111's `parameters` format, which image browsers and web UIs read."""
    s = job.settings
    lines = [job.prompt]
    if s.negative:
        lines.append(f"Negative prompt: {s.negative}")
    extra = f", Denoising strength: {s.strength}" if s.strength is not None else ""
    extra += f", Lora: {lora}" if lora else ""
    lines.append(f"Steps: {s.steps}, Sampler: DDIM, CFG scale: {s.cfg}, Seed: {job.seed}, "
                 f"Size: {width}x{height}, Model: {Path(model).name or model}, Eta: {s.eta}{extra}")
    return "\n".join(lines)


def png_info(job: Job, model: str, width: int, height: int, lora: str = "") -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("parameters", parameters_text(job, model, width, height, lora))
    from ldm_cli import __version__

    info.add_itxt("ldm", json.dumps({"version": __version__, "model": model, **job.to_dict(),
                                     **({"lora": lora} if lora else {})}))
    return info


def read_png_job(path: str | Path) -> tuple[Job, str]:
    """The (job, model) an ldm PNG was made with, from its `ldm` chunk."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with warnings.catch_warnings():  # only the text chunks are read, never the pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check(im.format == "PNG", f"{path}: not a PNG file")
                text = im.text.get("ldm") if hasattr(im, "text") else None
    except Image.DecompressionBombError:
        raise LdmError(f"{path}: image is larger than {MAX_PIXELS} pixels; not an ldm PNG") from None
    except UNREADABLE as e:
        raise LdmError(f"{path}: cannot read PNG ({_first_line(e)})") from None
    check(size >= 0 and text is not None, f"{path}: PNG has no ldm metadata; was it made by ldm?")
    check(len(text) <= MAX_METADATA_BYTES, f"{path}: ldm metadata is too large")
    try:
        data = json.loads(text)
        check(isinstance(data, dict), "not an object")
        job = Job.from_dict(data)
        validate(job.settings)
        check(isinstance(data["prompt"], str) and isinstance(data["model"], str), "prompt and model must be text")
        check(isinstance(data["seed"], int) and 0 <= job.seed <= MAX_SEED, "seed out of range")
        return job, data["model"]
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError, LdmError) as e:
        raise LdmError(f"{path}: ldm metadata is damaged ({_first_line(e)})") from None


# ---- writing ----------------------------------------------------------------------------------------

def slug(prompt: str, max_len: int = 48) -> str:
    """A file-name-safe slug: ASCII letters, digits and '-' only, so it cannot escape the folder."""
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode().lower()
    s = re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:max_len].strip("-")
    return "image" if not s or s in WINDOWS_RESERVED else s


def next_index(out_dir: Path) -> int:
    used = [int(m.group(1)) for p in out_dir.iterdir() if (m := re.match(r"(\d{5,})-", p.name))]
    return max(used, default=-1) + 1


def ensure_dir(out_dir: Path) -> Path:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        check(out_dir.is_dir(), f"{out_dir}: output path is not a folder")
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".ldm-probe-", delete=True)
        probe.close()
    except OSError as e:
        raise LdmError(f"{out_dir}: output folder is not writable ({e.strerror or type(e).__name__}); "
                       "choose another with --out") from None
    return out_dir


def save_png(im: Image.Image, path: Path, info=None, overwrite: bool = False) -> Path:
    """Write atomically: a temp file in the same folder, then rename. Never replaces a file unless asked."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            im.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _rename_no_replace(tmp, path)
    except FileExistsError:
        os.unlink(tmp)
        raise
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise LdmError(f"{path}: could not write image ({e.strerror or type(e).__name__})", RUNTIME) from None
    return path


def _rename_no_replace(tmp: str, path: Path) -> None:
    """Move tmp to path, raising FileExistsError if path exists (no race between check and write)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: claim the name exclusively, then replace it
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_image(im: Image.Image, out_dir: Path, name: str, info, overwrite: bool, index: int) -> tuple[Path, int]:
    """Save as {index:05d}-{name}.png at the first free index >= `index`; return (path, next index)."""
    while True:
        path = out_dir / f"{index:05d}-{name}.png"
        try:
            return save_png(im, path, info, overwrite), index + 1
        except FileExistsError:
            index += 1
