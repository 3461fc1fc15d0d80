"""`ldm train --textual-inversion TOKEN --init-word WORD`: only the new token's vectors train, the file
loads in diffusers' `load_textual_inversion` and in `ldm sample --embedding`, resume is bitwise."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from ldm_cli.jobs import Settings
from ldm_cli.models.load import load_components
from ldm_cli.models.options import LoadOptions
from ldm_cli.sample import pipeline
from ldm_cli.sample.run import load
from ldm_cli.train.config import TrainConfig
from ldm_cli.train.inversion import WithNewTokens
from ldm_cli.train.loop import train


@pytest.fixture(scope="module")
def stars(tmp_path_factory):
    """8 images of a purple star on grey, no captions (they train on the instance prompt: the token)."""
    root = tmp_path_factory.mktemp("stars")
    for i in range(8):
        im = Image.new("RGB", (64, 64), (128, 128, 128))
        cx, cy, r = 32 + (i % 3) - 1, 32 + (i % 2), 20 + i % 4
        points = [(cx + (r if k % 2 == 0 else r // 2) * np.cos(k * np.pi / 5 - np.pi / 2),
                   cy + (r if k % 2 == 0 else r // 2) * np.sin(k * np.pi / 5 - np.pi / 2)) for k in range(10)]
        ImageDraw.Draw(im).polygon(points, fill=(150, 40, 200))
        im.save(root / f"{i}.png")
    return root


def ti_config(stars, tiny_model, tmp_path, **kw):
    return TrainConfig(**{**dict(data_dir=str(stars), model=str(tiny_model), out_dir=str(tmp_path / "run"),
                                 textual_inversion="zqx", init_word="square", vectors=2, max_steps=30, batch_size=4,
                                 seed=0, device="cpu", cache_dir=str(tmp_path / "cache")), **kw})


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_new_token_table_equals_a_resized_table_forward_and_backward():
    """The wrapper reads the vectors for the new ids and the table elsewhere; its gradient reaches only the
    vectors, equal to the gradient of those rows in a plain table grown by N rows."""
    torch.manual_seed(0)
    base = torch.nn.Embedding(10, 6).requires_grad_(False)
    vectors = torch.randn(3, 6)
    ours = WithNewTokens(base, 10, vectors)
    plain = torch.nn.Embedding(13, 6)
    with torch.no_grad():
        plain.weight.copy_(torch.cat([base.weight, vectors]))
    ids = torch.tensor([[0, 10, 4, 12, 11, 9], [11, 11, 2, 3, 10, 0]])
    weight = torch.randn(2, 6, 6)
    assert torch.equal(ours(ids), plain(ids))
    (ours(ids) * weight).sum().backward()
    (plain(ids) * weight).sum().backward()
    assert torch.allclose(ours.vectors.grad, plain.weight.grad[10:], atol=1e-6)
    assert ours.vectors.grad.abs().min() > 0 and base.weight.grad is None


def test_textual_inversion_trains_its_vectors_only_and_loads_in_diffusers(stars, tiny_model, tmp_path):
    out = train(ti_config(stars, tiny_model, tmp_path))
    assert out == tmp_path / "run" / "embedding" and sorted(p.name for p in out.iterdir()) == ["zqx.safetensors"]
    saved = load_file(out / "zqx.safetensors")
    assert list(saved) == ["zqx"] and saved["zqx"].shape == (2, 32) and saved["zqx"].dtype == torch.float32
    c0 = load_components(str(tiny_model), device="cpu")
    square = c0.text_encoder.get_input_embeddings().weight[c0.tokenizer("square", add_special_tokens=False).input_ids[0]]
    moved = (saved["zqx"] - square).norm(dim=1)
    print(f"textual inversion: vectors moved {moved.tolist()} from 'square' (norm {square.norm():.3f})")
    assert (moved > 0.05).all()  # both vectors trained away from the init word
    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    assert list(load_file(ckpt / "trainable.safetensors")) == ["vectors"]  # no U-Net or table rows kept
    assert len(losses(tmp_path / "run")) == 30

    # diffusers reads the file (tokens zqx, zqx_1), and its image equals ldm's with --embedding
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_textual_inversion(str(out / "zqx.safetensors"))
    theirs = pipe("a zqx", num_inference_steps=8, guidance_scale=7.5, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(3)).images
    c = load(LoadOptions(model=str(tiny_model), device="cpu", dtype="fp32", accel="none",
                         embedding=(str(out / "zqx.safetensors"),))).components
    s = Settings(steps=8, width=64, height=64, prompt_syntax="plain")
    ours = pipeline.txt2img(c, ["a zqx"], [""], [3], s).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - theirs).max() <= 1e-5
    without = pipeline.txt2img(c0, ["a square"], [""], [3], s).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - without).max() > 1e-3  # the trained token draws something else than its init word


def test_textual_inversion_resume_is_bitwise(stars, tiny_model, tmp_path):
    base = dict(ema=True, max_steps=6, gradient_accumulation=2, batch_size=2)
    straight = train(ti_config(stars, tiny_model, tmp_path / "a", **base))
    train(ti_config(stars, tiny_model, tmp_path / "b", **{**base, "max_steps": 3}))
    resumed = train(ti_config(stars, tiny_model, tmp_path / "b", **base), resume="latest")
    assert losses(tmp_path / "a" / "run") == losses(tmp_path / "b" / "run")
    for kind in ("embedding", "embedding-ema"):
        a = load_file(straight.parent / kind / "zqx.safetensors")["zqx"]
        b = load_file(resumed.parent / kind / "zqx.safetensors")["zqx"]
        assert torch.equal(a, b)


@pytest.mark.slow
def test_textual_inversion_cli_then_sample_records_it(stars, tiny_model, tmp_path, ldm, ldm_here):
    r = ldm("train", stars, "--model", tiny_model, "--textual-inversion", "zqx", "--init-word", "square",
            "--max-steps", 4, "--batch-size", 2, "--device", "cpu", "--out", tmp_path / "run", "-q",
            "--cache-dir", tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    file = tmp_path / "run" / "embedding" / "zqx.safetensors"
    assert r.stdout.strip() == str(file.parent)
    r = ldm_here("sample", "a zqx", "--model", tiny_model, "--embedding", file, "--steps", 2, "--out", tmp_path / "img")
    assert r.returncode == 0, r.stderr
    png = next((tmp_path / "img").glob("*.png"))
    meta = Image.open(png).text
    assert "zqx@" in json.dumps(meta)
