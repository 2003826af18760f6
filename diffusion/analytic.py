"""Exact models for data whose diffused marginals are known in closed form.

For Gaussian data x0 ~ N(mu, C), q(x_t) = N(alpha mu, alpha^2 C + sigma^2 I), so the optimal
denoiser is exact: E[eps | x_t] = sigma (alpha^2 C + sigma^2 I)^{-1} (x_t - alpha mu), and the score
is -E[eps | x_t] / sigma. Its probability-flow ODE is exact too (:meth:`GaussianData.flow_nll`). Tests and
benchmarks plug it into samplers, losses and likelihoods in
place of a network.
"""
from __future__ import annotations

import math

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

    def nll(self, x: Tensor, mean: Tensor | None = None, variances: Tensor | None = None) -> Tensor:
        """-log N(x; mean, U diag(variances) U^T) in nats per example (float64 [B]), U the eigenvectors of
        the covariance; by default the data's own density N(mu, C)."""
        mean = self.mean if mean is None else mean
        variances = self.eigvals if variances is None else variances
        z = (x.double() - mean) @ self.eigvecs
        return 0.5 * ((z**2 / variances).sum(1) + variances.log().sum() + self.dim * math.log(2 * math.pi))

    def flow_nll(self, process: GaussianProcess, x0: Tensor, t0: float) -> dict:
        """What the probability-flow ODE likelihood computes, in closed form (nats per example, float64 [B]).

        In the covariance's eigenbasis (eigenvalues l_k) every coordinate of x_t - alpha_t mu is carried with
        its marginal standard deviation s_k(t) = sqrt(alpha_t^2 l_k + sigma_t^2): the ODE's velocity is
        f y + g^2 y / (2 s^2) and d log s / dt = f + g^2 / (2 s^2) since g^2 = d sigma^2/dt - 2 f sigma^2.
        So the flow from t0 to 1 is the affine map x1 = alpha_1 mu + U diag(s(1) / s(t0)) U^T (x0 - alpha_t0 mu),
        and with x0 placed at t0 and the prior N(0, sigma_1^2 I)

            flow = -log N(x1; 0, sigma_1^2 I) - sum_k log(s_k(1) / s_k(t0)).

        Returns ``flow``, ``x1`` [B, D], ``data`` (-log N(x0; mu, C)) and ``marginal`` (-log q_t0(x0),
        q_t0 = N(alpha mu, alpha^2 C + sigma^2 I)); flow differs from data only by the smoothing at t0 and
        the prior's mismatch with q_1."""
        def coefficients(t: float) -> tuple[float, float]:
            t64 = torch.tensor([t], dtype=torch.float64)
            return process.log_alpha64(t64).exp().item(), process.log_sigma64(t64).exp().item()

        a0, s0 = coefficients(t0)
        a1, s1 = coefficients(1.0)
        var0, var1 = a0**2 * self.eigvals + s0**2, a1**2 * self.eigvals + s1**2
        x1 = a1 * self.mean + (((x0.double() - a0 * self.mean) @ self.eigvecs) * (var1 / var0).sqrt()) @ self.eigvecs.T
        prior = 0.5 * ((x1**2).sum(1) / s1**2 + self.dim * math.log(2 * math.pi * s1**2))
        return {"flow": prior - 0.5 * (var1 / var0).log().sum(), "x1": x1, "data": self.nll(x0),
                "marginal": self.nll(x0, a0 * self.mean, var0)}
