"""The discrete-timestep samplers, as plain tensor functions over a model (k-diffusion's form): DDIM,
DDPM and LCM. Euler/Heun are in k_samplers.py, DPM++/UniPC in multistep.py, the name -> sampler table in
plan.py.

A "model" here is any callable `model(x_t, t) -> output`, where output is what the network predicts
(eps, v or x0, by `Schedule.prediction_type`). Guidance (guidance.py) is a wrapper that turns a
conditional U-Net into such a model; the sampler knows nothing about prompts. No diffusers import: this
is our own math, checked against diffusers' pipelines in tests/test_parity.py.

Notation (DDIM, Song et al. 2020, https://arxiv.org/abs/2010.02502):
  x_t        the noisy latent at timestep t             alpha_bar_t  cumulative alpha (schedule.py)
  eps        the noise in x_t                           x0_pred      f_theta(x_t, t), the predicted clean latent
  sigma_t    std of the noise added at a step           eta          sigma_t as a fraction of DDPM's (eq. 16)
"""

from collections.abc import Callable

import torch

from ldm_cli.diffusion.schedule import Schedule

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]  # returns fresh N(0, I) noise shaped like its argument


def predict_x0_eps(output, x_t, alpha_bar_t, prediction_type):
    """Turn the network's output into (x0_pred, eps) at x_t."""
    beta_bar_t = 1 - alpha_bar_t
    if prediction_type == "epsilon":  # DDIM eq. 12, "predicted x0": (x_t - sqrt(1-a) eps) / sqrt(a)
        return (x_t - beta_bar_t**0.5 * output) / alpha_bar_t**0.5, output
    if prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022, sec. 4)
        return alpha_bar_t**0.5 * x_t - beta_bar_t**0.5 * output, alpha_bar_t**0.5 * output + beta_bar_t**0.5 * x_t
    x0 = output  # "sample": the network predicts x0 directly
    return x0, (x_t - alpha_bar_t**0.5 * x0) / beta_bar_t**0.5


def ddim_step(output, x_t, alpha_bar_t, alpha_bar_prev, schedule: Schedule, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM update x_t -> x_{t-1} (DDIM eq. 12), given the network's output at (x_t, t)."""
    x0_pred, eps = predict_x0_eps(output, x_t, alpha_bar_t, schedule.prediction_type)
    if schedule.clip_sample_range is not None:
        x0_pred = x0_pred.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    # eq. 16: sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
    sigma_t = eta * variance**0.5
    # eq. 12: x_{t-1} = sqrt(a_prev) x0_pred + sqrt(1 - a_prev - sigma_t^2) eps + sigma_t z
    direction = (1 - alpha_bar_prev - sigma_t**2) ** 0.5 * eps
    x_prev = alpha_bar_prev**0.5 * x0_pred + direction
    if eta > 0:
        x_prev = x_prev + sigma_t * noise
    return x_prev


def sample_ddim(model: Model, x: torch.Tensor, timesteps: list[int], stride: int, schedule: Schedule,
                eta: float = 0.0, noise_fn: NoiseFn | None = None, callback: Callable | None = None):
    """Run DDIM from x (noisy at timesteps[0]) down through `timesteps`.

    `stride` is num_train_timesteps // total_steps: DDIM's previous timestep is t - stride (this is
    diffusers' rule too, also for "trailing" spacing and for img2img, which runs a tail of the list).
    `callback({"i": step index, "t": timestep, "x": x_{t-1}})` is called after each step.
    """
    if eta > 0 and noise_fn is None:
        raise ValueError("eta > 0 needs a noise_fn")
    t_device = torch.tensor(timesteps, device=x.device)  # one copy up front: no host->device copy per step
    for i, t in enumerate(timesteps):
        prev = t - stride
        alpha_bar_t = schedule.alpha_bar[t]
        alpha_bar_prev = schedule.alpha_bar[prev] if prev >= 0 else schedule.final_alpha_bar
        output = model(x, t_device[i])
        x = ddim_step(output, x, alpha_bar_t, alpha_bar_prev, schedule, eta, noise_fn(x) if eta > 0 else None)
        if callback is not None:
            callback({"i": i, "t": t, "x": x})
    return x


def sample_ddpm(model: Model, x: torch.Tensor, timesteps: list[int], schedule: Schedule, noise_fn: NoiseFn,
                callback: Callable | None = None):
    """Ancestral sampling from the DDPM posterior q(x_{t'} | x_t, x0_pred) (Ho et al. 2020, eqs. 6-7), with
    t' the next of `timesteps` and the "fixed small" variance beta-tilde (DDPMScheduler)."""
    t_device = torch.tensor(timesteps, device=x.device)
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        alpha_bar_t = schedule.alpha_bar[t]
        alpha_bar_prev = schedule.alpha_bar[prev] if prev >= 0 else torch.tensor(1.0)
        alpha_t = alpha_bar_t / alpha_bar_prev  # this step's alpha: alpha_bar_t / alpha_bar_t'
        output = model(x, t_device[i])
        x0_pred, _ = predict_x0_eps(output, x, alpha_bar_t, schedule.prediction_type)
        if schedule.clip_sample_range is not None:
            x0_pred = x0_pred.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
        # eq. 7: mu = sqrt(a_prev) beta_t / (1 - a_t) x0 + sqrt(alpha_t) (1 - a_prev) / (1 - a_t) x_t
        x0_coeff = (alpha_bar_prev ** (0.5) * (1 - alpha_t)) / (1 - alpha_bar_t)
        x_coeff = alpha_t ** (0.5) * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
        x_prev = x0_coeff * x0_pred + x_coeff * x
        if t > 0:  # eq. 7: beta-tilde = (1 - a_prev) / (1 - a_t) beta_t
            variance = torch.clamp((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_t), min=1e-20)
            x_prev = x_prev + variance**0.5 * noise_fn(output)
        x = x_prev
        if callback is not None:
            callback({"i": i, "x": x})
    return x


def sample_lcm(model: Model, x: torch.Tensor, timesteps: list[int], schedule: Schedule, noise_fn: NoiseFn,
               callback: Callable | None = None):
    """Latent consistency sampling (Luo et al. 2023, algorithm 1): each step maps x_t to the consistency
    function's x0 estimate, then re-noises it to the next timestep (not after the last)."""
    t_device = torch.tensor(timesteps, device=x.device)
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else t
        alpha_bar_t, alpha_bar_prev = schedule.alpha_bar[t], schedule.alpha_bar[prev]
        # boundary-condition scalings, sigma_data = 0.5 and t scaled by 10 (LCMScheduler's defaults):
        # f(x, t) = c_skip(t) x + c_out(t) x0_pred, with c_skip(0) = 1, c_out(0) = 0
        scaled = torch.tensor(t) * 10.0  # int64 * float: float32, as LCMScheduler computes it
        c_skip = 0.5**2 / (scaled**2 + 0.5**2)
        c_out = scaled / (scaled**2 + 0.5**2) ** 0.5
        output = model(x, t_device[i])
        if schedule.prediction_type == "epsilon":
            x0_pred = (x - (1 - alpha_bar_t).sqrt() * output) / alpha_bar_t.sqrt()
        elif schedule.prediction_type == "v_prediction":
            x0_pred = alpha_bar_t.sqrt() * x - (1 - alpha_bar_t).sqrt() * output
        else:
            x0_pred = output
        if schedule.clip_sample_range is not None:
            x0_pred = x0_pred.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
        denoised = c_out * x0_pred + c_skip * x
        if i + 1 < len(timesteps):
            x = alpha_bar_prev.sqrt() * denoised + (1 - alpha_bar_prev).sqrt() * noise_fn(denoised)
        else:
            x = denoised
        if callback is not None:
            callback({"i": i, "x": x})
    return x


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """DDPM eq. 4 (forward process): x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps.

    alpha_bar_t is 0-d or one value per batch item.
    """
    a = alpha_bar_t.to(device=x0.device, dtype=x0.dtype).flatten()
    a = a.reshape(-1, *([1] * (x0.ndim - 1)))
    return a**0.5 * x0 + (1 - a) ** 0.5 * eps
