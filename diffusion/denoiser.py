"""The model signature every sampler, loss and likelihood takes.

A :class:`Denoiser` is a process plus a function ``eps(x_t, t) -> eps_hat`` (x_t: [B, ...],
t: float [B] in [0, 1]). A trained network is wrapped with its parameterization by
:func:`network_denoiser`; an exact analytic model (``diffusion.analytic``) plugs in the same way.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .parameterizations import Parameterization, eps_to_score, eps_to_x0
from .processes import GaussianProcess, expand

EpsFunction = Callable[[Tensor, Tensor], Tensor]


class Denoiser:
    """Predictions of eps, x0 and the score at (x_t, t) under a process.

    With ``learned_variance``, ``eps_fn`` returns a pair (eps_hat, v): v [B, ...] is the raw output of
    a variance head, read by ``diffusion.elbo.reverse_variance`` (``model.variance: learned_range``)."""

    def __init__(self, eps_fn: EpsFunction, process: GaussianProcess, learned_variance: bool = False, cost: int = 1):
        self.eps_fn = eps_fn
        self.process = process
        self.learned_variance = learned_variance
        self.cost = cost  # network evaluations per call (2 for classifier-free guidance)

    def _coefs(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return expand(self.process.alpha(t), x_t), expand(self.process.sigma(t), x_t)

    def predict(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """(eps_hat, v) from one evaluation; v is None without a variance head."""
        out = self.eps_fn(x_t, t)
        return out if self.learned_variance else (out, None)

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.predict(x_t, t)[0]

    def x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = self._coefs(x_t, t)
        return eps_to_x0(self.eps(x_t, t), x_t, alpha, sigma)

    def score(self, x_t: Tensor, t: Tensor) -> Tensor:
        _, sigma = self._coefs(x_t, t)
        return eps_to_score(self.eps(x_t, t), sigma)


def network_denoiser(
    network: torch.nn.Module, parameterization: Parameterization, process: GaussianProcess,
    learned_variance: bool = False, labels: Optional[Tensor] = None, guidance_scale: float = 1.0,
) -> Denoiser:
    """Wrap ``network(x_t, t) -> output`` so that its output is read through ``parameterization``. With
    ``learned_variance`` the network has twice the data's channels: the second half is the variance head.

    ``labels [B]``: the classes a class-conditional network is asked for (None: its unconditional
    model). ``guidance_scale`` s: classifier-free guidance (Ho & Salimans 2022, eq. 6 with s = 1 + w),
    eps_hat = eps_u + s (eps_c - eps_u), the unconditional and conditional predictions made in one
    network call on a doubled batch; s = 1 is the conditional model alone, s = 0 the unconditional
    one. Guidance acts on eps_hat, so it combines with every parameterization and sampler; a variance
    head is read from the conditional half."""

    def predict(x_t: Tensor, t: Tensor, y: Optional[Tensor]):
        alpha, sigma = expand(process.alpha(t), x_t), expand(process.sigma(t), x_t)
        inputs = (parameterization.input_scale(alpha, sigma) * x_t, process.network_time(t))
        output = network(*inputs) if y is None else network(*inputs, y)
        head = None
        if learned_variance:
            output, head = output.chunk(2, dim=1)
        return parameterization.to_eps(output, x_t, alpha, sigma, t=t, process=process), head

    guided = labels is not None and guidance_scale != 1.0

    def eps_fn(x_t: Tensor, t: Tensor):
        if guidance_scale == 0.0:
            eps, head = predict(x_t, t, None)
        elif not guided:
            eps, head = predict(x_t, t, labels)
        else:
            null = torch.full_like(labels, network.label_embedding.num_classes)
            both, heads = predict(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]))
            eps_c, eps_u = both.chunk(2)
            eps, head = eps_u + guidance_scale * (eps_c - eps_u), None if heads is None else heads.chunk(2)[0]
        return (eps, head) if learned_variance else eps

    return Denoiser(eps_fn, process, learned_variance, cost=2 if guided and guidance_scale != 0.0 else 1)
