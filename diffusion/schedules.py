"""Noise schedules as functions of plain numbers, with the papers' defaults in their signatures: each a discrete
table from the number of steps T (vp: betas_1..T, ve: sigmas_1..T) and a continuous form in t in [0, 1] (vp:
alphabar(t), ve: sigma(t)). ``VP_SCHEDULES`` and ``VE_SCHEDULES`` register them under the names ``process.schedule``
takes; ``diffusion.process_families`` turns them into processes. A new schedule is one registered ``Schedule``;
its options are ``ProcessConfig`` fields of the same names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .registry import Registry


@dataclass(frozen=True)
class Schedule:
    """One noise schedule: its discrete table from T (vp: betas_1..T; ve: sigmas_1..T) and its continuous
    form in t (vp: alphabar(t); ve: sigma(t)), each a function of plain numbers with the paper's defaults."""

    discrete: Callable[..., Tensor]
    continuous: Callable[..., Tensor]


# Schedules per family: vp/subvp schedules give alphabar, ve schedules give sigma.
VP_SCHEDULES: Registry[Schedule] = Registry("process.schedule")
VE_SCHEDULES: Registry[Schedule] = Registry("process.schedule")


# --- vp schedules -------------------------------------------------------------------------------
def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02, max_beta: float = 0.999) -> Tensor:
    """beta_1..beta_T linear from beta_start to beta_end (Ho et al. 2020, sec. 4: 1e-4 to 0.02 at
    T = 1000). For other T both ends are scaled by 1000 / T so that the path keeps roughly the same
    end points (Nichol & Dhariwal 2021, improved-diffusion's convention); for T < 20 the scaled betas
    would pass 1 and are clipped at max_beta."""
    scale = 1000.0 / T
    betas = torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64)
    return betas.clamp(max=max_beta)


def linear_alphabar(t: Tensor, beta_min: float = 0.1, beta_max: float = 20.0) -> Tensor:
    """The VP-SDE's alphabar(t) = exp(-beta_min t - (beta_max - beta_min) t^2 / 2) for the linear
    beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021, eq. 33; beta_min = 0.1, beta_max = 20,
    the continuous limit of Ho et al.'s schedule: beta_min = T beta_start, beta_max = T beta_end)."""
    return torch.exp(-beta_min * t - 0.5 * (beta_max - beta_min) * t**2)


def cosine_alphabar(t: Tensor, cosine_s: float = 0.008) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alphabar(t) = f(t) / f(0), f(t) = cos((t + s) / (1 + s) * pi / 2)^2."""
    f = torch.cos((t + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    f0 = math.cos(cosine_s / (1 + cosine_s) * math.pi / 2) ** 2
    return f / f0


def betas_from_alphabar(alphabar: Callable[[Tensor], Tensor], T: int, max_beta: float = 0.999) -> Tensor:
    """beta_i = min(1 - alphabar(i/T) / alphabar((i-1)/T), max_beta) (Nichol & Dhariwal 2021, sec. 3.2)."""
    grid = torch.arange(T + 1, dtype=torch.float64) / T
    values = alphabar(grid)
    return torch.clamp(1 - values[1:] / values[:-1], max=max_beta)


def cosine_betas(T: int, cosine_s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    return betas_from_alphabar(lambda t: cosine_alphabar(t, cosine_s), T, max_beta)


def sigmoid_alphabar(t: Tensor, sigmoid_start: float = -3.0, sigmoid_end: float = 3.0,
                     sigmoid_tau: float = 1.0) -> Tensor:
    """The sigmoid schedule of Jabri et al. 2022 (RIN, appendix), clipped below at 1e-9:

        alphabar(t) = (v_end - sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)

    with v_start = sigmoid(start / tau) and v_end = sigmoid(end / tau) (start = -3, end = 3, tau = 1 by
    default), so that alphabar(0) = 1 and alphabar(1) = 0."""
    start, end, tau = sigmoid_start, sigmoid_end, sigmoid_tau
    v_start, v_end = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64)), torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    value = torch.sigmoid((t * (end - start) + start) / tau)
    return ((v_end - value) / (v_end - v_start)).clamp(min=1e-9)


def sigmoid_betas(T: int, sigmoid_start: float = -3.0, sigmoid_end: float = 3.0, sigmoid_tau: float = 1.0,
                  max_beta: float = 0.999) -> Tensor:
    return betas_from_alphabar(lambda t: sigmoid_alphabar(t, sigmoid_start, sigmoid_end, sigmoid_tau), T, max_beta)


def scaled_linear_betas(T: int, beta_start: float = 0.00085, beta_end: float = 0.012, max_beta: float = 0.999) -> Tensor:
    """sqrt(beta) linear from sqrt(beta_start) to sqrt(beta_end) (Rombach et al. 2022, latent diffusion;
    0.00085 and 0.012 there), scaled by 1000 / T like ``linear``."""
    scale = 1000.0 / T
    roots = torch.linspace((beta_start * scale) ** 0.5, (beta_end * scale) ** 0.5, T, dtype=torch.float64)
    return (roots**2).clamp(max=max_beta)


def scaled_linear_alphabar(t: Tensor, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Continuous limit of ``scaled_linear``: beta(t) = (sqrt(b0) + t (sqrt(b1) - sqrt(b0)))^2 with
    b = 1000 * beta_start/end, integrated: log alphabar(t) = -int_0^t beta(u) du."""
    r0, r1 = (1000 * beta_start) ** 0.5, (1000 * beta_end) ** 0.5
    integral = ((r0 + t * (r1 - r0)) ** 3 - r0**3) / (3 * (r1 - r0)) if r1 != r0 else r0**2 * t
    return torch.exp(-integral)


def _clipped_cosine_alphabar(t: Tensor, cosine_s: float = 0.008) -> Tensor:
    return cosine_alphabar(t, cosine_s).clamp(min=1e-9)


VP_SCHEDULES.register("linear")(Schedule(linear_betas, linear_alphabar))
VP_SCHEDULES.register("cosine")(Schedule(cosine_betas, _clipped_cosine_alphabar))
VP_SCHEDULES.register("sigmoid")(Schedule(sigmoid_betas, sigmoid_alphabar))
VP_SCHEDULES.register("scaled_linear")(Schedule(scaled_linear_betas, scaled_linear_alphabar))


# --- ve schedules -------------------------------------------------------------------------------
def geometric_sigmas(T: int, sigma_min: float = 0.01, sigma_max: float = 1.0) -> Tensor:
    """sigma_1 < ... < sigma_L geometric between sigma_min and sigma_max (Song & Ermon 2019, sec. 4.2: 0.01
    to 1 in L = 10 levels; their sigma_1 is our sigma_L: here the index grows with the noise)."""
    if T == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    ratio = torch.arange(T, dtype=torch.float64) / (T - 1)
    return sigma_min * (sigma_max / sigma_min) ** ratio


def geometric_sigma(t: Tensor, sigma_min: float = 0.01, sigma_max: float = 50.0) -> Tensor:
    """The VE-SDE's sigma(t) = sigma_min (sigma_max / sigma_min)^t (Song et al. 2021, eq. 31; 0.01 and 50 on
    CIFAR-10)."""
    return sigma_min * (sigma_max / sigma_min) ** t


VE_SCHEDULES.register("geometric")(Schedule(geometric_sigmas, geometric_sigma))
