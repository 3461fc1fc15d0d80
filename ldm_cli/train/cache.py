"""The latent cache.

With frozen encoders, each image's VAE posterior and each caption's text embedding never change, so
they are computed once and kept on disk: <cache>/<settings key>/img/<image sha256>.safetensors and
.../txt/<caption sha256>.safetensors. The settings key covers the encoders' weights, the resolution
and the crop, so a change in any of them starts a new folder instead of reusing stale entries.
Stored: the posterior's parameters (mean and log-variance), not a sample, so every step still draws
a fresh latent from them exactly as the uncached path does: the two give the same losses.
"""

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldm_cli.io.files import atomic_file, cache_root
from ldm_cli.models.components import Components
from ldm_cli.train.data import Example, load_pixels


def cache_folder(cache_dir: str | None, resolution: int, c: Components) -> Path:
    """The cache folder for these encoders and settings (the layout above)."""
    h = hashlib.blake2b(digest_size=12)
    for module in (c.vae, c.text_encoder):
        for name, p in module.state_dict().items():
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(sorted(c.tokenizer.get_vocab().items())).encode())
    h.update(f"res={resolution} crop=centre maxlen={c.tokenizer.model_max_length}".encode())
    return (Path(cache_dir) if cache_dir else cache_root() / "latents") / h.hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_atomic(tensors: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, overwrite=True) as tmp:  # two processes encoding one entry write equal bytes
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)


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
