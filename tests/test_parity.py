"""Golden comparisons: our DDIM + guidance equals diffusers' own pipelines on the same tiny weights."""

import functools
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from ldm_cli.diffusion.schedule import schedule_from_config
from ldm_cli.jobs import Settings
from ldm_cli.models.load import load_components
from ldm_cli.sample import pipeline

TOL = 1e-5


@functools.cache
def ours_loaded(model_dir):
    return load_components(str(model_dir), device="cpu", dtype="fp32")


@functools.cache
def reference(model_dir, cls=StableDiffusionPipeline):
    pipe = cls.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours_vs_theirs(model_dir, prompt, negative, seed, steps, cfg, eta):
    c = ours_loaded(model_dir)
    s = Settings(steps=steps, cfg=cfg, eta=eta, width=64, height=64, negative=negative)
    ours = pipeline.txt2img(c, [prompt], [negative], [seed], s)
    ours = ours.permute(0, 2, 3, 1).numpy()
    pipe = reference(model_dir)
    theirs = pipe(prompt, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=cfg,
                  eta=eta, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                  height=64, width=64).images
    return ours, theirs


@pytest.mark.parametrize("steps", [1, 10, 50])
@pytest.mark.parametrize("cfg", [1.0, 7.5])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("negative", ["", "blurry dog"])
def test_txt2img_matches_diffusers_epsilon(tiny_model, steps, cfg, eta, negative):
    ours, theirs = ours_vs_theirs(tiny_model, "a red cat", negative, 1234, steps, cfg, eta)
    assert ours.shape == theirs.shape == (1, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= TOL


@pytest.mark.parametrize("steps", [1, 10, 50])
@pytest.mark.parametrize("cfg", [1.0, 7.5])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("negative", ["", "dog"])
def test_txt2img_matches_diffusers_v_prediction(tiny_v_model, steps, cfg, eta, negative):
    ours, theirs = ours_vs_theirs(tiny_v_model, "a dog", negative, 7, steps, cfg, eta)
    assert np.abs(ours - theirs).max() <= TOL


def test_parity_is_not_vacuous(tiny_model):
    """Different seeds or guidance give different images, so the tolerance above means something."""
    a, _ = ours_vs_theirs(tiny_model, "a red cat", "", 1, 10, 7.5, 0.0)
    b, _ = ours_vs_theirs(tiny_model, "a red cat", "", 2, 10, 7.5, 0.0)
    c, _ = ours_vs_theirs(tiny_model, "a red cat", "", 1, 10, 1.0, 0.0)
    assert np.abs(a - b).max() > 100 * TOL
    assert np.abs(a - c).max() > 100 * TOL


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_img2img_matches_diffusers(tiny_model, strength, eta):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    c = ours_loaded(tiny_model)
    s = Settings(steps=20, cfg=7.5, eta=eta, width=64, height=64, negative="", strength=strength)
    from ldm_cli.io.images import pil_to_pixels

    ours = pipeline.img2img(c, [pil_to_pixels(init, 64, 64)], ["a red cat"], [""], [99], s)
    pipe = reference(tiny_model, StableDiffusionImg2ImgPipeline)
    theirs = pipe("a red cat", image=init, strength=strength, num_inference_steps=20, guidance_scale=7.5,
                  eta=eta, generator=torch.Generator("cpu").manual_seed(99), output_type="np").images
    assert np.abs(ours.permute(0, 2, 3, 1).numpy() - theirs).max() <= TOL


@pytest.mark.parametrize("config", [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="linear"),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
         timestep_spacing="trailing"),
])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_schedule_matches_diffusers(config, spacing, steps):
    from ldm_cli.diffusion.schedule import ddim_timesteps

    ref = DDIMScheduler(**{**config, "timestep_spacing": spacing, "steps_offset": 1, "set_alpha_to_one": False})
    ours = schedule_from_config(dict(ref.config))
    assert torch.equal(ours.alpha_bar, ref.alphas_cumprod)
    assert torch.equal(ours.final_alpha_bar, ref.final_alpha_cumprod)
    ref.set_timesteps(steps)
    assert ddim_timesteps(ours, steps) == ref.timesteps.tolist()


def test_tiled_vae_decode_matches_diffusers(tiny_model):
    """--vae-tiling on equals diffusers' pipeline with vae.enable_tiling() (the tiny VAE tiles at 64 px, so a
    160x128 image is 3x2 overlapping tiles), and differs from the untiled image only at the seams."""
    c = ours_loaded(tiny_model)
    s = Settings(steps=5, cfg=7.5, width=160, height=128)
    pipe = reference(tiny_model)
    try:
        tiled = pipeline.txt2img(replace(c, vae_tiling="on"), ["a red cat"], [""], [3], s).permute(0, 2, 3, 1).numpy()
        untiled = pipeline.txt2img(replace(c, vae_tiling="off"), ["a red cat"], [""], [3], s).permute(0, 2, 3, 1).numpy()
        pipe.vae.enable_tiling()
        theirs = pipe("a red cat", num_inference_steps=5, guidance_scale=7.5, height=128, width=160,
                      generator=torch.Generator("cpu").manual_seed(3), output_type="np").images
    finally:
        pipe.vae.disable_tiling()
    assert np.abs(tiled - theirs).max() <= TOL
    assert np.abs(tiled - untiled).max() > 100 * TOL  # tiling really happened
    assert np.abs(tiled - untiled).mean() < 0.05


def test_guidance_interval_matches_diffusers_dynamic_cfg(tiny_model):
    """--guidance-interval LO,HI with LO between two steps' noise levels = diffusers' documented "dynamic
    classifier-free guidance" callback (guidance switched off after a step): equal, and unlike either end."""
    from ldm_cli.diffusion.schedule import ddim_timesteps

    c = ours_loaded(tiny_model)
    steps, cfg, seed, off_after = 10, 30.0, 3, 5  # a strong scale: the tiny model's two halves barely differ
    t = ddim_timesteps(c.schedule, steps)
    sigma = ((1 - c.schedule.alpha_bar) / c.schedule.alpha_bar).sqrt()
    lo = float((sigma[t[off_after - 1]] + sigma[t[off_after]]) / 2)  # the first off_after steps are above it

    def ours(interval):
        s = Settings(steps=steps, cfg=cfg, width=64, height=64, guidance_interval=interval)
        return pipeline.txt2img(c, ["a red cat"], [""], [seed], s).permute(0, 2, 3, 1).numpy()

    def stop_guidance(pipe, i, timestep, kwargs):
        if i == off_after - 1:  # called after step i: the steps after it run unguided
            pipe._guidance_scale = 0.0
            kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[-1]
        return kwargs

    theirs = reference(tiny_model)("a red cat", num_inference_steps=steps, guidance_scale=cfg, output_type="np",
                                   generator=torch.Generator("cpu").manual_seed(seed), height=64, width=64,
                                   callback_on_step_end=stop_guidance,
                                   callback_on_step_end_tensor_inputs=["prompt_embeds"]).images
    limited = ours(f"{lo},1e9")
    assert np.abs(limited - theirs).max() <= TOL
    assert np.abs(ours("0,1e9") - ours(None)).max() == 0  # an interval holding every step: plain guidance
    assert np.abs(limited - ours(None)).max() > 100 * TOL
    unguided = pipeline.txt2img(c, ["a red cat"], [""], [seed], Settings(steps=steps, cfg=1.0, width=64, height=64))
    assert np.abs(ours("1e8,1e9") - unguided.permute(0, 2, 3, 1).numpy()).max() == 0  # none: the prompt alone


def test_sigma_interval_rounds_to_the_training_step():
    from ldm_cli.diffusion.guidance import sigma_interval

    alpha_bar = torch.tensor([0.99, 0.5, 0.2, 0.01])  # sigma 0.1005, 1.0, 2.0, 9.95
    when = sigma_interval(alpha_bar, 0.5, 2.0)
    assert [when(torch.tensor(t)) for t in (0, 1, 2, 3)] == [False, True, True, False]  # (lo, hi]: 2.0 is in
    assert when(torch.tensor([1.4, 1.4])) and not when(torch.tensor(2.6)) and not when(torch.tensor(-1.0))
