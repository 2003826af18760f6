"""Exact models for data whose diffused marginals are known in closed form.

For Gaussian data x0 ~ N(mu, C), q(x_t) = N(alpha mu, alpha^2 C + sigma^2 I), so the optimal
denoiser is exact: E[eps | x_t] = sigma (alpha^2 C + sigma^2 I)^{-1} (x_t - alpha mu), and the score
is -E[eps | x_t] / sigma. Tests and benchmarks plug it into samplers, losses and likelihoods in
place of a network.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .denoiser import Denoiser
from .processes import GaussianProcess, expand


class GaussianData:
    """N(mean, cov) in dimension D, with its exact diffused score (float64 internally)."""

    def __init__(self, mean: Tensor, cov: Tensor):
        self.mean = mean.double()
        self.cov = cov.double()
        self.dim = mean.shape[0]
        self.eigvals, self.eigvecs = torch.linalg.eigh(self.cov)

    @classmethod
    def random(cls, dim: int, seed: int = 0, min_var: float = 0.05, max_var: float = 1.0) -> "GaussianData":
        """A Gaussian with a random rotation and variances spread over [min_var, max_var]."""
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        variances = torch.linspace(min_var, max_var, dim, dtype=torch.float64)
        mean = 0.5 * torch.randn(dim, generator=g, dtype=torch.float64)
        return cls(mean, q @ torch.diag(variances) @ q.T)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.mean + (z * self.eigvals.sqrt()) @ self.eigvecs.T).float()

    def exact_eps(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """E[eps | x_t] for per-example alpha, sigma [B]: sigma U diag(1 / (alpha^2 l + sigma^2)) U^T (x - alpha mu)."""
        a, s = alpha.double()[:, None], sigma.double()[:, None]
        centred = (x_t.double() - a * self.mean) @ self.eigvecs  # [B, D] in the eigenbasis
        eps = s * centred / (a**2 * self.eigvals + s**2)
        return (eps @ self.eigvecs.T).to(x_t.dtype)

    def oracle_network(self, process: GaussianProcess, parameterization) -> torch.nn.Module:
        """A stand-in network whose raw output is the exact answer written in ``parameterization``
        (it undoes the parameterization's input scale first), to test the network path end to end."""
        data = self

        class Oracle(torch.nn.Module):
            def forward(self, x_in: Tensor, t: Tensor) -> Tensor:
                alpha, sigma = process.alpha(t), process.sigma(t)
                a, s = expand(alpha, x_in), expand(sigma, x_in)
                x_t = x_in / parameterization.input_scale(a, s)
                return parameterization.from_eps(data.exact_eps(x_t, alpha, sigma), x_t, a, s, t=t, process=process)

        return Oracle()

    def denoiser(self, process: GaussianProcess) -> Denoiser:
        """The Bayes-optimal denoiser under ``process`` (expects x_t of shape [B, D])."""
        return Denoiser(lambda x_t, t: self.exact_eps(x_t, process.alpha(t), process.sigma(t)), process)
