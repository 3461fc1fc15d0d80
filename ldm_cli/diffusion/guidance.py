"""Classifier-free guidance as a wrapper: a conditional U-Net and two contexts in, a denoiser out."""

from collections.abc import Callable

import torch

from ldm_cli.diffusion.conditioning import cat

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guidance_on(cfg_scale: float, has_uncond: bool = True) -> bool:
    """Guidance runs when there is an unconditional context and the scale is above 1 (as in diffusers):
    the one place this is decided."""
    return has_uncond and cfg_scale > 1.0


def sigma_interval(alpha_bar: torch.Tensor, lo: float, hi: float) -> Callable[[torch.Tensor], bool]:
    """Guidance in a limited interval (Kynkaanniemi et al. 2024, sec. 3): on where the step's noise level
    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) lies in (lo, hi], off at the highest noise (where it
    narrows what is drawn) and the lowest (where it does little). A step's timestep t (fractional for the
    sigma samplers) is rounded to the nearest training step."""
    sigma = ((1 - alpha_bar.double()) / alpha_bar.double()).sqrt()
    inside = ((sigma > lo) & (sigma <= hi)).tolist()

    def when(t: torch.Tensor) -> bool:  # one read of t per step: on CUDA a sync, against a U-Net call's work
        step = round(float(torch.as_tensor(t).flatten()[0]))
        return inside[min(max(step, 0), len(inside) - 1)]

    return when


def guided(unet: Callable, cond: torch.Tensor, uncond: torch.Tensor | None, cfg_scale: float,
           rescale: float = 0.0, when: Callable[[torch.Tensor], bool] | None = None) -> Model:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): out = uncond + cfg_scale * (cond - uncond),
    then with `rescale` = phi > 0 (Lin et al. 2024, eq. 15-16): out <- phi * out * std(cond) / std(out) +
    (1 - phi) * out, the std taken per image over channels and pixels (as diffusers' rescale_noise_cfg).

    `unet(x, t, context)` is the conditional network; given twice as many contexts as latents it
    evaluates each latent under both halves of `context` (models.unet.call_unet). Both branches go through one
    batched call ([uncond, cond] stacked), so guidance costs one U-Net call per step, at twice the batch.
    With cfg_scale <= 1 (as in diffusers) or no uncond, this is the bare conditional model; so it is at the
    steps where `when(t)` (e.g. `sigma_interval`) is False.
    """
    if not guidance_on(cfg_scale, uncond is not None):
        return lambda x, t: unet(x, t, cond)
    context = cat([uncond, cond])

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if when is not None and not when(t):
            return unet(x, t, cond)
        out_uncond, out_cond = unet(x, t, context).chunk(2)
        out = out_uncond + cfg_scale * (out_cond - out_uncond)
        if not rescale:
            return out
        dims = list(range(1, out.ndim))
        rescaled = out * (out_cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))  # eq. 15
        return rescale * rescaled + (1 - rescale) * out  # eq. 16

    return model
