"""What the network predicts, as conversions in the common frame x_t = alpha x0 + sigma eps.

A parameterization is a pair of pure functions between the raw network output and the common
prediction eps_hat; every other prediction follows from it:
x0_hat = (x_t - sigma eps_hat) / alpha, score_hat = -eps_hat / sigma (Ho et al. 2020 eq. 11;
Song & Ermon 2019 sec. 3; Vincent 2011 for denoising score matching).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .processes import expand
from .registry import Registry

Conversion = Callable[..., Tensor]  # (value, x_t, alpha, sigma, *, t, process) -> value


def _unit_input(alpha: Tensor, sigma: Tensor) -> Tensor:
    return torch.ones_like(alpha)


@dataclass(frozen=True)
class Parameterization:
    """``to_eps(output, x_t, alpha, sigma, t=t, process=process)`` and its inverse
    ``from_eps(eps, x_t, alpha, sigma, t=t, process=process)``; ``input_scale(alpha, sigma)`` multiplies
    x_t before the network sees it (1 except for edm).

    alpha and sigma are already broadcast against x_t ([B, 1, ...]); t [B] and the process are needed
    only by ``mean``, whose target depends on the previous grid time (``needs_step``)."""

    name: str
    to_eps: Conversion
    from_eps: Conversion
    input_scale: Callable[[Tensor, Tensor], Tensor] = _unit_input
    needs_step: bool = False  # defined only for a discrete process (it refers to the step t - 1/T)


PARAMETERIZATIONS: Registry[Parameterization] = Registry("model.parameterization")


def _register(p: Parameterization) -> None:
    PARAMETERIZATIONS.register(p.name)(p)


# eps: the network predicts the noise (Ho et al. 2020, eq. 11).
_register(Parameterization("eps", lambda out, x, a, s, **_: out, lambda eps, x, a, s, **_: eps))
# score: the network predicts grad_x log q(x_t) = -eps / sigma (Song & Ermon 2019, NCSN).
_register(Parameterization("score", lambda out, x, a, s, **_: -s * out, lambda eps, x, a, s, **_: -eps / s))
# x0: the network predicts the clean data (Ho et al. 2020, sec. 3.2 and Table 2).
_register(Parameterization("x0", lambda out, x, a, s, **_: (x - a * out) / s, lambda eps, x, a, s, **_: (x - s * eps) / a))
# v: the network predicts v = alpha eps - sigma x0 (Salimans & Ho 2022, sec. 4 and appendix D). For any
# alpha, sigma: eps = (alpha v + sigma x_t) / (alpha^2 + sigma^2).
_register(Parameterization(
    "v",
    lambda out, x, a, s, **_: (a * out + s * x) / (a**2 + s**2),
    lambda eps, x, a, s, **_: ((a**2 + s**2) * eps - s * x) / a,
))

# edm: Karras et al. 2022, Table 1 and sec. 5, in their coordinates y = x_t / alpha, sigma~ = sigma / alpha:
# D(y) = c_skip y + c_out F(c_in y) with c_skip = sd^2 / (sigma~^2 + sd^2), c_out = sigma~ sd / sqrt(sigma~^2 + sd^2),
# c_in = 1 / sqrt(sigma~^2 + sd^2), sd = SIGMA_DATA. The noise conditioning c_noise is replaced by t, which
# the network already sees. The input scale c_in / alpha applies c_in to y.
SIGMA_DATA = 0.5


def _edm_coefficients(a: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    scaled = s / a
    norm = (scaled**2 + SIGMA_DATA**2).sqrt()
    return SIGMA_DATA**2 / norm**2, scaled * SIGMA_DATA / norm, scaled  # c_skip, c_out, sigma~


def _edm_to_eps(out: Tensor, x: Tensor, a: Tensor, s: Tensor, **_) -> Tensor:
    c_skip, c_out, _ = _edm_coefficients(a, s)
    x0 = c_skip * x / a + c_out * out
    return (x - a * x0) / s


def _edm_from_eps(eps: Tensor, x: Tensor, a: Tensor, s: Tensor, **_) -> Tensor:
    c_skip, c_out, _ = _edm_coefficients(a, s)
    x0 = (x - s * eps) / a
    return (x0 - c_skip * x / a) / c_out


_register(Parameterization("edm", _edm_to_eps, _edm_from_eps,
                           lambda a, s: 1 / (s**2 + a**2 * SIGMA_DATA**2).sqrt()))



# mean: the network predicts mu~(x_t, x0) of q(x_{t-1/T} | x_t, x0) (Ho et al. 2020, eq. 7 and Table 2's
# "mu~ prediction" baseline). With s = t - 1/T, mu~ = c_t x_t + c_0 x0 (``GaussianProcess.posterior``), so
# x0 = (mu~ - c_t x_t) / c_0 and eps = (x_t - alpha x0) / sigma; at the first step (s = 0) c_t = 0, c_0 = 1.
def _mean_coefficients(x: Tensor, t: Tensor, process) -> tuple[Tensor, Tensor]:
    if process is None or t is None or getattr(process, "T", None) is None:
        raise ValueError("the mean parameterization needs the discrete process and t (it predicts one step)")
    t = t.reshape(-1).double()
    c_t, c_0, _ = process.posterior_coefficients((t - 1.0 / process.T).clamp(min=0), t)
    return expand(c_t.to(x.device, x.dtype), x), expand(c_0.to(x.device, x.dtype), x)


def _mean_to_eps(out: Tensor, x: Tensor, a: Tensor, s: Tensor, *, t=None, process=None) -> Tensor:
    c_t, c_0 = _mean_coefficients(x, t, process)
    return (x - a * (out - c_t * x) / c_0) / s


def _mean_from_eps(eps: Tensor, x: Tensor, a: Tensor, s: Tensor, *, t=None, process=None) -> Tensor:
    c_t, c_0 = _mean_coefficients(x, t, process)
    return c_t * x + c_0 * (x - s * eps) / a


_register(Parameterization("mean", _mean_to_eps, _mean_from_eps, needs_step=True))


def eps_to_x0(eps: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x0_hat = (x_t - sigma eps) / alpha (Ho et al. 2020, eq. 15)."""
    return (x_t - sigma * eps) / alpha


def eps_to_score(eps: Tensor, sigma: Tensor) -> Tensor:
    """score = -eps / sigma, the score of q(x_t) given E[eps | x_t] (Tweedie)."""
    return -eps / sigma
