"""Samplers: short pure functions with one signature.

    sampler(denoiser, x_T, timesteps, *, generator, options, callback=None) -> (x_0, nfe)

``x_T`` is a draw from the prior, ``timesteps`` the noisy times to visit, largest first (float [K]),
``options`` the SampleConfig and ``nfe`` the number of network evaluations per sample.
The callback, if given, is called as ``callback(step, t, x)`` after every step.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch
from torch import Tensor

from .config import SampleConfig
from .denoiser import Denoiser
from .processes import expand
from .registry import Registry

Callback = Optional[Callable[[int, float, Tensor], None]]


class Sampler(Protocol):
    def __call__(
        self,
        denoiser: Denoiser,
        x_T: Tensor,
        timesteps: Tensor,
        *,
        generator: torch.Generator,
        options: SampleConfig,
        variance: str = "beta_tilde",
        callback: Callback = None,
    ) -> tuple[Tensor, int]: ...


SAMPLERS: Registry[Sampler] = Registry("sample.sampler")


def _full(t: Tensor, x: Tensor) -> Tensor:
    return t.expand(x.shape[0])


@SAMPLERS.register("ancestral")
@torch.no_grad()
def ancestral(denoiser, x_T, timesteps, *, generator, options, variance="beta_tilde", callback=None):
    """Ho et al. 2020, Algorithm 2, written with alpha and sigma: from each t to the next time s < t
    (s = 0 after the last), x_s ~ N(mu(x_t, x0_hat), v) with mu the posterior mean of q(x_s | x_t, x0)
    at x0 = x0_hat and v either beta-tilde (the posterior variance) or beta (sigma^2_{t|s}, the
    forward variance). The last step returns the mean. Works for vp and ve processes alike."""
    process = denoiser.process
    times = torch.cat([timesteps, timesteps.new_zeros(1)])
    x = x_T
    for k in range(len(timesteps)):
        t, s = _full(times[k], x), _full(times[k + 1], x)
        x0_hat = denoiser.x0(x, t)
        mean, beta_tilde = process.posterior(x, x0_hat, s, t)
        if k == len(timesteps) - 1:
            x = mean
        else:
            var = beta_tilde if variance == "beta_tilde" else process.transition(s, t)[1].to(x.device, torch.float32)
            noise = torch.randn(x.shape, generator=generator, device=x.device)
            x = mean + expand(var.sqrt(), x) * noise
        if callback:
            callback(k, float(times[k]), x)
    return x, len(timesteps)


@SAMPLERS.register("annealed_langevin")
@torch.no_grad()
def annealed_langevin(denoiser, x_T, timesteps, *, generator, options, variance="beta_tilde", callback=None):
    """Song & Ermon 2019, Algorithm 1: at each noise level sigma_i, largest first, run
    ``options.steps_per_level`` Langevin steps x <- x + a_i / 2 * score + sqrt(a_i) z with step size
    a_i = eps * sigma_i^2 / sigma_min^2 (eps = ``options.step_size``). With ``options.denoise``, one
    last Tweedie step returns E[x0 | x] = (x + sigma_min^2 score) / alpha (Jolicoeur-Martineau et al. 2021)."""
    process = denoiser.process
    sigma_min = process.sigma(timesteps[-1:]).item()
    x = x_T
    for k, t_level in enumerate(timesteps):
        t = _full(t_level, x)
        step = options.step_size * process.sigma(t_level[None]).item() ** 2 / sigma_min**2
        for _ in range(options.steps_per_level):
            noise = torch.randn(x.shape, generator=generator, device=x.device)
            x = x + 0.5 * step * denoiser.score(x, t) + step**0.5 * noise
        if callback:
            callback(k, float(t_level), x)
    nfe = len(timesteps) * options.steps_per_level
    if options.denoise:
        x = denoiser.x0(x, _full(timesteps[-1], x))
        nfe += 1
    return x, nfe


def draw_samples(
    denoiser: Denoiser,
    options: SampleConfig,
    shape: tuple[int, ...],
    n: int,
    generator: torch.Generator,
    device: torch.device,
    variance: str = "beta_tilde",
) -> tuple[Tensor, int]:
    """n samples of per-example ``shape`` in batches of ``options.batch_size`` with the configured
    sampler, over every noisy time of the process. Returns (samples on CPU [n, *shape], nfe per sample)."""
    sampler = SAMPLERS.get(options.sampler)
    timesteps = denoiser.process.timesteps(device)
    batches, nfe = [], 0
    for start in range(0, n, options.batch_size):
        size = min(options.batch_size, n - start)
        x_T = denoiser.process.prior_sample((size, *shape), generator, device)
        x, nfe = sampler(denoiser, x_T, timesteps, generator=generator, options=options, variance=variance)
        batches.append(x.float().cpu())
    return torch.cat(batches), nfe
