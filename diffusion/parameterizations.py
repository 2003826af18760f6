"""What the network predicts, as conversions in the common frame x_t = alpha x0 + sigma eps.

A parameterization is a pair of pure functions between the raw network output and the common
prediction eps_hat; every other prediction follows from it:
x0_hat = (x_t - sigma eps_hat) / alpha, score_hat = -eps_hat / sigma (Ho et al. 2020 eq. 11;
Song & Ermon 2019 sec. 3; Vincent 2011 for denoising score matching).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from .registry import Registry

Conversion = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (value, x_t, alpha, sigma) -> value


@dataclass(frozen=True)
class Parameterization:
    """``to_eps(output, x_t, alpha, sigma)`` and its inverse ``from_eps(eps, x_t, alpha, sigma)``.

    alpha and sigma are already broadcast against x_t ([B, 1, ...])."""

    name: str
    to_eps: Conversion
    from_eps: Conversion


PARAMETERIZATIONS: Registry[Parameterization] = Registry("model.parameterization")


def _register(p: Parameterization) -> None:
    PARAMETERIZATIONS.register(p.name)(p)


# eps: the network predicts the noise (Ho et al. 2020, eq. 11).
_register(Parameterization("eps", lambda out, x, a, s: out, lambda eps, x, a, s: eps))
# score: the network predicts grad_x log q(x_t) = -eps / sigma (Song & Ermon 2019, NCSN).
_register(Parameterization("score", lambda out, x, a, s: -s * out, lambda eps, x, a, s: -eps / s))


def eps_to_x0(eps: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x0_hat = (x_t - sigma eps) / alpha (Ho et al. 2020, eq. 15)."""
    return (x_t - sigma * eps) / alpha


def eps_to_score(eps: Tensor, sigma: Tensor) -> Tensor:
    """score = -eps / sigma, the score of q(x_t) given E[eps | x_t] (Tweedie)."""
    return -eps / sigma
