"""txt2img and img2img: wiring the models (models/) to our samplers and guidance (diffusion/).

`unet` is the U-Net runner `f(x, t, context)` (models.unet.plain_runner, or accel.build_runner's);
None means the plain one.

Reproducibility: image k of a request has its own CPU generator seeded with its seed, from which
it draws, in order, its initial latent (img2img: VAE posterior sample, then noise) and each step's
noise (stochastic samplers, DDIM with eta > 0). That is the order diffusers' pipelines draw in, so an
image is the same made alone, in a batch, or by diffusers with `torch.Generator("cpu").manual_seed(seed)`
and the matching scheduler.
"""

from collections.abc import Callable, Iterator
from dataclasses import replace
from itertools import groupby

import torch

from ldm_cli.diffusion.conditioning import AddedCond
from ldm_cli.diffusion.guidance import guidance_on, guided, sigma_interval
from ldm_cli.diffusion.plan import Plan, make_plan
from ldm_cli.errors import RUNTIME, LdmError, check
from ldm_cli.io import images
from ldm_cli.jobs import MICRO, Job, Settings, interval_pair, micro_pair
from ldm_cli.models.codecs import decode_latents, encode_image, encode_text, encode_text_sdxl
from ldm_cli.models.components import Components
from ldm_cli.models.unet import plain_runner

StepCallback = Callable[[int, int], None]  # (step done, steps in this batch)


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def randn_like_each(shape, gens: list[torch.Generator], c: Components, dtype=None) -> torch.Tensor:
    """One N(0, I) draw per batch item from its own generator, on the CPU, then moved to the device."""
    draws = [torch.randn((1, *shape[1:]), generator=g, dtype=dtype or c.dtype) for g in gens]
    return torch.cat(draws).to(c.device)


def encode_prompts(c: Components, prompts: list[str], negatives: list[str], s: Settings):
    """(cond, uncond) conditioning; uncond only when guidance is on. Once per batch, outside the loop."""
    if c.family == "sd":
        check(all(getattr(s, k) is None for k in MICRO), "--original-size, --crops-coords-top-left and "
              "--target-size are SDXL's micro-conditioning; this model is not SDXL")
        cond = encode_text(c, prompts, s.prompt_syntax, s.clip_skip)
        if not guidance_on(s.cfg):
            return cond, None
        uncond = encode_text(c, negatives, s.prompt_syntax, s.clip_skip)  # clip skip on both, as A1111
        return same_length(cond, uncond, lambda: encode_text(c, [""], s.prompt_syntax, s.clip_skip))
    check(s.clip_skip == 1, "--clip-skip: SDXL already takes its text encoders' penultimate layers; "
          "other layers are not supported")
    hidden, pooled = encode_text_sdxl(c, prompts, s.prompt_syntax)
    ids, negative_ids = sdxl_time_ids(c, s)
    if not guidance_on(s.cfg):
        return AddedCond(hidden, pooled, ids.to(c.device, hidden.dtype).expand(len(prompts), -1)), None
    if c.force_zeros_for_empty_prompt and not any(negatives):  # SDXL base's rule for "no negative prompt"
        uncond_hidden, uncond_pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
    else:
        uncond_hidden, uncond_pooled = encode_text_sdxl(c, negatives, s.prompt_syntax)
    hidden, uncond_hidden = same_length(hidden, uncond_hidden, lambda: encode_text_sdxl(c, [""], s.prompt_syntax)[0])
    n = len(prompts)
    return (AddedCond(hidden, pooled, ids.to(c.device, hidden.dtype).expand(n, -1)),
            AddedCond(uncond_hidden, uncond_pooled, negative_ids.to(c.device, hidden.dtype).expand(n, -1)))


def same_length(cond: torch.Tensor, uncond: torch.Tensor, empty) -> tuple[torch.Tensor, torch.Tensor]:
    """Both guidance halves at one token length: where the chunk counts differ, the shorter gets the empty
    prompt's chunks (`empty()` encodes it), as A1111 pads them."""
    if cond.shape[1] == uncond.shape[1]:
        return cond, uncond
    from ldm_cli.text.encode import pad_to

    blank, longest = empty(), max(cond.shape[1], uncond.shape[1])
    return pad_to(cond, longest, blank), pad_to(uncond, longest, blank)


def sdxl_time_ids(c: Components, s: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's six micro-conditioning numbers, for the prompt and the negative prompt: original size (h, w),
    crop top-left (top, left), and the target size (h, w), or for the refiner an aesthetic score (6 for
    the prompt, 2.5 for the negative, diffusers' defaults) in its place."""
    size = (s.height, s.width)
    original = micro_pair(s.original_size, "original_size") if s.original_size else size
    crop = micro_pair(s.crops_coords_top_left, "crops_coords_top_left") if s.crops_coords_top_left else (0, 0)
    target = micro_pair(s.target_size, "target_size") if s.target_size else size
    if c.requires_aesthetics_score:
        return torch.tensor([[*original, *crop, 6.0]]), torch.tensor([[*original, *crop, 2.5]])
    ids = torch.tensor([[*original, *crop, *target]], dtype=torch.float32)
    return ids, ids


def denoise(c: Components, unet, x: torch.Tensor, cond, uncond, gens, s: Settings, plan: Plan,
            on_step: StepCallback | None = None) -> torch.Tensor:
    """Run the plan's sampler from x with these embeddings, decode to images in [0, 1]."""
    if getattr(c.unet.config, "time_cond_proj_dim", None) is not None:
        raise LdmError("this U-Net takes a guidance-scale embedding (an LCM-distilled model, time_cond_proj_dim); "
                       "ldm does not feed one yet: use the base model with an LCM LoRA (--lora) and --sampler lcm")
    when = sigma_interval(c.schedule.alpha_bar, *interval_pair(s.guidance_interval)) if s.guidance_interval else None
    model = guided(unet or plain_runner(c), cond, uncond, s.cfg, s.guidance_rescale, when)

    def callback(info):
        if on_step is not None:
            on_step(info["i"] + 1, plan.steps)

    with torch.no_grad():
        x = plan.run(model, x, lambda ref: randn_like_each(ref.shape, gens, c, ref.dtype), callback)
        return decode_latents(c, x)


def txt2img(c: Components, prompts: list[str], negatives: list[str], seeds: list[int], s: Settings,
            on_step: StepCallback | None = None, unet=None) -> torch.Tensor:
    return txt2img_from(c, *encode_prompts(c, prompts, negatives, s), seeds, s, on_step, unet)


def txt2img_from(c: Components, cond, uncond, seeds: list[int], s: Settings, on_step: StepCallback | None = None,
                 unet=None) -> torch.Tensor:
    """txt2img from text embeddings (uncond None: no guidance)."""
    gens = generators(seeds)
    plan = make_plan(c.schedule, s.sampler, s.schedule, s.steps, s.eta)
    shape = (len(seeds), c.unet.config.in_channels, s.height // c.vae_scale, s.width // c.vae_scale)
    x_T = randn_like_each(shape, gens, c) * plan.init_sigma  # 1 for DDIM; the largest sigma for Euler
    return denoise(c, unet, x_T, cond, uncond, gens, s, plan, on_step)


def img2img(c: Components, pixels: list[torch.Tensor], prompts: list[str], negatives: list[str],
            seeds: list[int], s: Settings, on_step: StepCallback | None = None, unet=None) -> torch.Tensor:
    return img2img_from(c, pixels, *encode_prompts(c, prompts, negatives, s), seeds, s, on_step, unet)


def img2img_from(c: Components, pixels: list[torch.Tensor], cond, uncond, seeds: list[int], s: Settings,
                 on_step: StepCallback | None = None, unet=None) -> torch.Tensor:
    """SDEdit (Meng et al. 2021): noise the image's latent to the level of the first kept step, denoise
    from there."""
    gens = generators(seeds)
    plan = make_plan(c.schedule, s.sampler, s.schedule, s.steps, s.eta, s.strength)
    x0 = torch.cat([encode_image(c, p, g) for p, g in zip(pixels, gens)])
    eps = randn_like_each(x0.shape, gens, c)
    return denoise(c, unet, plan.noised(x0, eps), cond, uncond, gens, s, plan, on_step)


def resolve_size(c: Components, job: Job) -> Job:
    """Fill in width/height: the init image's size rounded down to a multiple of 8, else the model's."""
    s = job.settings
    if s.width is not None and s.height is not None:
        return job
    if job.init_image is not None:
        w, h = images.image_size(job.init_image)
        m = max(8, c.vae_scale)  # --width/--height must be multiples of 8 too
        w, h = w // m * m, h // m * m
    else:
        w = h = c.unet.config.sample_size * c.vae_scale
    return replace(job, settings=replace(s, width=s.width or w, height=s.height or h))


def run_jobs(c: Components, unet, jobs: list[Job], batch_size: int,
             on_step: StepCallback | None = None) -> Iterator[tuple[Job, torch.Tensor]]:
    """Make the jobs' images, batching consecutive jobs with equal settings; yields (job, [3, H, W]).
    Jobs must have their sizes resolved (resolve_size)."""
    for _, same in groupby(jobs, key=lambda j: (j.settings, j.init_image is None)):
        same = list(same)
        for i in range(0, len(same), batch_size):
            batch = same[i:i + batch_size]
            yield from zip(batch, _run_batch(c, unet, batch, on_step))


def _run_batch(c: Components, unet, batch: list[Job], on_step) -> torch.Tensor:
    s = batch[0].settings
    prompts = [j.prompt for j in batch]
    negatives = [j.settings.negative for j in batch]
    seeds = [j.seed for j in batch]
    try:
        if batch[0].init_image is None:
            out = txt2img(c, prompts, negatives, seeds, s, on_step, unet)
        else:
            pixels = [images.pil_to_pixels(images.open_image(j.init_image), s.width, s.height) for j in batch]
            out = img2img(c, pixels, prompts, negatives, seeds, s, on_step, unet)
    except torch.OutOfMemoryError:
        raise LdmError(f"out of memory at batch size {len(batch)}: try --batch-size 1, a smaller --width/--height "
                       "or --dtype fp16", RUNTIME) from None
    return finite(out, batch)


def finite(images_: torch.Tensor, batch: list[Job]) -> torch.Tensor:
    """A NaN or infinity in the result (an overflow: fp16 at a huge --cfg or --lora-scale) would be
    written as a black PNG: it is an error instead."""
    if not torch.isfinite(images_).all():
        raise LdmError(f"the image for seed {batch[0].seed} came out as NaN/infinity (an overflow): lower --cfg or "
                       "--lora-scale, or try --dtype fp32", RUNTIME)
    return images_
