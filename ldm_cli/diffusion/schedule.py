"""Pure numbers of the diffusion schedule: alpha-bar, DDIM timesteps, the img2img start step.

Notation (DDPM, Ho et al. 2020; DDIM, Song et al. 2020):
  beta_t       noise added at training step t
  alpha_bar_t  prod_{s<=t} (1 - beta_s): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps   (DDPM eq. 4)

The schedule is read from a diffusers scheduler config (any SD scheduler's config works: PNDM, DDIM,
Euler...), so a model trained with one schedule is sampled with the same alpha-bars.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from ldm_cli.errors import LdmError, check

# DDIMScheduler's defaults for keys a scheduler config may leave out.
DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
    prediction_type="epsilon", timestep_spacing="leading", rescale_betas_zero_snr=False, thresholding=False,
)


@dataclass(frozen=True)
class Schedule:
    alpha_bar: torch.Tensor  # float32 [T], alpha_bar[t] for training step t
    final_alpha_bar: torch.Tensor  # float32 0-d: alpha_bar "before" step 0, used by the last DDIM step
    prediction_type: str  # what the U-Net predicts: "epsilon", "v_prediction" or "sample"
    clip_sample_range: float | None  # clamp x0_pred to +-this, or None
    timestep_spacing: str
    steps_offset: int
    beta_schedule: str = "linear"  # how the betas were made (DPM-Solver rounds karras timesteps unless cosine)
    zero_terminal_snr: bool = False  # rescaled betas (Lin et al. 2023): alpha_bar[-1] == 0, an infinite sigma

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alpha_bar)


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM (Nichol & Dhariwal 2021) eq. 17: alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), s=0.008."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so the last step is pure noise."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def schedule_from_config(config: dict) -> Schedule:
    """Build a `Schedule` from a scheduler config dict (scheduler/scheduler_config.json)."""
    try:
        return _schedule(config)
    except (TypeError, ValueError, OverflowError, KeyError, RuntimeError) as e:  # a damaged or hostile config
        raise LdmError(f"scheduler config: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}; "
                       "the model's scheduler/scheduler_config.json is damaged") from None


def _schedule(config: dict) -> Schedule:
    check(isinstance(config, dict), "scheduler config: not a JSON object")
    c = {**DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    n = c["num_train_timesteps"]
    check(isinstance(n, int) and 1 <= n <= 100_000, f"scheduler config: num_train_timesteps {n!r} is not an "
          "integer in 1..100000")
    for key in ("beta_start", "beta_end"):
        check(isinstance(c[key], (int, float)) and 0 < c[key] < 1, f"scheduler config: {key} {c[key]!r} is not "
              "a number in (0, 1)")
    if c["trained_betas"] is not None:
        betas = torch.tensor(c["trained_betas"], dtype=torch.float32)
    elif c["beta_schedule"] == "linear":
        betas = torch.linspace(c["beta_start"], c["beta_end"], n, dtype=torch.float32)
    elif c["beta_schedule"] == "scaled_linear":  # the Stable Diffusion schedule: linear in sqrt(beta)
        betas = torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, n, dtype=torch.float32) ** 2
    elif c["beta_schedule"] == "squaredcos_cap_v2":
        betas = cosine_betas(n)
    else:
        raise LdmError(f"scheduler config: beta_schedule {c['beta_schedule']!r} is not supported")
    if c["rescale_betas_zero_snr"]:
        betas = rescale_zero_terminal_snr(betas)
    check(len(betas) == n and bool(torch.isfinite(betas).all()) and bool(((betas > 0) & (betas <= 1)).all()),
          "scheduler config: the betas are not numbers in (0, 1]")
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)
    check(c["prediction_type"] in ("epsilon", "v_prediction", "sample"),
          f"scheduler config: prediction_type {c['prediction_type']!r} is not supported")
    check(c["timestep_spacing"] in ("linspace", "leading", "trailing"),
          f"scheduler config: timestep_spacing {c['timestep_spacing']!r} is not supported")
    check(not c["thresholding"], "scheduler config: dynamic thresholding is not supported")
    return Schedule(
        alpha_bar=alpha_bar,
        # With set_alpha_to_one the last step lands on the clean image (alpha_bar = 1); SD uses alpha_bar[0].
        final_alpha_bar=torch.tensor(1.0) if c["set_alpha_to_one"] else alpha_bar[0],
        prediction_type=c["prediction_type"],
        clip_sample_range=float(c["clip_sample_range"]) if c["clip_sample"] else None,
        timestep_spacing=c["timestep_spacing"],
        steps_offset=int(c["steps_offset"]),
        beta_schedule=str(c["beta_schedule"]) if c["trained_betas"] is None else "trained",
        zero_terminal_snr=bool(c["rescale_betas_zero_snr"]),
    )


def ddim_timesteps(schedule: Schedule, steps: int) -> list[int]:
    """The `steps` training timesteps DDIM visits, high to low (the sub-sequence tau of DDIM sec. 4.2)."""
    n = schedule.num_train_timesteps
    check(1 <= steps <= n, f"--steps must be between 1 and {n} (the model's training steps), got {steps}")
    if schedule.timestep_spacing == "linspace":
        t = np.linspace(0, n - 1, steps).round()[::-1]
    elif schedule.timestep_spacing == "leading":
        t = (np.arange(0, steps) * (n // steps)).round()[::-1] + schedule.steps_offset
    else:  # "trailing": end exactly on the last training step (Lin et al. 2023, table 2)
        t = np.round(np.arange(n, 0, -n / steps)) - 1
    return [int(v) for v in t]


def img2img_start(steps: int, strength: float) -> int:
    """How many of the `steps` DDIM steps img2img skips: it starts at noise level `strength`."""
    check(0.0 < strength <= 1.0, f"--strength must be in (0, 1], got {strength}")
    run = min(int(steps * strength), steps)
    check(run >= 1, f"--strength {strength} with --steps {steps} leaves no step to run; raise either")
    return steps - run
