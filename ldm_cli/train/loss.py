"""The training objective and the weight average.

Notation as diffusion/samplers.py: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4).
"""

from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldm_cli.diffusion.conditioning import unet_kwargs
from ldm_cli.diffusion.samplers import add_noise
from ldm_cli.diffusion.schedule import Schedule


class PinnedStaging:
    """Pinned host buffers, `depth` per (shape, dtype, device), reused for each step's host->GPU copies.

    Why: a pageable copy to CUDA waits for all queued GPU work, so the host could not queue the next step's
    kernels ahead; a pinned copy is asynchronous. But `t.pin_memory()` per copy (torch's caching host
    allocator) cost 1.6 ms a call on an H200 in the embedded U-Net's CUDA-graphed steps, where the host runs
    ahead of the GPU (7 copies, 11 ms a step under the profiler; the step 25 ms without it; docs/performance.md).
    Here a buffer is written again only once the GPU has read it (its copy's event), so the host waits only
    when it is `depth` uses ahead."""

    def __init__(self, depth: int = 8, pinned=None, event=None, stream=None):
        self.depth = depth  # (the tests stand in for CUDA's pinned memory, events and streams)
        self.pinned = pinned or (lambda shape, dtype: torch.empty(shape, dtype=dtype, pin_memory=True))
        self.event = event or torch.cuda.Event
        self.stream = stream or torch.cuda.current_stream
        self.rings: dict[tuple, deque] = {}

    def copy(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        ring = self.rings.setdefault((tuple(t.shape), t.dtype, device), deque())
        if len(ring) < self.depth:
            buffer, read = self.pinned(t.shape, t.dtype), self.event()
        else:
            buffer, read = ring.popleft()
            read.synchronize()  # the GPU has copied this buffer's last contents
        buffer.copy_(t)
        out = buffer.to(device, non_blocking=True, copy=True)
        read.record(self.stream(device))  # the copy's stream: the destination device's current one
        ring.append((buffer, read))
        return out


STAGING = PinnedStaging()  # None: a pin_memory() copy per call (the bench's comparison)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on `device` without stalling the host: on CUDA through reused pinned buffers, the copy
    asynchronous (PinnedStaging)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    if STAGING is None:
        return t.pin_memory().to(device, non_blocking=True)
    return STAGING.copy(t, device)


@dataclass(frozen=True)
class Share:
    """This process's part of the step's global batch: random numbers are drawn for the whole global batch
    (every process draws the same ones, from one generator) and each takes its own rows, so N processes of
    batch B draw what one process of batch N x B draws."""
    rank: int = 0
    world: int = 1

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        n = len(t) // self.world
        return t[self.rank * n:(self.rank + 1) * n]

    def randn(self, shape, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
        return self.rows(torch.randn((shape[0] * self.world, *shape[1:]), generator=gen, dtype=dtype))


def sample_posterior(moments: torch.Tensor, gen: torch.Generator, share: Share = Share()) -> torch.Tensor:
    """z ~ N(mean, exp(logvar)) from the VAE encoder's output [B, 2C, h, w], as diffusers'
    DiagonalGaussianDistribution.sample: z = mean + exp(logvar / 2) * eps, logvar clamped to [-30, 20],
    eps drawn on the CPU from `gen` (the same numbers on every device)."""
    mean, logvar = torch.chunk(moments, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    eps = to_device(share.randn(mean.shape, gen, dtype=mean.dtype), mean.device)
    return mean + std * eps


def diffusion_loss(unet, schedule: Schedule, latents, context, gen: torch.Generator, noise_offset: float = 0.0,
                   min_snr_gamma: float = 0.0, timesteps: torch.Tensor | None = None, share: Share = Share()):
    """DDPM's simple loss (Ho et al. eq. 14) with the model's prediction type: || target - net(x_t, t) ||^2,
    at random timesteps (or the given CPU `timesteps`: the validation loss)."""
    noise = to_device(share.randn(latents.shape, gen), latents.device).to(latents.dtype)
    if noise_offset:  # a per-channel constant shift lets the model learn to change overall brightness
        noise = noise + noise_offset * to_device(share.randn((*latents.shape[:2], 1, 1), gen),
                                                 noise.device).to(noise.dtype)
    t_cpu = timesteps if timesteps is not None else share.rows(
        torch.randint(0, schedule.num_train_timesteps, (len(latents) * share.world,), generator=gen))
    alpha_bar = schedule.alpha_bar[t_cpu]  # indexed on the CPU: no device->host sync
    a = to_device(alpha_bar, latents.device).reshape(-1, 1, 1, 1)
    x_t = add_noise(latents, noise, a)
    v_pred = schedule.prediction_type == "v_prediction"
    target = a.sqrt() * noise - (1 - a).sqrt() * latents if v_pred else noise  # v = sqrt(a) eps - sqrt(1-a) x0
    pred = unet(x_t, to_device(t_cpu, latents.device), **unet_kwargs(context), return_dict=False)[0]
    per_item = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:  # weight min(SNR, gamma) / SNR on eps (/(SNR + 1) on v): tames the low-noise steps
        snr = alpha_bar / (1 - alpha_bar)
        weight = snr.clamp(max=min_snr_gamma) / (snr + 1 if v_pred else snr)
        per_item = per_item * to_device(weight, per_item.device)  # pinned: a pageable copy would sync each step
    return per_item.mean()


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params, in place, one fused kernel per dtype."""
    torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - decay)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm-up: average over roughly the steps so far until `decay` is reached (as diffusers' EMAModel)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def swap_in(params: list[torch.Tensor], values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copy `values` into `params`; returns what the params held before (to swap back)."""
    saved = [p.detach().clone() for p in params]
    for p, v in zip(params, values):
        p.copy_(v)
    return saved
