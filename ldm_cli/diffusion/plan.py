"""From a sampler's name and the step count to one run: the sampler function over its timesteps, the
scale of txt2img's starting noise, and img2img's noising of the encoded image (SDEdit, Meng et al.
2021) at the first step it keeps. img2img keeps the last int(steps * strength) steps of the full
schedule, as diffusers' img2img pipelines do for every scheduler."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ldm_cli.diffusion import k_samplers, multistep, samplers, spacing
from ldm_cli.diffusion.names import SAMPLERS, SIGMA_SAMPLERS
from ldm_cli.diffusion.schedule import Schedule, ddim_timesteps, img2img_start
from ldm_cli.errors import check

# run(model, x, noise_fn, callback) -> x at the end
Run = Callable[[Callable, torch.Tensor, Callable, Callable | None], torch.Tensor]


@dataclass(frozen=True)
class Plan:
    steps: int  # sampler steps this run takes (img2img: the kept tail)
    init_sigma: float | torch.Tensor  # txt2img: x_T = N(0, I) * init_sigma
    noised: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # img2img: (x0, eps) -> x at the first step
    run: Run


def make_plan(schedule: Schedule, sampler: str, sigma_schedule: str, steps: int, eta: float = 0.0,
              strength: float | None = None) -> Plan:
    check(sampler in SAMPLERS, f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    check(sigma_schedule == "default" or sampler in SIGMA_SAMPLERS,
          f"--schedule {sigma_schedule} applies to {', '.join(SIGMA_SAMPLERS)}; {sampler} uses the model's spacing")
    start = img2img_start(steps, strength) if strength is not None else 0
    if sampler in SIGMA_SAMPLERS:
        return _sigma_plan(schedule, sampler, sigma_schedule, steps, start)
    timesteps = spacing.lcm_timesteps(schedule, steps) if sampler == "lcm" else ddim_timesteps(schedule, steps)
    tail = timesteps[start:]
    stride = schedule.num_train_timesteps // steps  # DDIM's previous timestep is t - stride

    def run(model, x, noise_fn, cb):
        if sampler == "lcm":
            return samplers.sample_lcm(model, x, tail, schedule, noise_fn, cb)
        if sampler == "ddpm":
            return samplers.sample_ddpm(model, x, tail, schedule, noise_fn, cb)
        return samplers.sample_ddim(model, x, tail, stride, schedule, eta, noise_fn, cb)

    alpha_bar = schedule.alpha_bar[tail[0]]
    return Plan(len(tail), 1.0, lambda x0, eps: samplers.add_noise(x0, eps, alpha_bar), run)


def _sigma_plan(schedule: Schedule, sampler: str, kind: str, steps: int, start: int) -> Plan:
    if sampler in ("euler", "euler-a", "heun", "dpm2", "dpm2-a", "lms"):  # x = x0 + sigma eps
        full, timesteps = spacing.k_sigmas(schedule, steps, kind)
        if sampler.startswith("dpm2") and kind == "karras":
            timesteps = timesteps.round()  # KDPM2 schedulers round their Karras timesteps, Euler's does not
        sigmas, t, sigma = full[start:], timesteps[start:], full[start]
        mids = [v[start:] for v in spacing.dpm2_midpoints(schedule, full, sampler == "dpm2-a")] if "dpm2" in sampler else []
        clip = schedule.clip_sample_range if sampler == "heun" else None  # as diffusers: Heun clips, Euler not

        def run(model, x, noise_fn, cb):
            d = k_samplers.denoiser(model, schedule.prediction_type, clip)
            t_device = t.to(x.device)
            if sampler == "euler":
                return k_samplers.sample_euler(d, x, sigmas, t_device, cb)
            if sampler == "heun":
                return k_samplers.sample_heun(d, x, sigmas, t_device, cb)
            if sampler == "lms":
                return k_samplers.sample_lms(d, x, sigmas, t_device, callback=cb)
            if sampler == "dpm2":
                return k_samplers.sample_dpm_2(d, x, sigmas, t_device, mids[0], mids[1].to(x.device), cb)
            if sampler == "dpm2-a":
                steps_of = (mids[0], mids[1].to(x.device), *mids[2:])
                return k_samplers.sample_dpm_2_ancestral(d, x, sigmas, t_device, steps_of, noise_fn, cb)
            return k_samplers.sample_euler_ancestral(d, x, sigmas, t_device, noise_fn, cb)

        return Plan(len(t), spacing.k_init_sigma(schedule, full), lambda x0, eps: x0 + eps * sigma.to(x0.dtype), run)
    # x = alpha x0 + sigma_vp eps (DPM-Solver++, UniPC)
    round_karras = sampler == "unipc" or schedule.beta_schedule != "squaredcos_cap_v2"
    sigmas, timesteps = spacing.multistep_sigmas(schedule, steps, kind, round_karras)
    sigmas, t, sigma = sigmas[start:], timesteps[start:], sigmas[start]

    def run(model, x, noise_fn, cb):
        if sampler == "unipc":
            return multistep.sample_unipc(model, x, sigmas, t, schedule.prediction_type, cb)
        return multistep.sample_dpmpp_2m(model, x, sigmas, t, schedule.prediction_type, sde="-sde" in sampler,
                                         noise_fn=noise_fn, callback=cb, order=3 if sampler == "dpm++3m-sde" else 2,
                                         heun=sampler.endswith("-heun"))

    def noised(x0, eps):
        s = sigma.to(x0.dtype)
        alpha_t = 1 / ((s**2 + 1) ** 0.5)
        return alpha_t * x0 + (s * alpha_t) * eps

    return Plan(len(t), 1.0, noised, run)
