"""Euler, Euler ancestral, Heun, DPM2, DPM2 ancestral and LMS: ODE/SDE solvers over sigma (Karras et
al. 2022), k-diffusion's form.

Here x lives in the "variance exploding" form x = x0 + sigma eps (spacing.py); the U-Net, trained on
x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, sees x / sqrt(sigma^2 + 1) at the timestep t of that
sigma. `denoiser` turns it into D(x, sigma, t) ~ x0; each sampler is a short loop over `sigmas` (ending
in 0) and the matching `timesteps` (spacing.k_sigmas). Checked against diffusers'
Euler/EulerAncestral/Heun/KDPM2(Ancestral)/LMSDiscreteScheduler in tests/test_samplers.py, so the arithmetic
follows theirs.
"""

import functools
from collections.abc import Callable

import numpy as np
import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]  # fresh N(0, I) noise shaped (and typed) like its argument


def denoiser(model, prediction_type: str, clip_range: float | None = None) -> Denoiser:
    """D(x, sigma, t): the network's x0 estimate at x = x0 + sigma eps, from its eps, v or x0 output."""

    def d(x, sigma, t):
        out = model(x / ((sigma**2 + 1) ** 0.5), t)  # c_in = 1 / sqrt(sigma^2 + 1) (Karras et al. table 1)
        x = x.to(torch.float32)
        if prediction_type == "epsilon":  # x = x0 + sigma eps
            x0 = x - sigma * out
        elif prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0, with a = 1/(sigma^2 + 1)
            x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
        else:
            x0 = out
        return x0.clamp(-clip_range, clip_range) if clip_range is not None else x0

    return d


def sample_euler(d: Denoiser, x, sigmas, timesteps, callback=None):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras eq. 4)."""
    for i, t in enumerate(timesteps):
        sigma = sigmas[i]
        x0 = d(x, sigma, t)
        derivative = (x.to(torch.float32) - x0) / sigma
        x = (x.to(torch.float32) + derivative * (sigmas[i + 1] - sigma)).to(x.dtype)
        if callback is not None:
            callback({"i": i, "x": x})
    return x


def sample_euler_ancestral(d: Denoiser, x, sigmas, timesteps, noise_fn: NoiseFn, callback=None):
    """Euler down to sigma_down, then fresh noise up to sigma_next ("Euler a"): the step from sigma to
    sigma_next split so that sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion get_ancestral_step)."""
    for i, t in enumerate(timesteps):
        sigma_from, sigma_to = sigmas[i], sigmas[i + 1]
        x0 = d(x, sigma_from, t)
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        derivative = (x.to(torch.float32) - x0) / sigma_from
        x_next = x.to(torch.float32) + derivative * (sigma_down - sigma_from)
        noise = noise_fn(x)  # drawn at every step, also the last (sigma_up = 0), as diffusers does
        x = (x_next + noise * sigma_up).to(x.dtype)
        if callback is not None:
            callback({"i": i, "x": x})
    return x


def sample_heun(d: Denoiser, x, sigmas, timesteps, callback=None):
    """Heun's 2nd-order method (Karras et al. 2022, algorithm 1): an Euler step to sigma_next, then the
    average of the slopes at both ends; the last step (to sigma = 0) is plain Euler. 2n - 1 U-Net calls."""
    for i, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        derivative = (x - d(x, sigma, t)) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = (x + derivative * dt).to(x.dtype)
        else:  # the U-Net takes x in its own dtype (fp16 on a GPU): the sums are fp32, x is not
            x_2 = (x + derivative * dt).to(x.dtype)
            derivative_2 = (x_2 - d(x_2, sigma_next, timesteps[i + 1])) / sigma_next
            x = (x + (derivative + derivative_2) / 2 * dt).to(x.dtype)
        if callback is not None:
            callback({"i": i, "x": x})
    return x


def sample_dpm_2(d: Denoiser, x, sigmas, timesteps, mid_sigmas, mid_timesteps, callback=None):
    """DPM-Solver-2 (Lu et al. 2022, algorithm 1 with r1 = 1/2) in sigma form, k-diffusion's sample_dpm_2:
    an Euler step to the log-midpoint sigma_mid = sqrt(sigma sigma_next), then the whole step with the slope
    there; the last step (to sigma = 0) is plain Euler. mid_sigmas[i], mid_timesteps[i] are step i's
    midpoint and its (fractional) timestep. 2n - 1 U-Net calls."""
    for i, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        derivative = (x - d(x, sigma, t)) / sigma
        if sigma_next == 0:
            x = (x + derivative * (sigma_next - sigma)).to(x.dtype)
        else:
            sigma_mid = mid_sigmas[i]
            x_mid = (x + derivative * (sigma_mid - sigma)).to(x.dtype)
            derivative_2 = (x_mid - d(x_mid, sigma_mid, mid_timesteps[i])) / sigma_mid
            x = (x + derivative_2 * (sigma_next - sigma)).to(x.dtype)
        if callback is not None:
            callback({"i": i, "x": x})
    return x


def sample_dpm_2_ancestral(d: Denoiser, x, sigmas, timesteps, mids, noise_fn: NoiseFn, callback=None):
    """DPM2 with Euler a's split of each step ("DPM2 a", k-diffusion's sample_dpm_2_ancestral): the midpoint
    rule down to sigma_down, then fresh noise up to sigma_next. mids = (mid sigmas, their timesteps,
    sigma_up, sigma_down) per step (spacing.dpm2_midpoints). The last step (to sigma = 0) is Euler's,
    without noise. 2n - 1 U-Net calls, n - 1 noise draws."""
    mid_sigmas, mid_timesteps, ups, downs = mids
    for i, t in enumerate(timesteps):
        sigma = sigmas[i]
        derivative = (x - d(x, sigma, t)) / sigma
        if sigmas[i + 1] == 0:
            x = (x + derivative * (sigmas[i + 1] - sigma)).to(x.dtype)
        else:
            sigma_mid = mid_sigmas[i]
            x_mid = (x + derivative * (sigma_mid - sigma)).to(x.dtype)
            derivative_2 = (x_mid - d(x_mid, sigma_mid, mid_timesteps[i])) / sigma_mid
            x_down = x + derivative_2 * (downs[i] - sigma)
            x = (x_down + noise_fn(x_down) * ups[i]).to(x.dtype)
        if callback is not None:
            callback({"i": i, "x": x})
    return x


# cached: solved at every step (an eigenproblem), LMS ran ~10% slower than Euler at the same U-Net calls on 2 cores
_gauss_legendre = functools.cache(np.polynomial.legendre.leggauss)


def lms_coefficients(sigmas, i: int, order: int) -> list[float]:
    """c_j = integral from sigma_i to sigma_{i+1} of l_j(tau) d tau, j = 0 .. order-1, where l_j is the Lagrange
    basis polynomial through sigma_i, sigma_{i-1}, ..., sigma_{i-order+1} that is 1 at sigma_{i-j}. l_j has
    degree order - 1, so Gauss-Legendre with `order` nodes integrates it exactly (diffusers calls scipy's quad)."""
    s = [float(sigmas[i - k]) for k in range(order)]
    a, b = float(sigmas[i]), float(sigmas[i + 1])
    nodes, weights = _gauss_legendre(order)
    tau = (b - a) / 2 * nodes + (a + b) / 2  # the nodes mapped from [-1, 1] onto [sigma_i, sigma_{i+1}]
    basis = [np.prod([(tau - s[k]) / (s[j] - s[k]) for k in range(order) if k != j] or [np.ones_like(tau)], axis=0)
             for j in range(order)]
    return [float((b - a) / 2 * np.sum(weights * lj)) for lj in basis]


def sample_lms(d: Denoiser, x, sigmas, timesteps, order: int = 4, callback=None):
    """Linear multistep ("LMS", k-diffusion's sample_lms): the ODE's slope dx/dsigma = (x - D) / sigma at the
    last `order` noise levels, interpolated by a polynomial in sigma and integrated over the step:
    x_{i+1} = x_i + sum_j c_j d_{i-j} (lms_coefficients). The order grows from 1 as slopes accumulate (img2img
    too: counted from the run's first step). One U-Net call a step."""
    slopes = []  # newest first
    for i, t in enumerate(timesteps):
        sigma = sigmas[i]
        slopes.insert(0, (x.to(torch.float32) - d(x, sigma, t)) / sigma)
        del slopes[order:]
        coeffs = lms_coefficients(sigmas, i, len(slopes))
        x = (x + sum(c * slope for c, slope in zip(coeffs, slopes))).to(x.dtype)
        if callback is not None:
            callback({"i": i, "x": x})
    return x
