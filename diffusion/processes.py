"""Gaussian diffusion paths x_t = alpha(t) x0 + sigma(t) eps, eps ~ N(0, I).

Every process in the project is described by two functions of a time t in [0, 1]. A discrete
process with T steps is the same path evaluated on the grid t_i = i / T, i = 0..T, with
alpha_0 = 1 and sigma_0 = 0 (clean data); the network sees t_i, never a rescaled index.

- ``vp`` (DDPM, Ho et al. 2020): alpha_i = sqrt(alphabar_i), sigma_i = sqrt(1 - alphabar_i),
  alphabar_i = prod_{j <= i} (1 - beta_j).
- ``ve`` (NCSN, Song & Ermon 2019): alpha_i = 1, sigma_i = the i-th noise level, increasing in i.

Transitions and posteriors between any two times s < t follow from alpha and sigma alone
(Kingma et al. 2021, VDM, eqs. 3-4 and appendix A), so one sampler serves both families.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .config import ProcessConfig
from .errors import ConfigError
from .registry import Registry

# Schedules for each process family: name -> function(cfg) -> float64 tensor of length T.
VP_SCHEDULES: Registry[Callable[[ProcessConfig], Tensor]] = Registry("process.schedule")
VE_SCHEDULES: Registry[Callable[[ProcessConfig], Tensor]] = Registry("process.schedule")
PROCESS_FAMILIES = {"vp": VP_SCHEDULES, "ve": VE_SCHEDULES}


@VP_SCHEDULES.register("linear")
def linear_betas(cfg: ProcessConfig) -> Tensor:
    """beta_1..beta_T linear from beta_start to beta_end (Ho et al. 2020, sec. 4: 1e-4 to 0.02 at
    T = 1000). For other T both ends are scaled by 1000 / T so that the path keeps roughly the same
    end points (Nichol & Dhariwal 2021, improved-diffusion's convention); for T < 20 the scaled betas
    would pass 1 and are clipped at max_beta."""
    scale = 1000.0 / cfg.T
    betas = torch.linspace(cfg.beta_start * scale, cfg.beta_end * scale, cfg.T, dtype=torch.float64)
    return betas.clamp(max=cfg.max_beta)


def cosine_alphabar(t: Tensor, s: float) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alphabar(t) = f(t) / f(0), f(t) = cos((t + s) / (1 + s) * pi / 2)^2."""
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return f / f0


@VP_SCHEDULES.register("cosine")
def cosine_betas(cfg: ProcessConfig) -> Tensor:
    """beta_i = min(1 - alphabar(i/T) / alphabar((i-1)/T), max_beta) (Nichol & Dhariwal 2021, sec. 3.2)."""
    grid = torch.arange(cfg.T + 1, dtype=torch.float64) / cfg.T
    alphabar = cosine_alphabar(grid, cfg.cosine_s)
    return torch.clamp(1 - alphabar[1:] / alphabar[:-1], max=cfg.max_beta)


@VE_SCHEDULES.register("geometric")
def geometric_sigmas(cfg: ProcessConfig) -> Tensor:
    """sigma_1 < ... < sigma_L geometric between sigma_min and sigma_max (Song & Ermon 2019, sec. 4.2;
    their sigma_1 is our sigma_L: here the index grows with the noise)."""
    if cfg.T == 1:
        return torch.tensor([cfg.sigma_max], dtype=torch.float64)
    ratio = torch.arange(cfg.T, dtype=torch.float64) / (cfg.T - 1)
    return cfg.sigma_min * (cfg.sigma_max / cfg.sigma_min) ** ratio


def validate(cfg: ProcessConfig) -> None:
    if cfg.name not in PROCESS_FAMILIES:
        raise ConfigError("process.name", cfg.name, "one of " + ", ".join(sorted(PROCESS_FAMILIES)))
    schedules = PROCESS_FAMILIES[cfg.name]
    if cfg.schedule not in schedules:
        raise ConfigError(
            "process.schedule", cfg.schedule, f"for process {cfg.name}: one of " + ", ".join(schedules.names())
        )
    if cfg.T < 1:
        raise ConfigError("process.T", cfg.T, "an integer >= 1")
    if cfg.name == "vp":
        if cfg.schedule == "linear" and not 0 < cfg.beta_start <= cfg.beta_end:
            raise ConfigError("process.beta_start", cfg.beta_start, f"a number in (0, beta_end={cfg.beta_end}]")
        if not 0 < cfg.max_beta < 1:
            raise ConfigError("process.max_beta", cfg.max_beta, "a number in (0, 1)")
        if cfg.schedule == "linear" and cfg.beta_end >= 1:
            raise ConfigError("process.beta_end", cfg.beta_end, "a number in [beta_start, 1)")
        if cfg.cosine_s < 0:
            raise ConfigError("process.cosine_s", cfg.cosine_s, "a number >= 0")
    else:
        if not 0 < cfg.sigma_min < cfg.sigma_max:
            raise ConfigError("process.sigma_min", cfg.sigma_min, f"a number in (0, sigma_max={cfg.sigma_max})")


class DiscreteProcess:
    """A Gaussian path known on the grid t_i = i / T, i = 0..T.

    ``alphas`` and ``sigmas`` are float64 tensors of length T + 1 with alphas[0] = 1, sigmas[0] = 0.
    Functions of time accept a float tensor t of shape [B] whose values lie on the grid.
    """

    def __init__(self, name: str, alphas: Tensor, sigmas: Tensor):
        if alphas.shape != sigmas.shape or alphas.dim() != 1 or len(alphas) < 2:
            raise ValueError("alphas and sigmas must be 1-D tensors of equal length T + 1 >= 2")
        self.name = name
        self.alphas = alphas.to(torch.float64)
        self.sigmas = sigmas.to(torch.float64)
        self.T = len(alphas) - 1

    # --- time grid ------------------------------------------------------------------------
    def index(self, t: Tensor) -> Tensor:
        """Step indices i = round(t * T) of grid times t (float [B] -> int64 [B])."""
        return torch.round(t.double() * self.T).long()

    def times(self, indices: Tensor) -> Tensor:
        """Grid times t_i = i / T (int [B] -> float32 [B])."""
        return indices.float() / self.T

    def timesteps(self, device: torch.device | str = "cpu") -> Tensor:
        """All noisy grid times, largest first: t_T, ..., t_1 (float32 [T])."""
        return self.times(torch.arange(self.T, 0, -1, device=device))

    # --- the path ---------------------------------------------------------------------------
    def _lookup(self, table: Tensor, t: Tensor) -> Tensor:
        return table.to(t.device)[self.index(t).cpu()].to(t.device, torch.float32)

    def alpha(self, t: Tensor) -> Tensor:
        return self._lookup(self.alphas, t)

    def sigma(self, t: Tensor) -> Tensor:
        return self._lookup(self.sigmas, t)

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha^2 / sigma^2) (Kingma et al. 2021, eq. 5)."""
        idx = self.index(t).cpu()
        return (2 * (self.alphas[idx].log() - self.sigmas[idx].log())).to(t.device, torch.float32)

    def marginal(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps, a draw from q(x_t | x0)."""
        return expand(self.alpha(t), x0) * x0 + expand(self.sigma(t), x0) * eps

    def transition(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """q(x_t | x_s) = N(alpha_{t|s} x_s, sigma2_{t|s} I) for s < t (VDM eq. 3), float64 [B] each.

        alpha_{t|s} = alpha_t / alpha_s, sigma2_{t|s} = sigma_t^2 - alpha_{t|s}^2 sigma_s^2.
        For vp with s = t - 1 this is (sqrt(1 - beta_t), beta_t); for ve it is (1, sigma_t^2 - sigma_s^2).
        """
        i_s, i_t = self.index(s).cpu(), self.index(t).cpu()
        alpha_ts = self.alphas[i_t] / self.alphas[i_s]
        sigma2_ts = self.sigmas[i_t] ** 2 - alpha_ts**2 * self.sigmas[i_s] ** 2
        return alpha_ts, sigma2_ts

    def posterior(self, x_t: Tensor, x0: Tensor, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """q(x_s | x_t, x0) = N(mean, var I) for s < t (Ho et al. 2020 eqs. 6-7; VDM eq. 4).

        mean = alpha_{t|s} sigma_s^2 / sigma_t^2 x_t + alpha_s sigma2_{t|s} / sigma_t^2 x0,
        var = sigma2_{t|s} sigma_s^2 / sigma_t^2 (beta-tilde for vp with s = t - 1). var: float32 [B].
        """
        i_s, i_t = self.index(s).cpu(), self.index(t).cpu()
        alpha_ts, sigma2_ts = self.transition(s, t)
        sigma2_s, sigma2_t = self.sigmas[i_s] ** 2, self.sigmas[i_t] ** 2
        coef_xt = (alpha_ts * sigma2_s / sigma2_t).to(x_t.device, torch.float32)
        coef_x0 = (self.alphas[i_s] * sigma2_ts / sigma2_t).to(x_t.device, torch.float32)
        var = (sigma2_ts * sigma2_s / sigma2_t).to(x_t.device, torch.float32)
        return expand(coef_xt, x_t) * x_t + expand(coef_x0, x0) * x0, var

    def prior_sample(self, shape: tuple[int, ...], generator: torch.Generator, device) -> Tensor:
        """A draw from the prior at t = 1: N(0, sigma_T^2 I) (N(0, I) for vp, N(0, sigma_max^2 I) for ve)."""
        noise = torch.randn(shape, generator=generator, device=device)
        return float(self.sigmas[-1]) * noise


def build_process(cfg: ProcessConfig) -> DiscreteProcess:
    """The discrete process a ProcessConfig names."""
    validate(cfg)
    table = PROCESS_FAMILIES[cfg.name].get(cfg.schedule)(cfg)
    zero = torch.zeros(1, dtype=torch.float64)
    if cfg.name == "vp":
        alphabar = torch.cat([zero + 1, torch.cumprod(1 - table, 0)])
        return DiscreteProcess("vp", alphabar.sqrt(), (1 - alphabar).sqrt())
    sigmas = torch.cat([zero, table])
    return DiscreteProcess("ve", torch.ones_like(sigmas), sigmas)


def expand(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-example tensor [B] to broadcast against ``like`` [B, ...]."""
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))
