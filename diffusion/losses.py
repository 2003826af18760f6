"""Loss weightings: weights on one squared error between predicted and true noise.

Every weighting is a function ``(eps_hat, eps, alpha, sigma) -> loss [B]`` with alpha and sigma
broadcast against the data. Squared errors are averaged over data dimensions (not summed), so
losses are comparable across image sizes; the papers' sums are D times larger.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .denoiser import Denoiser
from .parameterizations import eps_to_score
from .registry import Registry

Weighting = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
WEIGHTINGS: Registry[Weighting] = Registry("loss.weighting")


def _mean_over_dims(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


@WEIGHTINGS.register("simple")
def simple(eps_hat: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """L_simple = ||eps - eps_hat||^2 (Ho et al. 2020, eq. 14 and Algorithm 1)."""
    return _mean_over_dims((eps_hat - eps) ** 2)


@WEIGHTINGS.register("sigma2")
def sigma2(eps_hat: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Denoising score matching with lambda(sigma) = sigma^2 (Song & Ermon 2019, eqs. 5-6):
    1/2 lambda(sigma) ||s_hat(x_t) - grad log q(x_t | x0)||^2 with grad log q(x_t | x0) = -eps / sigma
    For alpha != 1 this is the same expression with q(x_t | x0) = N(alpha x0, sigma^2 I)."""
    score_hat = eps_to_score(eps_hat, sigma)
    score_target = eps_to_score(eps, sigma)
    return 0.5 * _mean_over_dims(sigma**2 * (score_hat - score_target) ** 2)


def diffusion_loss(
    denoiser: Denoiser, weighting: Weighting, x0: Tensor, generator: torch.Generator
) -> Tensor:
    """One Monte Carlo estimate of the weighted loss on a batch x0 [B, ...]: the mean over the batch."""
    process = denoiser.process
    t = process.sample_times(x0.shape[0], generator, x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    x_t = process.marginal(x0, t, eps)
    eps_hat = denoiser.eps(x_t, t)
    alpha, sigma = denoiser._coefs(x_t, t)
    return weighting(eps_hat.float(), eps, alpha, sigma).mean()
