"""The shipped embedded model: `ldm sample` and `ldm img2img` with no --model, on CPU, end to end.

"Recognisable" is checked with the model's own CLIP image tower: the picture must be closer to its
emoji's name than to nine other names, with style and background held fixed.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm_cli.models.defaults import EMBEDDED_MODEL, default_model
from ldm_cli.models.load import load_components

NAMES = ["cat face", "dog face", "red apple", "rocket", "grinning face", "banana", "house", "fire", "heart",
         "pizza"]


@pytest.fixture(scope="module")
def scorer():
    from transformers import CLIPVisionModelWithProjection

    c = load_components(str(EMBEDDED_MODEL), device="cpu", dtype="fp32")
    tower = CLIPVisionModelWithProjection.from_pretrained(EMBEDDED_MODEL / "clip_image_tower").float().eval()
    proj = load_file(EMBEDDED_MODEL / "clip_image_tower" / "text_projection.safetensors")["weight"].float()

    @torch.no_grad()
    def best_name(path, style_and_background: str) -> str:
        pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1)
        img = tower(pixel_values=pixels.permute(2, 0, 1)[None]).image_embeds[0]
        captions = [f"{n}, {style_and_background}" for n in NAMES]
        ids = c.tokenizer(captions, padding="max_length", max_length=c.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
        txt = c.text_encoder(ids).pooler_output @ proj.T
        sims = torch.nn.functional.normalize(txt, dim=-1) @ torch.nn.functional.normalize(img, dim=0)
        return NAMES[int(sims.argmax())]

    return best_name


def test_embedded_model_is_the_default():
    assert default_model() == str(EMBEDDED_MODEL)
    size = sum(p.stat().st_size for p in EMBEDDED_MODEL.rglob("*") if p.is_file())
    assert size <= 40_000_000, f"embedded model is {size / 1e6:.1f} MB"


@pytest.mark.slow
def test_sample_with_no_model_draws_the_prompt(ldm, tmp_path, scorer):
    # six seeds a prompt, a majority of them named right: one seed is a sample of one. The scorer (the first
    # edition's CLIP) called two of the second edition's six cats pizza where the independent judge of
    # docs/performance.md named all six cat face; a model drawing blobs passes 4 of 6 by chance 0.1% of the time
    cases = [("cat face", "3d style, on a blue background"), ("red apple", "flat style, on a white background")]
    r = ldm("sample", *[f"{name}, {rest}" for name, rest in cases], "-n", "6", "--seed", "1", "--out", tmp_path,
            "--json")
    assert r.returncode == 0, r.stderr
    written = json.loads(r.stdout)
    assert [(w["width"], w["height"]) for w in written] == [(64, 64)] * 12
    for k, (name, rest) in enumerate(cases):
        named = [scorer(w["path"], rest) for w in written[6 * k:6 * k + 6]]
        assert named.count(name) >= 4, (name, named)
    for w in written[:6]:
        blue = np.asarray(Image.open(w["path"]), dtype=np.float32)[:4].mean(axis=(0, 1))  # top rows: background
        assert blue[2] > blue[0] + 50, (w["path"], blue)


@pytest.mark.slow
def test_img2img_with_embedded_model_changes_the_background(ldm_here, tmp_path, scorer):
    first = ldm_here("sample", "cat face, flat style, on a white background", "--seed", "3", "--out", tmp_path / "a",
                     "--json")
    assert first.returncode == 0, first.stderr
    src = json.loads(first.stdout)[0]["path"]
    # cfg 7.5 pinned: with the model's default (ldm_defaults.json, cfg 5) the weights shipped before turned this
    # background blue for 1 seed of 1-6, at 7.5 for 2 (seeds 1 and 4); the shipped ones for all six at both
    r = ldm_here("img2img", src, "cat face, flat style, on a blue background", "--strength", "0.9", "--seed", "4",
                 "--cfg", "7.5", "--out", tmp_path / "b", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)[0]["path"]
    before = np.asarray(Image.open(src), dtype=np.float32)[:4].mean(axis=(0, 1))
    after = np.asarray(Image.open(out), dtype=np.float32)[:4].mean(axis=(0, 1))
    assert after[2] - after[0] > before[2] - before[0] + 50, (before, after)  # the background turned blue
    assert scorer(out, "flat style, on a blue background") == "cat face"
