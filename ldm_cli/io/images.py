"""Images in and out: loading init images, tensors <-> PIL, grids, output file names."""

import re
import struct
import unicodedata
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ldm_cli.errors import RUNTIME, LdmError, check
from ldm_cli.io.files import atomic_file

MAX_SIDE = 8192
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # refuse larger images instead of decompressing them (decompression bombs)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# What PIL raises on damaged files besides OSError: a PNG with a cut-short header gives ValueError or
# SyntaxError, a broken compressed stream zlib.error, a short chunk struct.error (all found by fuzzing).
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error)
WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def _regular_file(path: Path) -> None:
    """Only regular files are opened: a FIFO would hang, a device never end."""
    check(path.exists(), f"{path}: no such image file")
    check(path.is_file(), f"{path}: not a regular file (a pipe, device or folder); give an image file")


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB, upright by its EXIF orientation, with one clear error for
    anything unreadable."""
    path = Path(path)
    _regular_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's own limit, as an error
            with Image.open(path) as im:
                check(im.width * im.height <= MAX_PIXELS,  # ours, from the header, before decoding
                      f"{path}: image is larger than {MAX_PIXELS} pixels; resize it first")
                im.seek(0)  # first frame of an animation
                im.load()
                return _to_rgb(ImageOps.exif_transpose(im))  # phone photos: stored sideways, EXIF says how
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise LdmError(f"{path}: image is larger than {MAX_PIXELS} pixels; resize it first") from None
    except FileNotFoundError:
        raise LdmError(f"{path}: no such image file") from None
    except UNREADABLE as e:
        raise LdmError(f"{path}: cannot read image ({first_line(e)})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale to 8 bits instead of clipping
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray((arr / max(arr.max(), 1) * 255).round().astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the header only, upright (EXIF orientation), with the same errors as open_image."""
    _regular_file(Path(path))
    try:
        with warnings.catch_warnings():  # the header alone is read; the size is checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated a quarter turn
                    w, h = h, w
    except Image.DecompressionBombError:  # PIL refuses past 2x its own limit before we see the size
        raise LdmError(f"{path}: image is larger than {MAX_PIXELS} pixels; resize it first") from None
    except FileNotFoundError:
        raise LdmError(f"{path}: no such image file") from None
    except UNREADABLE as e:
        raise LdmError(f"{path}: cannot read image ({first_line(e)})") from None
    check(w * h <= MAX_PIXELS, f"{path}: image is larger than {MAX_PIXELS} pixels; resize it first")
    check(w >= 8 and h >= 8, f"{path}: image is {w}x{h}; img2img needs at least 8x8 pixels")
    check(w <= MAX_SIDE and h <= MAX_SIDE, f"{path}: image is {w}x{h}; sides up to {MAX_SIDE} pixels are "
          "supported: resize it first")
    return w, h


def list_images(path: str | Path) -> list[str]:
    """IMAGE arguments may be a folder: its images, sorted by name (not recursive)."""
    p = Path(path)
    if p.is_dir():
        found = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        check(found != [], f"{p}: folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        return found
    check(p.exists(), f"{p}: no such image file or folder")
    _regular_file(p)
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


def grid_size(images: list[Image.Image]) -> tuple[int, int]:
    cols = int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    return cols * images[0].size[0], rows * images[0].size[1]


def grid(images: list[Image.Image]) -> Image.Image:
    cols = int(np.ceil(np.sqrt(len(images))))
    w, h = images[0].size
    out = Image.new("RGB", grid_size(images), "white")
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out


# ---- writing ----------------------------------------------------------------------------------------

def slug(prompt: str, max_len: int = 48) -> str:
    """A file-name-safe slug: ASCII letters, digits and '-' only, so it cannot escape the folder."""
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode().lower()
    s = re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:max_len].strip("-")
    return "image" if not s or s in WINDOWS_RESERVED else s


def next_index(out_dir: Path) -> int:
    used = [int(m.group(1)) for p in out_dir.iterdir() if (m := re.match(r"(\d{5,})-", p.name))]
    return max(used, default=-1) + 1


def save_png(im: Image.Image, path: Path, info=None, overwrite: bool = False) -> Path:
    """Write atomically (io.files.atomic_file). Never replaces a file unless asked (FileExistsError)."""
    try:
        with atomic_file(path, overwrite) as tmp:
            im.save(tmp, format="PNG", pnginfo=info)
    except FileExistsError:
        raise
    except OSError as e:
        raise LdmError(f"{path}: could not write image ({e.strerror or type(e).__name__})", RUNTIME) from None
    return path


def write_image(im: Image.Image, out_dir: Path, name: str, info, overwrite: bool, index: int) -> tuple[Path, int]:
    """Save as {index:05d}-{name}.png at the first free index >= `index`; return (path, next index)."""
    while True:
        path = out_dir / f"{index:05d}-{name}.png"
        try:
            return save_png(im, path, info, overwrite), index + 1
        except FileExistsError:
            index += 1
