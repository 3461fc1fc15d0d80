"""`ldm train` on a generated folder of coloured shapes with the tiny model (CPU)."""

import json
import random

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image, ImageDraw

from ldm_cli import pipeline
from ldm_cli.config import Settings
from ldm_cli.models import load_components
from ldm_cli.train import TrainConfig, train

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 40)}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """32 images: a coloured circle or square on white, kohya-style .txt captions (and 2 bad files)."""
    root = tmp_path_factory.mktemp("shapes")
    rng = random.Random(0)
    for i in range(32):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(["circle", "square"])
        im = Image.new("RGB", (72, 64), "white")
        box = (16 + rng.randint(-4, 4), 12, 52 + rng.randint(-4, 4), 48)
        (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)(box, fill=COLOURS[colour])
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        im.save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text(f"a {colour} {shape}")
    Image.new("RGB", (64, 64)).save(root / "no-caption.png")
    return root


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_finetune_lowers_loss_and_loads_in_diffusers(shapes, tiny_model, tmp_path):
    cfg = TrainConfig(data_dir=str(shapes), model=str(tiny_model), out_dir=str(tmp_path / "run"), max_steps=60,
                      batch_size=4, lr=1e-3, seed=1, device="cpu")
    model_dir = train(cfg)
    ls = losses(tmp_path / "run")
    first, last = np.mean(ls[:10]), np.mean(ls[-10:])
    print(f"fine-tune loss: first 10 steps {first:.4f}, last 10 steps {last:.4f}")
    assert len(ls) == 60 and last < 0.8 * first
    assert "no-caption.png: no caption" in (tmp_path / "run" / "skipped.txt").read_text()
    # Interop: plain diffusers loads the folder, and its DDIM image equals ours.
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    theirs = pipe("a red circle", num_inference_steps=10, guidance_scale=7.5, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(4)).images
    c = load_components(str(model_dir), device="cpu")
    ours = pipeline.txt2img(c, ["a red circle"], [""], [4], Settings(steps=10, width=64, height=64))
    assert np.abs(ours.permute(0, 2, 3, 1).numpy() - theirs).max() <= 1e-5


def test_from_scratch_and_resume_is_bitwise(shapes, tiny_model, tmp_path):
    base = dict(data_dir=str(shapes), model=str(tiny_model), from_scratch=True, unet_config="tiny", max_steps=8,
                batch_size=2, lr=1e-3, seed=3, device="cpu", caption_dropout=0.25)
    straight = train(TrainConfig(out_dir=str(tmp_path / "straight"), **base))
    half = TrainConfig(out_dir=str(tmp_path / "resumed"), **{**base, "max_steps": 4})
    train(half)
    resumed = train(TrainConfig(out_dir=str(tmp_path / "resumed"), **base), resume="latest")
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    a = load_components(str(straight), device="cpu").unet.state_dict()
    b = load_components(str(resumed), device="cpu").unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_cli(ldm, shapes, tiny_model, tmp_path):
    r = ldm("train", shapes, "--model", tiny_model, "--out", tmp_path / "run", "--resolution", 64,
            "--max-steps", 2, "--batch-size", 2, "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "run" / "model")
    s = ldm("sample", "a red circle", "--model", tmp_path / "run" / "model", "--steps", 2, "--out", tmp_path / "o", "-q")
    assert s.returncode == 0, s.stderr
    bad = ldm("train", tmp_path / "nothing", "--model", tiny_model, "--out", tmp_path / "run2")
    expected = f"ldm: error: {tmp_path / 'nothing'}: data folder not found"
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "run2").exists()
