"""The latent cache.

With frozen encoders, each image's VAE posterior and each caption's text embedding never change, so
they are computed once and kept on disk: <cache>/<settings key>/img/<image sha256>.safetensors (with
buckets, <image sha256>-<W>x<H>.safetensors: keyed by the bucket too) and .../txt/<caption sha256>.safetensors.
The settings key covers the encoders' weights, the resolution and the crop, so a change in any of them
starts a new folder instead of reusing stale entries; a bucketed entry's name holds its bucket.
Stored: the posterior's parameters (mean and log-variance), not a sample, so every step still draws
a fresh latent from them exactly as the uncached path does: the two give the same losses.
Large images to encode are decoded, and their new entries written, by a pool of threads, each taking a run of
neighbours (PIL's decoding lets go of the GIL); small images (under THREADED_FROM_PIXELS) and captions in one
thread, where threads measured slower; hashing and loading stay in the calling thread, as do the encoders, in
batches.
"""

import hashlib
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from ldm_cli.errors import LdmError
from ldm_cli.io.files import atomic_file, cache_root
from ldm_cli.models.components import Components
from ldm_cli.train.data import Example, load_pixels


def cache_folder(cache_dir: str | None, resolution: int, c: Components) -> Path:
    """The cache folder for these encoders and settings (the layout above)."""
    h = hashlib.blake2b(digest_size=12)
    for module in (m for m in (c.vae, c.text_encoder, c.text_encoder_2) if m is not None):
        for name, p in module.state_dict().items():
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy())  # its buffer: no copy to bytes
    for tok in (t for t in (c.tokenizer, c.tokenizer_2) if t is not None):
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
        h.update(f"maxlen={tok.model_max_length}".encode())
    h.update(f"res={resolution} crop=centre".encode())
    return (Path(cache_dir) if cache_dir else cache_root() / "latents") / h.hexdigest()


# Images at least this large are decoded (and their entries written) in all the pool's threads; smaller ones in
# one: PIL lets go of the GIL while it decodes, which pays at 512 px (150 images: 1.7 s in 2 threads, 3.0 s in one)
# but not at 64 px, where the Python around each image holds it (4,000 images: 3.8 s in 2 threads, 2.7 s in one).
THREADED_FROM_PIXELS = 256 * 256


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sha256_or_error(path: Path) -> str | OSError:
    try:
        return file_sha256(path)
    except OSError as e:
        return e


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_atomic(tensors: dict, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # two processes encoding one entry write equal bytes; no fsync: a damaged entry is found on load and
        # encoded again, and the fsync doubled a write (0.53 vs 0.24 ms on a laptop disk; a 146k-entry cache
        # took 164 s to build on a GPU machine)
        with atomic_file(path, overwrite=True, durable=False) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
    except (OSError, SafetensorError) as e:
        reason = getattr(e, "strerror", None) or str(e)[:120]
        raise LdmError(f"{path.parent.parent}: cannot write the latent cache ({reason}); free some space, "
                       "choose another --cache-dir, or train with --no-cache", 1) from None


@dataclass
class EncodedData:
    """In memory for the run: posterior parameters per image and embeddings per caption ('' included)."""
    moments: dict[Path, torch.Tensor]
    context: dict[str, torch.Tensor | tuple]  # SDXL: (token states, pooled embedding)
    encoded: int  # entries computed in this run (0 when the cache had everything)
    seconds: float
    skipped: list[str]  # images that could not be read: left out of the run


def _load_entry(path: Path, keys: tuple[str, ...]):
    """A cache entry (a tensor, or a tuple for several keys), or None if it is missing or damaged (then
    it is encoded again and rewritten)."""
    if not path.is_file():
        return None
    try:  # read into memory: load_file keeps a file mapping per entry, and past ~65k (vm.max_map_count) the
        entry = load(path.read_bytes())  # process can start no thread (a 60k-image folder hung on resume)
        tensors = tuple(entry[k] for k in keys)
    except Exception:  # noqa: BLE001 (a cut-short or corrupt file: any safetensors/OS error)
        return None
    if not all(torch.isfinite(t).all() for t in tensors):
        return None
    return tensors if len(keys) > 1 else tensors[0]


def _prepared(prepare, value):
    """(prepare(value), None), or (None, the message) when the input cannot be read."""
    try:
        return prepare(value), None
    except LdmError as e:
        return None, str(e)


def _map_in_parts(pool, fn, items: list, parts: int) -> list:
    """[fn(x) for x in items], the list cut into `parts` runs of neighbours, each run in one thread: one task
    per item cost more than a small item's work (64 px PNGs: 4.7 s with a task each against 4.1 s in one thread)."""
    size = max(1, -(-len(items) // max(1, parts)))
    runs = pool.map(lambda run: [fn(x) for x in run], [items[i:i + size] for i in range(0, len(items), size)])
    return [y for run in runs for y in run]


def _load_or_encode(items: dict, keys: tuple[str, ...], prepare, encode, batch_size: int, pool, parts: int = 1):
    """items: {id: (cache file, input)}. Cached entries are loaded; the rest are prepared with `prepare`
    (an LdmError there skips the item, with its message), encoded in batches with `encode` (a tensor, or a
    tuple of one per key), stored, and counted. Returns ({id: tensor or tuple}, number encoded, skip messages)."""
    out, todo, skipped = {}, [], []
    for ident, (path, value) in items.items():  # in this thread: threads made it slower (the GIL)
        tensor = _load_entry(path, keys)
        if tensor is not None:
            out[ident] = tensor
        else:
            todo.append((ident, path, value))
    for i in range(0, len(todo), batch_size):
        ready = []
        chunk = todo[i:i + batch_size]
        prepared = _map_in_parts(pool, lambda t: _prepared(prepare, t[2]), chunk, parts)
        for (ident, path, _), (value, error) in zip(chunk, prepared):
            if error is None:
                ready.append((ident, path, value))
            else:
                skipped.append(error)
        if not ready:
            continue
        encoded = encode([v for _, _, v in ready])
        rows = [tuple(t.cpu() for t in row) for row in
                (zip(*encoded) if isinstance(encoded, tuple) else ((t,) for t in encoded))]
        _map_in_parts(pool, lambda r: _write_atomic(dict(zip(keys, r[1])), r[0][1]), list(zip(ready, rows)), parts)
        for (ident, _, _), row in zip(ready, rows):
            out[ident] = row if len(keys) > 1 else row[0]
    return out, len(todo) - len(skipped), skipped


def encode_dataset(examples: list[Example], folder: Path, resolution: int, encode_pixels, encode_captions,
                   batch_size: int = 8, pooled: bool = False, texts: bool = True) -> EncodedData:
    """Load what `folder` has, encode (in batches) and store what it lacks, return it all (the captions
    too unless not `texts`). Images that cannot be read are left out and listed in `skipped`."""
    t0 = time.perf_counter()
    workers = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's own default
    with ThreadPoolExecutor(workers) as pool:
        groups: dict = {}  # one shape per encoder batch: examples grouped by bucket
        skipped = []
        for ex, digest in zip(examples, map(_sha256_or_error, (ex.path for ex in examples))):
            if isinstance(digest, OSError):
                skipped.append(f"{ex.path}: cannot read ({digest.strerror or type(digest).__name__})")
                continue
            tag = f"-{ex.bucket[0]}x{ex.bucket[1]}" if ex.bucket else ""
            groups.setdefault(ex.bucket, {})[ex.path] = (folder / "img" / f"{digest}{tag}.safetensors", ex)
        moments, n_img, bad = {}, 0, []
        for bucket, images in sorted(groups.items(), key=lambda kv: kv[0] or (0, 0)):
            w, h = bucket or (resolution, resolution)
            parts = workers if w * h >= THREADED_FROM_PIXELS else 1
            got, n, failed = _load_or_encode(images, ("moments",),
                                             lambda ex: load_pixels(ex, resolution, random.Random(0)),
                                             lambda pixels: encode_pixels(torch.stack(pixels)), batch_size, pool,
                                             parts)
            moments.update(got)
            n_img, bad = n_img + n, bad + failed
        captions = {cap: (folder / "txt" / f"{text_sha256(cap)}.safetensors", cap)
                    for cap in (sorted({ex.caption for ex in examples} | {""}) if texts else ())}
        keys = ("context", "pooled") if pooled else ("context",)  # SDXL: token states and the pooled embedding
        context, n_txt, _ = _load_or_encode(captions, keys, lambda cap: cap, encode_captions, batch_size, pool)
    return EncodedData(moments, context, n_img + n_txt, time.perf_counter() - t0, skipped + bad)
