"""Mutation fuzzing with a fixed budget: the prompt-file reader and the PNG-metadata reader, fed
mutated copies of valid inputs, may only return or raise LdmError with a one-line message naming the
file. Deterministic (seeded), so a failure reproduces; LDM_FUZZ_ITERATIONS sets the budget per target
(CI: the default). The hypothesis tests in test_untrusted.py and test_prompts.py cover the same
readers from generated (not mutated) input."""

import io
import json
import os
import random
import struct
import warnings
import zlib

import pytest
from PIL import Image, PngImagePlugin

from ldm_cli.errors import LdmError
from ldm_cli.io.images import image_size, open_image
from ldm_cli.io.metadata import read_png_job
from ldm_cli.io.prompts import read_prompt_file

ITERATIONS = int(os.environ.get("LDM_FUZZ_ITERATIONS", "3000"))

# Pieces a mutator splices in: the syntax of both formats, and values at the edges of what they allow.
TOKENS = [b"|", b"=", b" seed=", b" cfg=", b" steps=", b" negative=", b" width=", b"#", b"\n", b"\r\n", b"\x00",
          b"\xff", b"\xef\xbb\xbf", b"\xc3", b"{", b"}", b"[", b"]", b'"', b'"prompt"', b":", b",", b"null", b"true",
          b"1e999", b"-1", b"0", b"NaN", b"Infinity", b"9" * 40, b"[" * 5000, b"{\"a\":" * 3000, b"\\u0000",
          b"\\ud800", "日本".encode(), b"\t", b" " * 100]

PROMPT_SEEDS = {
    ".txt": b"# prompts\na red apple\na cat face | seed=7 cfg=4 negative=blurry, low quality\n\nx | steps=10\n",
    ".jsonl": b'{"prompt": "a | b", "seed": 7}\n{"prompt": "cat", "cfg": 3.5, "negative": "dog"}\n',
}


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random edits: flip, insert a token, delete a span, duplicate a span, truncate."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op, pos = rng.randrange(5), rng.randint(0, len(b))
        if op == 0 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[pos:pos] = rng.choice(TOKENS)
        elif op == 2:
            del b[pos:pos + rng.randint(1, 16)]
        elif op == 3:
            b[pos:pos] = b[pos:pos + rng.randint(1, 64)] * rng.randint(1, 50)
        else:
            del b[pos:]
    return bytes(b)


def check_one(reader, path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning would be a second line on the user's terminal
            reader(path)
    except LdmError as e:
        message = str(e)
        assert "\n" not in message and str(path) in message, message
        return "refused"
    return "read"


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_fuzz_prompt_file_reader(tmp_path, suffix):
    rng, path, seen = random.Random(f"prompts{suffix}"), tmp_path / f"p{suffix}", {"read": 0, "refused": 0}
    for i in range(ITERATIONS):
        data = mutate(PROMPT_SEEDS[suffix], rng)
        path.write_bytes(data)
        try:
            seen[check_one(read_prompt_file, path)] += 1
        except Exception as e:  # noqa: BLE001 - the point: anything but LdmError is a crash
            pytest.fail(f"iteration {i}: {type(e).__name__}: {e} on input {data[:200]!r}")
    print(f"prompt file {suffix}: {ITERATIONS} mutated inputs, {seen['read']} read, {seen['refused']} refused, 0 crashes")
    assert seen["read"] > 0 and seen["refused"] > 0  # the mutator reaches both sides


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def png_bytes(chunks) -> bytes:
    out = b"\x89PNG\r\n\x1a\n"
    for kind, body in chunks:
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return out


def seed_pngs() -> list[bytes]:
    job = {"prompt": "a cat face", "negative": "", "seed": 7, "model": "m", "steps": 10, "cfg": 7.5, "eta": 0.0,
           "width": 64, "height": 64}
    out = []
    for add in ("add_itxt", "add_text"):
        for compress in (False, True):
            info = PngImagePlugin.PngInfo()
            getattr(info, add)("ldm", json.dumps(job), zip=compress)
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), "red").save(buf, format="PNG", pnginfo=info)
            out.append(buf.getvalue())
    return out


def mutate_png(data: bytes, rng: random.Random) -> bytes:
    """Mutate inside one chunk and fix its CRC (so the reader gets past the checksum), or mutate raw."""
    if rng.random() < 0.2:
        return mutate(data, rng)
    chunks = png_chunks(data)
    k = rng.randrange(len(chunks))
    kind, body = chunks[k]
    if kind in (b"zTXt", b"iTXt") and rng.random() < 0.3:  # a compressed text bomb or garbage stream
        head = body[:body.index(b"\0") + (3 if kind == b"iTXt" else 2)] if b"\0" in body else body
        body = head + zlib.compress(b"{" * rng.choice([10, 10**5, 10**7]), 9)
    else:
        body = mutate(body, rng)
    chunks[k] = (kind, body)
    if rng.random() < 0.1:
        chunks.insert(rng.randrange(len(chunks)), chunks[k])
    return png_bytes(chunks)


def test_fuzz_png_metadata_reader(tmp_path):
    rng, path, seen = random.Random("png"), tmp_path / "x.png", {"read": 0, "refused": 0}
    pixels = {"read": 0, "refused": 0}
    seeds = seed_pngs()
    for s in seeds:
        path.write_bytes(s)
        assert check_one(read_png_job, path) == "read"  # the seeds are valid
    for i in range(ITERATIONS):
        data = mutate_png(rng.choice(seeds), rng)
        path.write_bytes(data)
        try:
            seen[check_one(read_png_job, path)] += 1
            pixels[check_one(image_size, path)] += 1  # the same files as img2img inputs
            pixels[check_one(open_image, path)] += 1
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"iteration {i}: {type(e).__name__}: {e} on input {data[:200]!r}")
    print(f"PNG: {ITERATIONS} mutated files; metadata {seen['read']} read, {seen['refused']} refused; "
          f"as images {pixels['read']} read, {pixels['refused']} refused; 0 crashes")
    assert seen["read"] > 0 and seen["refused"] > 0 and pixels["refused"] > 0
