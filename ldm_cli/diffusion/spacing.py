"""Noise levels and timesteps for the samplers beyond DDIM: which sigmas a run visits, and at which
(possibly fractional) training timestep the U-Net is asked about each.

Notation (Karras et al. 2022, "Elucidating the design space...", https://arxiv.org/abs/2206.00364):
  sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)    so x_t / sqrt(alpha_bar_t) = x0 + sigma_t eps

Each family follows the diffusers scheduler it must equal, number for number (their float32/float64
steps included), since "leading" means a different list in EulerDiscreteScheduler than in
DPMSolverMultistepScheduler:
  k_sigmas          Euler, Euler a, Heun        (EulerDiscreteScheduler.set_timesteps)
  multistep_sigmas  DPM++ 2M (SDE), UniPC       (DPMSolverMultistepScheduler / UniPCMultistepScheduler)
  lcm_timesteps     LCM                         (LCMScheduler)
DDIM and DDPM use schedule.ddim_timesteps.
"""

import math

import numpy as np
import torch

from ldm_cli.diffusion.schedule import Schedule
from ldm_cli.errors import check

SIGMA_SCHEDULES = ("default", "karras", "exponential")


def train_sigmas(schedule: Schedule) -> np.ndarray:
    """sigma_t for every training step t, float32 as diffusers keeps them."""
    alpha_bar = schedule.alpha_bar.clone()
    if schedule.zero_terminal_snr:
        alpha_bar[-1] = 2**-24  # diffusers' stand-in for 0, so that the first sigma is finite
    return (((1 - alpha_bar) / alpha_bar) ** 0.5).numpy()


def karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Evenly spaced in log sigma (k-diffusion's get_sigmas_exponential)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """The fractional training timestep whose sigma this is: linear interpolation in log sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


def _check_steps(schedule: Schedule, steps: int) -> int:
    n = schedule.num_train_timesteps
    check(1 <= steps <= n, f"--steps must be between 1 and {n} (the model's training steps), got {steps}")
    return n


def k_sigmas(schedule: Schedule, steps: int, kind: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [steps + 1] ending in 0, timesteps [steps]) for Euler, Euler a and Heun, both float32."""
    n = _check_steps(schedule, steps)
    if schedule.timestep_spacing == "linspace":
        t = np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    elif schedule.timestep_spacing == "leading":
        t = (np.arange(0, steps) * (n // steps)).round()[::-1].copy().astype(np.float32) + schedule.steps_offset
    else:  # trailing
        t = np.arange(n, 0, -n / steps).round().copy().astype(np.float32) - 1
    all_sigmas = train_sigmas(schedule)
    log_sigmas = np.log(all_sigmas)
    sigmas = np.interp(t, np.arange(0, len(all_sigmas)), all_sigmas)
    if kind != "default":  # between the sigmas of the first and last timestep above
        spaced = karras if kind == "karras" else exponential
        sigmas = spaced(sigmas[-1].item(), sigmas[0].item(), steps)
        t = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return torch.from_numpy(sigmas), torch.from_numpy(t.astype(np.float32))


def dpm2_midpoints(schedule: Schedule, sigmas: torch.Tensor, ancestral: bool = False) -> tuple[torch.Tensor, ...]:
    """DPM2's midpoint of each step i, sigma_mid = exp((log sigma_i + log sigma_end) / 2), and its fractional
    timestep, as KDPM2(Ancestral)DiscreteScheduler compute them (float32 log-lerp); the last step (to 0) has
    none (0). sigma_end is sigma_i+1, or with `ancestral` Euler a's sigma_down (get_ancestral_step), and then
    (mids, timesteps, sigma_up, sigma_down)."""
    ends, more = sigmas[1:], ()
    if ancestral:
        up = (ends**2 * (sigmas[:-1] ** 2 - ends**2) / sigmas[:-1] ** 2) ** 0.5
        ends = (ends**2 - up**2) ** 0.5
        mids = sigmas[:-1].log().lerp(ends.log(), 0.5).exp()
        more = (up, ends)
    else:
        mids = ends.log().lerp(sigmas[:-1].log(), 0.5).exp()
    mids[-1] = 0.0  # the step to sigma 0 is Euler's
    log_sigmas = np.log(train_sigmas(schedule))
    t = np.array([sigma_to_t(m, log_sigmas) for m in mids[:-1].numpy()] + [0.0])
    return (mids, torch.from_numpy(t.astype(np.float32)), *more)


def k_init_sigma(schedule: Schedule, sigmas: torch.Tensor) -> torch.Tensor:
    """The scale of txt2img's starting noise (EulerDiscreteScheduler.init_noise_sigma): the largest sigma,
    or sqrt(sigma^2 + 1) under "leading" spacing, where it is applied to the model's x_T too."""
    if schedule.timestep_spacing in ("linspace", "trailing"):
        return sigmas.max()
    return (sigmas.max() ** 2 + 1) ** 0.5


def multistep_sigmas(schedule: Schedule, steps: int, kind: str = "default",
                     round_karras: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [steps + 1] ending in 0 (float32), timesteps [steps] (int64)) for DPM++ and UniPC.

    These space steps + 1 points and drop the last (t = 0), unlike k_sigmas; karras/exponential span the
    whole training range. round_karras: karras timesteps are rounded (UniPC always; DPM-Solver except for
    the cosine schedule); other fractional timesteps are truncated by the int64 cast, as in diffusers."""
    n = _check_steps(schedule, steps)
    if schedule.timestep_spacing == "linspace":
        t = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif schedule.timestep_spacing == "leading":
        t = (np.arange(0, steps + 1) * (n // (steps + 1))).round()[::-1][:-1].copy().astype(np.int64)
        t += schedule.steps_offset
    else:  # trailing
        t = np.arange(n, 0, -n / steps).round().copy().astype(np.int64) - 1
    all_sigmas = train_sigmas(schedule)
    log_sigmas = np.log(all_sigmas)
    if kind == "default":
        sigmas = np.interp(t, np.arange(0, len(all_sigmas)), all_sigmas)
    else:
        spaced = karras if kind == "karras" else exponential
        sigmas = spaced(all_sigmas[0].item(), all_sigmas[-1].item(), steps)
        t = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
        if kind == "karras" and round_karras:
            t = t.round()
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return torch.from_numpy(sigmas), torch.from_numpy(t).to(torch.int64)


def lcm_timesteps(schedule: Schedule, steps: int, original_steps: int = 50) -> list[int]:
    """LCM's timesteps (Luo et al. 2023): `steps` picks, evenly by index, from the `original_steps`-step
    skipping schedule the model was distilled on (LCMScheduler.set_timesteps)."""
    n = _check_steps(schedule, steps)
    check(steps <= original_steps, f"--steps {steps}: the LCM sampler takes at most {original_steps} steps "
          "(the schedule it was distilled on)")
    k = n // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1].copy()
    indices = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return [int(v) for v in origin[indices]]
