"""The model signature every sampler, loss and likelihood takes.

A :class:`Denoiser` is a process plus a function ``eps(x_t, t) -> eps_hat`` (x_t: [B, ...],
t: float [B] in [0, 1]). A trained network is wrapped with its parameterization by
:func:`network_denoiser`; an exact analytic model (``diffusion.analytic``) plugs in the same way.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .parameterizations import Parameterization, eps_to_score, eps_to_x0
from .processes import GaussianProcess, expand

EpsFunction = Callable[[Tensor, Tensor], Tensor]


class Denoiser:
    """Predictions of eps, x0 and the score at (x_t, t) under a process."""

    def __init__(self, eps_fn: EpsFunction, process: GaussianProcess):
        self.eps_fn = eps_fn
        self.process = process

    def _coefs(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return expand(self.process.alpha(t), x_t), expand(self.process.sigma(t), x_t)

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.eps_fn(x_t, t)

    def x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = self._coefs(x_t, t)
        return eps_to_x0(self.eps_fn(x_t, t), x_t, alpha, sigma)

    def score(self, x_t: Tensor, t: Tensor) -> Tensor:
        _, sigma = self._coefs(x_t, t)
        return eps_to_score(self.eps_fn(x_t, t), sigma)


def network_denoiser(
    network: torch.nn.Module, parameterization: Parameterization, process: GaussianProcess
) -> Denoiser:
    """Wrap ``network(x_t, t) -> output`` so that its output is read through ``parameterization``."""

    def eps_fn(x_t: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = expand(process.alpha(t), x_t), expand(process.sigma(t), x_t)
        output = network(parameterization.input_scale(alpha, sigma) * x_t, t)
        return parameterization.to_eps(output, x_t, alpha, sigma)

    return Denoiser(eps_fn, process)
