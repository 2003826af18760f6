"""Samplers: short pure functions with one signature.

    sampler(denoiser, x_T, timesteps, *, generator, callback=None, **options) -> (x_0, nfe)

``x_T`` is a draw from the prior, ``timesteps`` the noisy times to visit, largest first (float [K]), and
``nfe`` the number of network evaluations per sample. ``options`` are the sampler's own keyword options, plain
numbers and names with its paper's defaults (``ancestral``'s ``variance``, ``ddim``'s ``eta``, ``ode_heun``'s
``churn``, ...); a sampler without options takes none. So any sampler runs from plain numbers, e.g.
``ddim(denoiser, x_T, uniform_spacing(process, 50), generator=g, eta=0.0)``; ``factory.make_timesteps`` and
``factory.draw_samples`` are the entry points from a SampleConfig, passing each spacing and sampler exactly the
options it declares (``diffusion.registry.options_for``), and :func:`in_batches` is the one sampling loop. The callback, if given, is called as
``callback(step, t, x)`` after every step. Every sampler ends at t = 0 with the denoiser's x0
prediction at the last visited time (Tweedie's formula), which is also what the last step of
ancestral sampling returns (Ho et al. 2020, Algorithm 2, t = 1).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
from torch import Tensor

from .denoiser import Denoiser
from .elbo import reverse_variance_like
from .processes import GaussianProcess, expand
from .registry import Registry

Callback = Optional[Callable[[int, float, Tensor], None]]


class Sampler(Protocol):
    """The one signature: the sampler's own keyword options, each with its default, follow ``callback``."""

    def __call__(
        self,
        denoiser: Denoiser,
        x_T: Tensor,
        timesteps: Tensor,
        *,
        generator: torch.Generator,
        callback: Callback = None,
        **options: Any,
    ) -> tuple[Tensor, int]: ...


SAMPLERS: Registry[Sampler] = Registry("sample.sampler")
SPACINGS: Registry[Callable] = Registry("sample.spacing")


def _full(t: Tensor | float, x: Tensor) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])


def _noise(x: Tensor, generator: torch.Generator, process: Optional[GaussianProcess] = None) -> Tensor:
    """N(0, I) like x (in ``process``'s basis: the same draws, rotated, for a per-dimension process)."""
    if process is not None:
        return process.noise(x.shape, generator, x.device).to(x.dtype)
    return torch.randn(x.shape, generator=generator, device=x.device)


def _pairs(timesteps: Tensor):
    """(k, t, s) for consecutive times, the last s being 0 (clean data)."""
    times = torch.cat([timesteps, timesteps.new_zeros(1)]).tolist()
    return [(k, times[k], times[k + 1]) for k in range(len(timesteps))]


def _coef(process: GaussianProcess, t: float, device=None) -> tuple[float, float]:
    """(alpha(t), sigma(t)) as Python floats (a per-dimension process: float32 tensors [1, *shape] on ``device``)."""
    t_ = torch.tensor([t], dtype=torch.float64)
    return _value(process.alpha(t_), device), _value(process.sigma(t_), device)


def _value(v: Tensor, device=None):
    """A Python float from a one-element tensor; a per-dimension one stays a float32 tensor (on ``device``)."""
    return v.item() if v.numel() == 1 else v.to(device, torch.float32)


# --- discrete-step samplers -----------------------------------------------------------------------
@SAMPLERS.register("ancestral")
@torch.no_grad()
def ancestral(denoiser, x_T, timesteps, *, generator, callback=None, variance="beta_tilde"):
    """Ho et al. 2020, Algorithm 2, written with alpha and sigma: from each t to the next time s < t,
    x_s ~ N(mu(x_t, x0_hat), v), mu the posterior mean of q(x_s | x_t, x0) at x0 = x0_hat and v, by ``variance``:
    beta_tilde (the posterior variance; the default), beta (sigma^2_{t|s}, the forward variance; Ho et al. 2020,
    sec. 3.2, found the two alike) or learned_range, the network's interpolation between them (Nichol & Dhariwal
    2021; ``diffusion.elbo.reverse_variance``). On a subset of the grid this is improved-diffusion's respacing
    (Nichol & Dhariwal 2021, sec. 4)."""
    process, x = denoiser.process, x_T
    for k, t, s in _pairs(timesteps):
        tt = _full(t, x)
        eps_hat, head = denoiser.predict(x, tt)
        alpha_t, sigma_t = _coef(process, t, x.device)
        x0_hat = (x - sigma_t * eps_hat) / alpha_t
        if s == 0:
            x = x0_hat
        else:
            mean, _ = process.posterior(x, x0_hat, _full(s, x), tt)
            var = reverse_variance_like(process, _full(s, x), tt, variance, head, x)
            x = mean + var.sqrt().to(x.dtype) * _noise(x, generator, process)
        if callback:
            callback(k, t, x)
    return x, len(timesteps)


@SAMPLERS.register("ddim")
@torch.no_grad()
def ddim(denoiser, x_T, timesteps, *, generator, callback=None, eta=0.0):
    """Song, Meng & Ermon 2021, eq. 12 with eq. 16: x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,
    c = eta * sqrt(posterior variance). eta = 0 (the default) is their deterministic DDIM; eta = 1 is ancestral
    with beta-tilde."""
    process, x = denoiser.process, x_T
    for k, t, s in _pairs(timesteps):
        eps_hat = denoiser.eps(x, _full(t, x))
        alpha_t, sigma_t = _coef(process, t, x.device)
        x0_hat = (x - sigma_t * eps_hat) / alpha_t
        if s == 0:
            x = x0_hat
        else:
            alpha_s, sigma_s = _coef(process, s, x.device)
            c = eta * _value(process.posterior_variance(torch.tensor([s]), torch.tensor([t])), x.device) ** 0.5
            rest = (sigma_s**2 - c**2).clamp(min=0) ** 0.5 if process.per_dimension else max(sigma_s**2 - c**2, 0.0) ** 0.5
            x = alpha_s * x0_hat + rest * eps_hat + c * _noise(x, generator, process)
        if callback:
            callback(k, t, x)
    return x, len(timesteps)


@SAMPLERS.register("annealed_langevin")
@torch.no_grad()
def annealed_langevin(denoiser, x_T, timesteps, *, generator, callback=None, steps_per_level=100, step_size=2e-5,
                      denoise=True):
    """Song & Ermon 2019, Algorithm 1: at each noise level sigma_i, largest first, run
    ``steps_per_level`` Langevin steps x <- x + a_i / 2 * score + sqrt(a_i) z with step size
    a_i = eps * sigma_i^2 / sigma_min^2 (eps = ``step_size``; the defaults T = 100 and eps = 2e-5 are theirs,
    sec. 5). With ``denoise``, one last Tweedie step returns E[x0 | x] = (x + sigma_min^2 score) / alpha
    (Jolicoeur-Martineau et al. 2021)."""
    process = denoiser.process
    sigma_min = _coef(process, timesteps[-1].item())[1]
    x = x_T
    for k, t_level in enumerate(timesteps.tolist()):
        t = _full(t_level, x)
        step = step_size * (_coef(process, t_level)[1] / sigma_min) ** 2
        for _ in range(steps_per_level):
            x = x + 0.5 * step * denoiser.score(x, t) + step**0.5 * _noise(x, generator)
        if callback:
            callback(k, t_level, x)
    nfe = len(timesteps) * steps_per_level
    if denoise:
        x = denoiser.x0(x, _full(timesteps[-1], x))
        nfe += 1
    return x, nfe


# --- SDE samplers (Song et al. 2021) ---------------------------------------------------------------
@SAMPLERS.register("euler_maruyama")
@torch.no_grad()
def euler_maruyama(denoiser, x_T, timesteps, *, generator, callback=None):
    """The reverse-time SDE dx = [f x - g^2 score] dt + g dw (Song et al. 2021, eq. 6; Anderson 1982)
    with Euler-Maruyama steps from t to s: x <- x - (f x - g^2 score)(t - s) + g sqrt(t - s) z."""
    process, x = denoiser.process, x_T
    for k, t, s in _pairs(timesteps):
        tt = _full(t, x)
        if s == 0:
            x = denoiser.x0(x, tt)
        else:
            f, g2 = (expand(v.to(x.device), x) for v in process.sde(tt[:1]))
            drift = f * x - g2 * denoiser.score(x, tt)
            x = x - drift * (t - s) + (g2 * (t - s)).sqrt() * _noise(x, generator)
        if callback:
            callback(k, t, x)
    return x, len(timesteps)


def _reverse_diffusion_step(denoiser, x, t, s, generator):
    """Song et al. 2021, eq. 46: the reverse of the forward step x_t = a x_s + sqrt(v) z:
    x_s = x_t - (a - 1) x_t + v score + sqrt(v) z."""
    a, v = (float(c) for c in denoiser.process.transition(_full(s, x)[:1], _full(t, x)[:1]))
    return (2 - a) * x + v * denoiser.score(x, _full(t, x)) + v**0.5 * _noise(x, generator)


@SAMPLERS.register("reverse_diffusion")
@torch.no_grad()
def reverse_diffusion(denoiser, x_T, timesteps, *, generator, callback=None):
    """Song et al. 2021, appendix E: the reverse-diffusion predictor, discretizing the reverse SDE the
    same way as the forward process."""
    x = x_T
    for k, t, s in _pairs(timesteps):
        x = denoiser.x0(x, _full(t, x)) if s == 0 else _reverse_diffusion_step(denoiser, x, t, s, generator)
        if callback:
            callback(k, t, x)
    return x, len(timesteps)


def langevin_corrector(denoiser, x, t: float, a: float, snr: float, steps: int, generator) -> Tensor:
    """Song et al. 2021, Algorithms 4-5, the corrector: ``steps`` Langevin steps x <- x + e score + sqrt(2 e) z at
    time t, with one step size for the whole batch, e = 2 a (r mean ||z|| / mean ||score||)^2, the means over the
    batch of the per-example norms as in Song et al.'s code (r = snr; a = 1 - beta of the step, alpha_{t|s}^2:
    1 for ve). A step computed from each example's own norms depends on its state, and that chain does not
    leave q_t invariant (it widens the narrowest directions); a shared step leaves only unadjusted Langevin's
    discretization bias: x <- (1 - e / v) x + sqrt(2 e) z keeps a Gaussian direction of variance v at
    v / (1 - e / (2 v)). The step is shared by the ``sample.batch_size`` examples of a batch (a batch of one
    is back to the example's own norms)."""
    tt = _full(t, x)
    for _ in range(steps):
        score, z = denoiser.score(x, tt), _noise(x, generator)
        ratio = z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean().clamp(min=1e-12)
        e = 2 * a * (snr * ratio) ** 2
        x = x + e * score + (2 * e).sqrt() * z
    return x


@SAMPLERS.register("pc")
@torch.no_grad()
def predictor_corrector(denoiser, x_T, timesteps, *, generator, callback=None, snr=0.16, corrector_steps=1):
    """Song et al. 2021, Algorithms 2-3 (and 4-5): at each time t, ``corrector_steps`` Langevin
    corrector steps (``langevin_corrector``, r = ``snr``, a = alpha_{t|s}^2 for the next time s, alpha_{t|0}^2 on the
    last step), then a reverse-diffusion predictor step to s (Tweedie's x0 on the last). The defaults, one corrector
    step per predictor step at r = 0.16, are those of Song et al.'s released CIFAR-10 configurations (score_sde)."""
    process, x = denoiser.process, x_T
    for k, t, s in _pairs(timesteps):
        tt = _full(t, x)
        a = float(process.transition(_full(s, x)[:1], tt[:1])[0]) ** 2
        x = langevin_corrector(denoiser, x, t, a, snr, corrector_steps, generator)
        x = denoiser.x0(x, tt) if s == 0 else _reverse_diffusion_step(denoiser, x, t, s, generator)
        if callback:
            callback(k, t, x)
    return x, len(timesteps) * (1 + corrector_steps)


# --- probability-flow ODE samplers ------------------------------------------------------------------
# In the coordinates y = x / alpha, sigma~ = sigma / alpha (Karras et al. 2022, eq. 4 with s(t) = alpha),
# the probability-flow ODE of every process is dy / dsigma~ = eps_hat.
def _scaled_sigma(process: GaussianProcess, t: float) -> float:
    alpha, sigma = _coef(process, t)
    return sigma / alpha


@SAMPLERS.register("ode_euler")
@torch.no_grad()
def ode_euler(denoiser, x_T, timesteps, *, generator, callback=None):
    """Euler steps of the probability-flow ODE in Karras et al.'s coordinates: y_s = y_t + (sigma~_s - sigma~_t) eps_hat
    (the same update as DDIM with eta = 0; Karras et al. 2022, sec. 3)."""
    return _karras_ode(denoiser, x_T, timesteps, generator, 0.0, callback, second_order=False)


@SAMPLERS.register("ode_heun")
@torch.no_grad()
def ode_heun(denoiser, x_T, timesteps, *, generator, callback=None, churn=0.0):
    """Karras et al. 2022, Algorithm 1 (Heun's second-order method, Euler on the last step to sigma = 0; the
    default churn = 0) and, with ``churn`` (their S_churn) > 0, Algorithm 2: before each step the noise is raised
    from sigma~ to sigma^ = sigma~ (1 + gamma), gamma = min(churn / K, sqrt(2) - 1), by adding fresh noise."""
    return _karras_ode(denoiser, x_T, timesteps, generator, churn, callback, second_order=True)


def _karras_ode(denoiser, x, timesteps, generator, churn: float, callback, second_order: bool):
    process, nfe = denoiser.process, 0
    gamma = min(churn / len(timesteps), 2**0.5 - 1) if second_order else 0.0
    for k, t, s in _pairs(timesteps):
        if gamma > 0:
            sigma_t = _scaled_sigma(process, t)
            sigma_hat = sigma_t * (1 + gamma)
            t_hat = process.time_of_log_snr(torch.tensor([-2 * math.log(sigma_hat)])).item()
            y = x / _coef(process, t)[0] + (sigma_hat**2 - sigma_t**2) ** 0.5 * _noise(x, generator)
            x, t = _coef(process, t_hat)[0] * y, t_hat
        alpha_t, sigma_t = _coef(process, t)[0], _scaled_sigma(process, t)
        sigma_s = _scaled_sigma(process, s) if s > 0 else 0.0
        eps_hat = denoiser.eps(x, _full(t, x))
        nfe += 1
        y = x / alpha_t + (sigma_s - sigma_t) * eps_hat
        if second_order and s > 0:
            eps_next = denoiser.eps(_coef(process, s)[0] * y, _full(s, x))
            nfe += 1
            y = x / alpha_t + (sigma_s - sigma_t) * 0.5 * (eps_hat + eps_next)
        x = y * (_coef(process, s)[0] if s > 0 else 1.0)
        if callback:
            callback(k, t, x)
    return x, nfe


@SAMPLERS.register("ode_rk45")
@torch.no_grad()
def ode_rk45(denoiser, x_T, timesteps, *, generator, callback=None, rtol=1e-5, atol=1e-5):
    """The probability-flow ODE dx/dt = f x - 1/2 g^2 score (Song et al. 2021, eq. 13) from t = 1 to the
    last visited time with scipy's adaptive RK45 at tolerances ``rtol``, ``atol`` (1e-5 both, as Song et al.,
    appendix D.2; the timesteps only give the end points), then the Tweedie step to t = 0. NFE is the solver's
    count plus one."""
    from scipy.integrate import solve_ivp

    process, shape, device = denoiser.process, x_T.shape, x_T.device
    t_start, t_end = float(timesteps[0]), float(timesteps[-1])

    def velocity(t: float, y: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(y).to(device, torch.float32).reshape(shape)
        tt = _full(t, x)
        f, g2 = (expand(v.to(device), x) for v in process.sde(tt[:1]))
        dx = f * x - 0.5 * g2 * denoiser.score(x, tt)
        return dx.double().cpu().numpy().ravel()

    solution = solve_ivp(velocity, (t_start, t_end), x_T.double().cpu().numpy().ravel(),
                         method="RK45", rtol=rtol, atol=atol)
    x = torch.from_numpy(solution.y[:, -1]).to(device, torch.float32).reshape(shape)
    x = denoiser.x0(x, _full(t_end, x))
    if callback:
        callback(0, t_end, x)
    return x, int(solution.nfev) + 1


@SAMPLERS.register("dpm_solver_2m")
@torch.no_grad()
def dpm_solver_2m(denoiser, x_T, timesteps, *, generator, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): multistep second order in
    lambda = log(alpha / sigma) with data prediction. With h = lambda_s - lambda_t and r = h_prev / h,
    D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev (D = x0_t on the first step) and
    x_s = (sigma_s / sigma_t) x_t - alpha_s (exp(-h) - 1) D; the last step to t = 0 returns x0_t."""
    process, x = denoiser.process, x_T
    previous, h_previous = None, None
    for k, t, s in _pairs(timesteps):
        x0_hat = denoiser.x0(x, _full(t, x))
        if s == 0:
            x = x0_hat
        else:
            alpha_t, sigma_t = _coef(process, t)
            alpha_s, sigma_s = _coef(process, s)
            h = math.log(alpha_s / sigma_s) - math.log(alpha_t / sigma_t)
            data = x0_hat
            if previous is not None:
                r = h_previous / h
                data = (1 + 1 / (2 * r)) * x0_hat - (1 / (2 * r)) * previous
            x = (sigma_s / sigma_t) * x - alpha_s * math.expm1(-h) * data
            previous, h_previous = x0_hat, h
        if callback:
            callback(k, t, x)
    return x, len(timesteps)


# --- which times to visit: spacing(process, steps, **options) -> times (float64 [K]) -----------------
@SPACINGS.register("uniform")
def uniform_spacing(process: GaussianProcess, steps: int) -> Tensor:
    """Evenly spaced from t = 1 to t_min (discrete: the rounded grid indices T ... 1)."""
    if process.T is not None:
        return torch.linspace(process.T, 1, steps, dtype=torch.float64).round() / process.T
    return torch.linspace(1.0, process.t_min, steps, dtype=torch.float64)


@SPACINGS.register("leading")
def leading_spacing(process: GaussianProcess, steps: int) -> Tensor:
    """Indices 1, 1 + c, 1 + 2c, ... with c = T // steps (DDIM's and diffusers' "leading": the last step T
    may be skipped)."""
    stride = process.T // steps
    return (torch.arange(steps, dtype=torch.float64) * stride + 1).flip(0) / process.T


@SPACINGS.register("trailing")
def trailing_spacing(process: GaussianProcess, steps: int) -> Tensor:
    """Indices T, T - T/steps, ... (Lin et al. 2024, "Common Diffusion Noise Schedules ...", Table 2)."""
    return (process.T - torch.arange(steps, dtype=torch.float64) * process.T / steps).round() / process.T


@SPACINGS.register("quadratic")
def quadratic_spacing(process: GaussianProcess, steps: int) -> Tensor:
    """Times quadratic in the step index, dense near the data, sparse near the prior and ending at t = 1, where
    every sampler starts from the prior. For j = 0 .. K - 1 counted from the data:

        continuous: t_j = t_min + (1 - t_min) * (j / (K - 1))**2
        discrete: t_j = round(1 + (T - 1) * (j / (K - 1))**2) / T

    repeats removed (K near T visits fewer times: 98 for K = 100, T = 1000). The shape of DDIM's quadratic
    selection (Song, Meng & Ermon 2021, appendix D.2: tau_i = floor(c i^2), c such that the last is close to T);
    DDIM's released code, which gave its CIFAR-10 results, instead stops at 0.8 T (grid steps
    1 + floor(0.8 T (j / (K - 1))^2)): harmless for the linear vp schedule, whose alphabar(0.8) is 2e-3, but a ve
    sampler would start with the prior's sigma(1) at a time whose sigma(0.8) is several times smaller."""
    u = torch.linspace(1.0, 0.0, steps, dtype=torch.float64) ** 2
    if process.T is not None:
        return (1 + u * (process.T - 1)).round() / process.T
    return process.t_min + u * (1 - process.t_min)


@SPACINGS.register("karras")
def karras_spacing(process: GaussianProcess, steps: int, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: sigma~_i = (s_max^(1/rho) + i/(K-1) (s_min^(1/rho) - s_max^(1/rho)))^rho
    (their rho = 7) in sigma~ = sigma / alpha, mapped back to times through the log-SNR (to the nearest grid step in
    discrete time)."""
    ends = torch.tensor([1.0, process.t_min], dtype=torch.float64)
    log_snr = process.log_snr(ends).double()
    s_max, s_min = (-0.5 * log_snr).exp().tolist()
    i = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigma = (s_max ** (1 / rho) + i * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    target = -2 * sigma.log()
    if process.T is not None:
        grid = process.log_snr(torch.arange(1, process.T + 1, dtype=torch.float64) / process.T).double()
        nearest = (grid[None, :] - target[:, None]).abs().argmin(1) + 1
        return nearest.double() / process.T
    return process.time_of_log_snr(target).double()


Progress = Optional[Callable[[int, int], None]]  # progress(done, total): how far sampling has got


def in_batches(n: int, batch_size: int, draw: Callable[[int, int], tuple[Tensor, int]]) -> tuple[Tensor, int]:
    """The one sampling loop: n samples drawn ``batch_size`` at a time, ``draw(start, size) -> (samples [size, ...],
    NFE per sample)`` for the samples start..start+size; returns (every sample, on CPU, the NFE per sample)."""
    batches, nfe = [], 0
    for start in range(0, n, batch_size):
        x, nfe = draw(start, min(batch_size, n - start))
        batches.append(x.cpu())
    return torch.cat(batches), nfe


def step_callback(progress: Progress, start: int, batch_size: int, n: int, steps: int) -> Callback:
    """A sampler ``callback`` that tells ``progress(done, total)`` how far the sampling of n samples has got, the
    batch starting at ``start`` taking ``steps`` callback calls (the visited times; a sampler calling back less
    often, as ``ode_rk45`` does, jumps ahead): ``total`` = batches x ``steps``. It only counts its calls (no
    random numbers, nothing of x read); None without ``progress``."""
    if progress is None:
        return None
    batches, batch = -(-n // batch_size), start // batch_size
    calls = [0]

    def callback(k, t, x) -> None:
        calls[0] += 1
        progress(batch * steps + min(calls[0], steps), batches * steps)

    return callback
