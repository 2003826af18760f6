"""Blur diffusion (Lee et al. 2022, "Progressive Deblurring of Diffusion Models for Coarse-to-Fine Image
Synthesis"): a variance-preserving diffusion in the DCT basis in which every frequency has its own schedule.

In the rotated coordinates u = U^T x (U the orthonormal 2-D DCT of each channel) the forward step is
q(u_i | u_{i-1}) = N((I - B_i)^{1/2} u_{i-1}, B_i) with the diagonal I - B_i = A_i = (1 - beta_i) D^{2 f(i)}:
the ordinary VP step (1 - beta_i) times a Gaussian blur D (std ``process.blur_sigma`` pixels, diagonal in the
DCT basis with factors d_k = exp(-(pi k_h s / H)^2 / 2 - (pi k_w s / W)^2 / 2)) raised to the power 2 f(i).
The marginal of each frequency k is then a VP path of its own,

    u_i,k = alpha_k(i) u_0,k + sigma_k(i) eps_k,   alpha_k(i)^2 = alphabar_i d_k^{2 F(i)},   sigma_k^2 = 1 - alpha_k^2,

with F(i) = f(1) + ... + f(i) and alphabar_i = prod (1 - beta_j) of ``process.schedule``. High frequencies
(small d_k) lose their signal first, so generation runs coarse to fine. f(i) = f_max g(i) with the shape g of
``process.blur_schedule``: ``quartic`` (i / T)^4, ``log`` log(i) / log(T) or ``linear`` i / T (the paper's
ablation: f(T) = 0.14 quartic beats 0.6 log and no blur on LSUN). ``blur_sigma`` 0 or ``blur_f_max`` 0 is the
VP process exactly.

Nothing else is new: :class:`BlurProcess` is a ``DiscreteProcess`` whose alpha and sigma tables hold one value
per frequency ([T + 1, 1, H, W]) instead of one per step, so its posterior, transition and marginal are the
same elementwise formulas; samplers work on u (``to_basis`` / ``from_basis`` convert), noise is drawn in
pixel space and rotated (so that with no blur every draw equals the VP process's for the same seed), and the
network sees pixels (:class:`InBasis`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import Tensor

from .config import ProcessConfig
from .degradations import dct_matrix
from .errors import ConfigError
from .process_families import PROCESS_FAMILIES, ProcessFamily, build_gaussian
from .processes import CONTINUOUS, DiscreteProcess
from .registry import Registry
from .schedules import VP_SCHEDULES

LOG_ALPHA_FLOOR = 40.0
BLUR_SCHEDULES: Registry[Callable[[Tensor, int], Tensor]] = Registry("process.blur_schedule")
BLUR_SCHEDULES.register("quartic")(lambda i, T: (i / T) ** 4)
BLUR_SCHEDULES.register("log")(lambda i, T: i.log() / math.log(T) if T > 1 else torch.ones_like(i))
BLUR_SCHEDULES.register("linear")(lambda i, T: i / T)


def blur_exponents(cfg: ProcessConfig) -> Tensor:
    """F(i) = f(1) + ... + f(i) for i = 0..T (float64 [T + 1], F(0) = 0), f(i) = blur_f_max g(i)."""
    i = torch.arange(1, cfg.T + 1, dtype=torch.float64)
    f = cfg.blur_f_max * BLUR_SCHEDULES.get(cfg.blur_schedule)(i, cfg.T)
    return torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(f, 0)])


def log_blur_factors(shape: tuple, std: float) -> Tensor:
    """log d_k of the Gaussian blur of width ``std`` pixels for every DCT frequency of an image [C, H, W]:
    float64 [1, H, W] (the blur of ``degradations.blur_matrix`` along both axes)."""
    height, width = shape[-2:]
    kh = torch.arange(height, dtype=torch.float64)[:, None] / height
    kw = torch.arange(width, dtype=torch.float64)[None, :] / width
    return (-0.5 * (math.pi * std) ** 2 * (kh**2 + kw**2))[None]


class BlurProcess(DiscreteProcess):
    """The blur diffusion of an image shape [C, H, W]: per-frequency tables alphas, sigmas [T + 1, 1, H, W]."""

    per_dimension = True

    def __init__(self, cfg: ProcessConfig, shape: tuple):
        vp = build_gaussian(dataclasses.replace(cfg, name="vp"))
        log_alphabar = 2 * vp.alphas.log()  # [T + 1]
        log_alpha2 = log_alphabar[:, None, None, None] + 2 * blur_exponents(cfg)[:, None, None, None] * log_blur_factors(shape, cfg.blur_sigma)
        # a floor on the signal, alpha >= e^-40: a frequency blurred to nothing would make x0 = (x - sigma eps) / alpha
        # infinite in the samplers; at e^-40 its x0 error enters the next step scaled back by alpha
        log_alpha2 = log_alpha2.clamp(min=-2 * LOG_ALPHA_FLOOR)
        sigmas = (-torch.expm1(log_alpha2)).clamp(min=0).sqrt()
        super().__init__("blur", (0.5 * log_alpha2).exp(), sigmas)
        self.shape = tuple(shape)
        self._rows, self._columns = dct_matrix(shape[-2]), dct_matrix(shape[-1])

    def to_basis(self, x: Tensor) -> Tensor:
        """u = U^T x: the 2-D DCT of each channel of images [B, C, H, W]."""
        return self._rows.to(x) @ x @ self._columns.to(x).T

    def from_basis(self, u: Tensor) -> Tensor:
        return self._rows.to(u).T @ u @ self._columns.to(u)

    def noise(self, shape: tuple, generator: torch.Generator, device) -> Tensor:
        """N(0, I) in the DCT basis, drawn in pixel space and rotated."""
        return self.to_basis(torch.randn(shape, generator=generator, device=device))


class InBasis(torch.nn.Module):
    """A pixel-space network seen from the process's basis: ``network(from_basis(u), t, ...)`` rotated back.
    Every parameterization's output (eps, x0, v, score) is linear in the data, so it rotates the same way."""

    def __init__(self, network: torch.nn.Module, process: BlurProcess):
        super().__init__()
        self.network, self.process = network, process

    @property
    def label_embedding(self):
        """The wrapped network's label embedding (classifier-free guidance reads its null label)."""
        return self.network.label_embedding

    def forward(self, u: Tensor, t: Tensor, *labels: Tensor) -> Tensor:
        return self.process.to_basis(self.network(self.process.from_basis(u), t, *labels))


def _check_blur(cfg: ProcessConfig) -> None:
    if cfg.T == CONTINUOUS:
        raise ConfigError("process.T", cfg.T, "an integer >= 1 for blur (Lee et al.'s blur diffusion has discrete steps)")
    BLUR_SCHEDULES.get(cfg.blur_schedule)
    if cfg.blur_sigma < 0:
        raise ConfigError("process.blur_sigma", cfg.blur_sigma, "a number >= 0 (0: no blur, the VP process)")
    if cfg.blur_f_max < 0:
        raise ConfigError("process.blur_f_max", cfg.blur_f_max, "a number >= 0 (0: no blur, the VP process)")


def _build_blur(cfg: ProcessConfig, shape: tuple | None) -> BlurProcess:
    if shape is None or len(shape) != 3:
        raise ValueError(f"the blur process needs an image shape [C, H, W], not {shape}")
    return BlurProcess(cfg, tuple(shape))


# blur: the VP schedule of Lee et al.'s blur diffusion, per DCT frequency
PROCESS_FAMILIES.register("blur")(ProcessFamily(_build_blur, VP_SCHEDULES, check=_check_blur))
