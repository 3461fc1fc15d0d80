"""Multistep exponential integrators: DPM-Solver++ 2M (and its SDE variant), 3M SDE and UniPC, in data
prediction form.

x lives in the DDPM ("variance preserving") form x_t = alpha_t x0 + sigma_t eps, with alpha_t and
sigma_t from the sigma of spacing.multistep_sigmas: alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t,
and the half log-SNR lambda_t = log(alpha_t / sigma_t). Each step reuses the previous step's x0 estimate
(no extra U-Net call). Checked against diffusers' DPMSolverMultistepScheduler (dpmsolver++ /
sde-dpmsolver++, midpoint; solver_order 3 for 3M) and UniPCMultistepScheduler (bh2, order 2), so the
arithmetic follows theirs.

Papers: DPM-Solver++ (Lu et al. 2022, https://arxiv.org/abs/2211.01095), UniPC (Zhao et al. 2023,
https://arxiv.org/abs/2302.04867).
"""

import torch


def _alpha_sigma_lambda(sigma):
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    sigma_t = sigma * alpha_t
    return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)  # lambda = +inf at sigma = 0


def data_prediction(output, x, sigma, prediction_type):
    """x0 from the network's output at x (DPM-Solver++ eq. 8's x_theta)."""
    alpha_t, sigma_t, _ = _alpha_sigma_lambda(sigma)
    if prediction_type == "epsilon":
        return (x - sigma_t * output) / alpha_t
    if prediction_type == "v_prediction":
        return alpha_t * x - sigma_t * output
    return output


def sample_dpmpp_2m(model, x, sigmas, timesteps, prediction_type, sde=False, noise_fn=None, callback=None,
                    order=2, heun=False):
    """DPM-Solver++(2M) (Lu et al. 2022, algorithm 2) with a first-order first and last step; with
    sde=True the SDE variant (sec. 5 / k-diffusion's dpmpp_2m_sde, eta 1), fresh noise at every step.
    order=3 is DPM-Solver++(3M), the third-order multistep update in data-prediction form as diffusers
    writes it, from the third step on (_order_at says when a step takes a lower order).
    heun=True takes the second-order SDE step in Heun's form instead of the midpoint's (solver_type "heun")."""
    t_device = timesteps.to(x.device)
    n = len(timesteps)
    x0s = []  # the previous steps' x0 estimates, newest last
    for i in range(n):
        x0 = data_prediction(model(x, t_device[i]), x, sigmas[i], prediction_type)
        sample = x.to(torch.float32)
        noise = noise_fn(sample) if sde else None  # float32 draws, as diffusers makes them
        alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sigmas[i + 1])
        _, sigma_s0, lambda_s0 = _alpha_sigma_lambda(sigmas[i])
        h = lambda_t - lambda_s0
        lambdas = [_alpha_sigma_lambda(sigmas[i - k])[2] for k in (1, 2) if k <= len(x0s)]
        step_order = _order_at(i, n, order, len(x0s))
        if step_order == 1:
            d = x0  # first order (DPM-Solver++ eq. 9, a DDIM step)
        elif step_order == 2:
            r0 = (lambda_s0 - lambdas[0]) / h
            d = (x0, (1.0 / r0) * (x0 - x0s[-1]))  # D0, D1: eq. 10's first difference
        else:
            d = _third_order_differences(x0, x0s, h, lambda_s0, lambdas)
        if sde:  # x_t = (sigma_t / sigma_s) e^-h x + alpha_t (1 - e^-2h) D + sigma_t sqrt(1 - e^-2h) z
            x_t = _sde_terms((sigma_t / sigma_s0 * torch.exp(-h)) * sample, alpha_t, h, d, heun)
            x_t = x_t + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        else:  # x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) (D0 + D1 / 2)   (midpoint form)
            x_t = _ode_terms((sigma_t / sigma_s0) * sample, alpha_t, h, d)
        x = x_t.to(x.dtype)
        x0s = (x0s + [x0])[-2:]
        if callback is not None:
            callback({"i": i, "x": x})
    return x


def _order_at(i: int, n: int, order: int, seen: int) -> int:
    """The order step i of n takes, with `seen` earlier x0 estimates (diffusers' lower_order_final): first
    at the first and last step, at most second at the second-to-last under 15 steps."""
    if seen == 0 or i == n - 1:
        return 1
    if order == 2 or seen < 2 or (i == n - 2 and n < 15):
        return 2
    return 3


def _third_order_differences(x0, x0s, h, lambda_s0, lambdas):
    """(D0, D1, D2) from the last three x0 estimates: divided differences over the half log-SNR steps
    h_0 = lambda_s0 - lambda_s1, h_1 = lambda_s1 - lambda_s2, with r_k = h_k / h."""
    r0, r1 = (lambda_s0 - lambdas[0]) / h, (lambdas[0] - lambdas[1]) / h
    d1_0, d1_1 = (1.0 / r0) * (x0 - x0s[-1]), (1.0 / r1) * (x0s[-1] - x0s[-2])
    return x0, d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1), (1.0 / (r0 + r1)) * (d1_0 - d1_1)


def _ode_terms(base, alpha_t, h, d):
    """base + the data terms of DPM-Solver++'s update: first order -alpha_t (e^-h - 1) D0; second order
    (midpoint) adds half that weight times D1; third order adds alpha_t ((e^-h - 1) / h + 1) D1
    - alpha_t ((e^-h - 1 + h) / h^2 - 1/2) D2 instead."""
    weight = -(alpha_t * (torch.exp(-h) - 1.0))
    if not isinstance(d, tuple):
        return base + weight * d
    if len(d) == 2:
        return base + weight * d[0] + 0.5 * weight * d[1]
    return (base + weight * d[0] + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d[1]
            - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * d[2])


def _sde_terms(base, alpha_t, h, d, heun=False):
    """The same for the SDE variant: alpha_t (1 - e^-2h) D0 (+ half that times D1 at second order, or in
    Heun's form alpha_t ((1 - e^-2h) / (-2h) + 1) D1; at third order that D1 term
    + alpha_t ((1 - e^-2h - 2h) / (2h)^2 - 1/2) D2)."""
    weight = alpha_t * (1 - torch.exp(-2.0 * h))
    if not isinstance(d, tuple):
        return base + weight * d
    if len(d) == 2 and heun:
        return base + weight * d[0] + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d[1]
    if len(d) == 2:
        return base + weight * d[0] + 0.5 * weight * d[1]
    return (base + (alpha_t * (1.0 - torch.exp(-2.0 * h))) * d[0]
            + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d[1]
            + (alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * d[2])


def sample_unipc(model, x, sigmas, timesteps, prediction_type, callback=None):
    """UniPC-2 with the B(h) = e^h - 1 variant (bh2, Zhao et al. 2023, algorithms 2-3): each step
    first corrects the previous prediction with the new x0 estimate (UniC), then predicts the next x
    (UniP); first order at the first and last step."""
    t_device = timesteps.to(x.device)
    x0s = []  # x0 estimates of the previous steps, newest last
    last_x, order = None, 1
    for i in range(len(timesteps)):
        x0 = data_prediction(model(x, t_device[i]), x, sigmas[i], prediction_type)
        if last_x is not None:  # UniC: x_i from x_{i-1}, with the x0 at x_i itself
            x = _unipc_update(last_x, sigmas, i - 1, x0s, order, corrector=x0)
        x0s = (x0s + [x0])[-2:]
        order = min(2, len(timesteps) - i, len(x0s))
        last_x = x
        x = _unipc_update(x, sigmas, i, x0s, order)  # UniP: x_{i+1}
        if callback is not None:
            callback({"i": i, "x": x})
    return x


def _unipc_update(x, sigmas, s, x0s, order, corrector=None):
    """x at sigmas[s + 1] from x at sigmas[s]: the predictor (UniPC eq. 8) with x0s[-1] = m0 taken at
    sigmas[s]; with `corrector` (the x0 estimate at sigmas[s + 1]) the corrector (eq. 7) instead."""
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sigmas[s + 1])
    _, sigma_s0, lambda_s0 = _alpha_sigma_lambda(sigmas[s])
    m0 = x0s[-1]
    h = lambda_t - lambda_s0
    hh = -h  # data prediction
    h_phi_1 = torch.expm1(hh)  # h phi_1(h) = e^h - 1
    b_h = torch.expm1(hh)  # bh2
    d1 = None
    if order == 2:
        lambda_s1 = _alpha_sigma_lambda(sigmas[s - 1])[2]
        rk = (lambda_s1 - lambda_s0) / h
        d1 = torch.stack([(x0s[-2] - m0) / rk], dim=1)  # (B, K=1, ...)
    x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
    if corrector is None:
        if d1 is None:
            return (x_t - alpha_t * b_h * 0).to(x.dtype)
        rhos_p = torch.ones(1, dtype=x.dtype, device=x.device) * 0.5
        return (x_t - alpha_t * b_h * torch.einsum("k,bkc...->bc...", rhos_p, d1)).to(x.dtype)
    d1_t = corrector - m0
    if order == 1:
        rhos_c = torch.ones(1, dtype=x.dtype, device=x.device) * 0.5
        return (x_t - alpha_t * b_h * (0 + rhos_c[-1] * d1_t)).to(x.dtype)
    # eq. 7's coefficients: solve R rho = b with R = [[1, 1], [r_1, 1]], b_k = k! h phi_{k+1}(h) / B(h)
    h_phi_k = h_phi_1 / hh - 1
    b = [h_phi_k / b_h]
    h_phi_k = h_phi_k / hh - 1 / 2
    b.append(h_phi_k * 2 / b_h)
    # the 2x2 solve on the sigmas' device (the CPU): no host sync per step on a GPU
    rks = torch.stack([rk, torch.ones((), device=rk.device)])
    rhos_c = torch.linalg.solve(torch.stack([rks**0, rks**1]), torch.stack(b)).to(x.device).to(x.dtype)
    corr = torch.einsum("k,bkc...->bc...", rhos_c[:-1], d1)
    return (x_t - alpha_t * b_h * (corr + rhos_c[-1] * d1_t)).to(x.dtype)
