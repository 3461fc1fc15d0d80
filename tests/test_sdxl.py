"""SDXL: ours equals diffusers' StableDiffusionXL(Img2Img)Pipeline on tiny random SDXL models (two text
encoders, text_time addition embedding; a refiner-shaped model for img2img), same seeds, fp32 CPU."""

import functools
import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from ldm_cli.io.images import pil_to_pixels
from ldm_cli.jobs import Settings
from ldm_cli.models.load import load_components
from ldm_cli.sample import pipeline

TOL = 1e-5
SCHEDULERS = {"ddim": (DDIMScheduler, {}), "euler": (EulerDiscreteScheduler, {}),
              "dpm++2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True})}


@functools.cache
def ours_loaded(model_dir):
    return load_components(str(model_dir), device="cpu", dtype="fp32")


@functools.cache
def reference(model_dir, cls):
    pipe = cls.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)


def theirs(model_dir, cls, sampler, **kw):
    pipe, config = reference(model_dir, cls)
    scheduler_cls, extra = SCHEDULERS[sampler]
    pipe.scheduler = scheduler_cls.from_config(config, **extra)
    return pipe(generator=torch.Generator("cpu").manual_seed(kw.pop("seed")), output_type="np", **kw).images


def init_image():
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def test_loads_as_sdxl(tiny_sdxl, tiny_sdxl_refiner):
    c, r = ours_loaded(tiny_sdxl), ours_loaded(tiny_sdxl_refiner)
    assert (c.family, c.force_zeros_for_empty_prompt, c.requires_aesthetics_score) == ("sdxl", True, False)
    assert (r.family, r.text_encoder, r.requires_aesthetics_score) == ("sdxl-refiner", None, True)


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@pytest.mark.parametrize("negative", ["", "blurry"])
def test_txt2img_matches_diffusers(tiny_sdxl, sampler, negative):
    s = Settings(steps=6, cfg=5.0, width=64, height=64, negative=negative, sampler=sampler,
                 schedule="karras" if sampler == "dpm++2m" else "default")
    ours = pipeline.txt2img(ours_loaded(tiny_sdxl), ["a red cat"], [negative], [7], s).permute(0, 2, 3, 1).numpy()
    ref = theirs(tiny_sdxl, StableDiffusionXLPipeline, sampler, prompt="a red cat", negative_prompt=negative or None,
                 num_inference_steps=6, guidance_scale=5.0, height=64, width=64, seed=7)
    assert ours.shape == ref.shape == (1, 64, 64, 3)
    assert np.abs(ours - ref).max() <= TOL


def test_micro_conditioning_matches_diffusers(tiny_sdxl):
    s = Settings(steps=5, cfg=6.0, width=64, height=64, original_size="128x96", crops_coords_top_left="8,4",
                 target_size="48x64")
    c = ours_loaded(tiny_sdxl)
    ours = pipeline.txt2img(c, ["a dog"], [""], [3], s).permute(0, 2, 3, 1).numpy()
    ref = theirs(tiny_sdxl, StableDiffusionXLPipeline, "ddim", prompt="a dog", num_inference_steps=5, guidance_scale=6.0,
                 height=64, width=64, original_size=(96, 128), crops_coords_top_left=(8, 4), target_size=(64, 48), seed=3)
    plain = pipeline.txt2img(c, ["a dog"], [""], [3], Settings(steps=5, cfg=6.0, width=64, height=64))
    assert np.abs(ours - ref).max() <= TOL
    assert np.abs(ours - plain.permute(0, 2, 3, 1).numpy()).max() > 100 * TOL  # the numbers reach the U-Net


@pytest.mark.parametrize("model", ["tiny_sdxl", "tiny_sdxl_refiner"])
@pytest.mark.parametrize("negative", ["", "ugly"])
def test_img2img_matches_diffusers(model, negative, request):
    folder = request.getfixturevalue(model)
    s = Settings(steps=10, cfg=5.0, width=64, height=64, strength=0.6, negative=negative)
    ours = pipeline.img2img(ours_loaded(folder), [pil_to_pixels(init_image(), 64, 64)], ["a red dog"], [negative], [5], s)
    ref = theirs(folder, StableDiffusionXLImg2ImgPipeline, "ddim", prompt="a red dog", image=init_image(),
                 negative_prompt=negative or None, strength=0.6, num_inference_steps=10, guidance_scale=5.0, seed=5)
    assert np.abs(ours.permute(0, 2, 3, 1).numpy() - ref).max() <= TOL


def test_cli_sample_and_info(ldm, tiny_sdxl, tiny_model, tmp_path):
    r = ldm("info", tiny_sdxl, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["family"] == "sdxl"
    r = ldm("sample", "a cat", "--model", tiny_sdxl, "--steps", 3, "--seed", 1, "--original-size", "128x128",
            "--out", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)[0]
    assert Image.open(made["path"]).size == (64, 64) and made["original_size"] == "128x128"
    r = ldm("sample", "a cat", "--model", tiny_model, "--steps", 1, "--original-size", "128x128", "--out", tmp_path)
    assert r.returncode == 2 and "not SDXL" in r.stderr and r.stderr.count("\n") == 1
