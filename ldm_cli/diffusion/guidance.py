"""Classifier-free guidance as a wrapper: a conditional U-Net and two contexts in, a denoiser out."""

from collections.abc import Callable

import torch

from ldm_cli.diffusion.conditioning import cat

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guidance_on(cfg_scale: float, has_uncond: bool = True) -> bool:
    """Guidance runs when there is an unconditional context and the scale is above 1 (as in diffusers):
    the one place this is decided."""
    return has_uncond and cfg_scale > 1.0


def guided(unet: Callable, cond: torch.Tensor, uncond: torch.Tensor | None, cfg_scale: float) -> Model:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): out = uncond + cfg_scale * (cond - uncond).

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
        return out_uncond + cfg_scale * (out_cond - out_uncond)

    return model
