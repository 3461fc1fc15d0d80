"""Classifier-free guidance as a wrapper: a conditional U-Net and two contexts in, a denoiser out."""

from collections.abc import Callable

import torch

from ldm_cli.diffusion.conditioning import cat

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guidance_on(cfg_scale: float, has_uncond: bool = True) -> bool:
    """Guidance runs when there is an unconditional context and the scale is above 1 (as in diffusers):
    the one place this is decided."""
    return has_uncond and cfg_scale > 1.0


def guided(unet: Callable, cond: torch.Tensor, uncond: torch.Tensor | None, cfg_scale: float,
           rescale: float = 0.0) -> Model:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): out = uncond + cfg_scale * (cond - uncond),
    then with `rescale` = phi > 0 (Lin et al. 2024, eq. 15-16): out <- phi * out * std(cond) / std(out) +
    (1 - phi) * out, the std taken per image over channels and pixels (as diffusers' rescale_noise_cfg).

    `unet(x, t, context)` is the conditional network; given twice as many contexts as latents it
    evaluates each latent under both halves of `context` (models.unet.call_unet). Both branches go through one
    batched call ([uncond, cond] stacked), so guidance costs one U-Net call per step, at twice the batch.
    With cfg_scale <= 1 (as in diffusers) or no uncond, this is the bare conditional model.
    """
    if not guidance_on(cfg_scale, uncond is not None):
        return lambda x, t: unet(x, t, cond)
    context = cat([uncond, cond])

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out_uncond, out_cond = unet(x, t, context).chunk(2)
        out = out_uncond + cfg_scale * (out_cond - out_uncond)
        if not rescale:
            return out
        dims = list(range(1, out.ndim))
        rescaled = out * (out_cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))  # eq. 15
        return rescale * rescaled + (1 - rescale) * out  # eq. 16

    return model
