"""Shared pieces of the tiny-emoji recipe: backgrounds, captions, composing, the BPE tokenizer."""

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

SIZE = 64  # image size; emoji are 48 px, centred, so the background shows around them
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "red": (210, 40, 40), "orange": (240, 140, 30),
               "yellow": (240, 220, 50), "green": (50, 170, 70), "blue": (40, 90, 220), "purple": (130, 60, 190),
               "pink": (240, 130, 190), "grey": (128, 128, 128)}
BG_NAMES = list(BACKGROUNDS)
BG_RGB = torch.tensor([BACKGROUNDS[n] for n in BG_NAMES], dtype=torch.float32)


def caption(name: str, style: str, background: str) -> str:
    return f"{name}, {style} style, on a {background} background"


def load(npz: Path) -> dict:
    d = np.load(npz)
    return {k: d[k] for k in d.files}


def compose(rgba: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 48, 48, 4] emoji over background indices [N] -> float [N, 3, 64, 64] in [-1, 1]."""
    rgba = rgba.permute(0, 3, 1, 2).float() / 255
    alpha, rgb = rgba[:, 3:], rgba[:, :3]
    back = (BG_RGB.to(rgba.device)[bg] / 255)[:, :, None, None].expand(-1, -1, SIZE, SIZE).clone()
    o = (SIZE - rgba.shape[-1]) // 2
    back[:, :, o:o + rgba.shape[-2], o:o + rgba.shape[-1]] = rgb * alpha + back[:, :, o:o + rgba.shape[-2],
                                                                                o:o + rgba.shape[-1]] * (1 - alpha)
    return back * 2 - 1


def load_scenes(folder: Path, dev, limit: int = 60000) -> tuple[torch.Tensor, list[str]]:
    """A scenes.py folder's pictures (float [N, 3, 64, 64] in [-1, 1] on `dev`, N <= limit, every kind)
    and their captions."""
    from scenes import load_folder

    images, captions = load_folder(folder, limit)
    return torch.from_numpy(images).to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1, captions


# ---- a CLIP-format BPE tokenizer learnt from the captions ------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte-level alphabet: 256 printable stand-ins for the 256 bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


WORD = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""".replace(r"\p{L}", "a-zA-Z")
                  .replace(r"\p{N}", "0-9"))


def train_tokenizer(texts: list[str], folder: Path, merges: int = 1500, max_length: int = 32):
    """Learn `merges` BPE merges (Sennrich et al. 2016) over the captions' words; save vocab.json +
    merges.txt that transformers' CLIPTokenizer reads."""
    from transformers import CLIPTokenizer

    b2u = bytes_to_unicode()
    words = Counter()
    for t in texts:
        for w in WORD.findall(t.lower()):
            sym = [b2u[b] for b in w.encode("utf-8")]
            words[tuple(sym[:-1] + [sym[-1] + "</w>"])] += 1
    learnt = []
    for _ in range(merges):
        pairs = Counter()
        for w, f in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += f
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        learnt.append((a, b))
        merged = Counter()
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += f
        words = merged
    chars = list(b2u.values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in learnt] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(tokens))}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in learnt) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return tok
