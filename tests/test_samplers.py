"""Golden comparisons for every sampler: ours equals diffusers' pipeline with the matching scheduler, on
the same tiny weights and seed, for epsilon and v-prediction, leading and trailing spacing, txt2img and
img2img; the sigma schedules; and the stochastic samplers' independence of the batch size."""

import functools
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image

from ldm_cli.diffusion.names import STOCHASTIC
from ldm_cli.diffusion.schedule import schedule_from_config
from ldm_cli.io.images import pil_to_pixels
from ldm_cli.jobs import Settings
from ldm_cli.models.load import load_components
from ldm_cli.sample import pipeline

TOL = 1e-5


class LMSFromTheFirstStep(LMSDiscreteScheduler):
    """diffusers' LMS with its order counted from the run's first step, as k-diffusion's sample_lms and ours
    count it. diffusers counts from the schedule's start: in img2img its first step takes the 4th-order
    coefficient of the one slope it has (the others' coefficients unused), a step no LMS formula makes.
    txt2img is unchanged by this (tests/test_samplers.py checks both)."""

    def step(self, model_output, timestep, sample, order=4, return_dict=True):
        return super().step(model_output, timestep, sample, min(len(self.derivatives) + 1, order), return_dict)


SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSFromTheFirstStep, {}),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "dpm2-a": (KDPM2AncestralDiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpm++2m-sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++2m-sde-heun": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
    "dpm++3m-sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "unipc": (UniPCMultistepScheduler, {}),
    "lcm": (LCMScheduler, {}),
}
ALL = list(SCHEDULERS)  # DDIM too: its leading/trailing x eps/v x txt2img/img2img cases live here
NEW = ALL[1:]


@functools.cache
def ours_loaded(model_dir):
    return load_components(str(model_dir), device="cpu", dtype="fp32")


@functools.cache
def reference(model_dir, cls):
    """(pipeline, the model's own scheduler config): tests swap the scheduler, never that config."""
    pipe = cls.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)


def with_scheduler(model_dir, cls, sampler, spacing, schedule="default"):
    pipe, config = reference(model_dir, cls)
    scheduler_cls, kw = SCHEDULERS[sampler]
    if schedule != "default":
        kw = {**kw, f"use_{schedule}_sigmas": True}
    pipe.scheduler = scheduler_cls.from_config(config, timestep_spacing=spacing, **kw)
    return pipe


def ours_with_spacing(model_dir, spacing):
    c = ours_loaded(model_dir)
    config = reference(model_dir, StableDiffusionPipeline)[1]
    return replace(c, schedule=schedule_from_config({**config, "timestep_spacing": spacing}))


def init_image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def run_pair(model_dir, sampler, spacing, mode, schedule="default", steps=8, cfg=7.5, seed=11):
    c = ours_with_spacing(model_dir, spacing)
    strength = 0.6 if mode == "img2img" else None
    s = Settings(steps=steps, cfg=cfg, width=64, height=64, sampler=sampler, schedule=schedule, strength=strength)
    gen = torch.Generator("cpu").manual_seed(seed)
    kw = dict(num_inference_steps=steps, guidance_scale=cfg, generator=gen, output_type="np")
    if mode == "txt2img":
        ours = pipeline.txt2img(c, ["a red cat"], [""], [seed], s)
        pipe = with_scheduler(model_dir, StableDiffusionPipeline, sampler, spacing, schedule)
        theirs = pipe("a red cat", height=64, width=64, **kw).images
    else:
        ours = pipeline.img2img(c, [pil_to_pixels(init_image(), 64, 64)], ["a red cat"], [""], [seed], s)
        pipe = with_scheduler(model_dir, StableDiffusionImg2ImgPipeline, sampler, spacing, schedule)
        theirs = pipe("a red cat", image=init_image(), strength=strength, **kw).images
    return ours.permute(0, 2, 3, 1).numpy(), theirs


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("model", ["tiny_model", "tiny_v_model"])
@pytest.mark.parametrize("sampler", ALL)
def test_sampler_matches_diffusers(sampler, model, spacing, mode, request):
    ours, theirs = run_pair(request.getfixturevalue(model), sampler, spacing, mode)
    assert ours.shape == theirs.shape == (1, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= TOL


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("sampler", ["euler", "heun", "lms", "dpm2", "dpm2-a", "dpm++2m", "dpm++2m-sde",
                                     "dpm++2m-sde-heun", "dpm++3m-sde", "unipc"])
def test_sigma_schedule_matches_diffusers(tiny_model, sampler, schedule):
    for mode in ("txt2img", "img2img"):
        ours, theirs = run_pair(tiny_model, sampler, "leading", mode, schedule, steps=10)
        assert np.abs(ours - theirs).max() <= TOL, mode


@pytest.mark.parametrize("steps", [1, 2, 3, 25])
@pytest.mark.parametrize("sampler", ["euler", "heun", "lms", "dpm2", "dpm2-a", "dpm++2m", "unipc", "dpm++2m-sde",
                                     "dpm++2m-sde-heun", "dpm++3m-sde"])
def test_step_counts_match_diffusers(tiny_v_model, sampler, steps):
    """One step (first order only), two (first and last order-reduced), three (3M's middle step second
    order) and many (the second- and third-order paths, the second-to-last step at full order)."""
    ours, theirs = run_pair(tiny_v_model, sampler, "trailing", "txt2img", steps=steps, cfg=4.0)
    assert np.abs(ours - theirs).max() <= TOL


@pytest.mark.slow
def test_samplers_differ(tiny_model):
    """Each sampler makes its own picture (and the schedules change it), so the tolerance means something."""
    images = {name: run_pair(tiny_model, name, "leading", "txt2img")[0] for name in NEW}
    c = ours_with_spacing(tiny_model, "leading")
    s = Settings(steps=8, cfg=7.5, width=64, height=64)
    images["ddim"] = pipeline.txt2img(c, ["a red cat"], [""], [11], s).permute(0, 2, 3, 1).numpy()
    names = list(images)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if {a, b} == {"ddpm", "euler-a"}:  # one process: DDPM's posterior step is Euler a's in sigma form,
                assert np.abs(images[a] - images[b]).max() <= TOL  # and both draw the same noise
                continue
            # DDIM (eta 0) is Euler's method in other coordinates (Karras et al. 2022, sec. 3); they differ
            # by the last step only (DDIM ends on alpha_bar[0], Euler on sigma 0): ~1e-3 here
            assert np.abs(images[a] - images[b]).max() > 20 * TOL, (a, b)
    karras = run_pair(tiny_model, "dpm++2m", "leading", "txt2img", "karras")[0]
    assert np.abs(karras - images["dpm++2m"]).max() > 100 * TOL


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_stochastic_samplers_do_not_depend_on_batch_size(tiny_model, sampler):
    """Step noise comes from each image's own generator: a batch of 4 gives each image exactly as made
    alone (bitwise on the CPU, batch-invariant U-Net calls)."""
    c = ours_loaded(tiny_model)  # on the CPU, U-Net calls are batch-invariant (Components.batch_invariant)
    s = Settings(steps=6, cfg=7.5, width=64, height=64, sampler=sampler)
    seeds = [5, 6, 7, 8]
    batch = pipeline.txt2img(c, ["a red cat"] * 4, [""] * 4, seeds, s)
    alone = torch.cat([pipeline.txt2img(c, ["a red cat"], [""], [seed], s) for seed in seeds])
    assert torch.equal(batch, alone)
    assert not torch.equal(batch[0], batch[1])


def test_lms_reference_changes_diffusers_img2img_only(tiny_model, monkeypatch):
    """The reference's one change (LMSFromTheFirstStep): diffusers' own LMS gives ours in txt2img, and in
    img2img its first step (order 4 from one slope) is what sets it apart."""
    monkeypatch.setitem(SCHEDULERS, "lms", (LMSDiscreteScheduler, {}))
    ours, theirs = run_pair(tiny_model, "lms", "leading", "txt2img")
    assert np.abs(ours - theirs).max() <= TOL
    ours, theirs = run_pair(tiny_model, "lms", "leading", "img2img")
    assert np.abs(ours - theirs).max() > 100 * TOL
