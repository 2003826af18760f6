"""Naive and cold diffusion (Bansal et al. 2022, "Cold Diffusion"): degradations D(x0, s) of images, s = 0..T,
sampled directly at any level, a restoration loss and the two samplers that invert them.

Images are [B, C, H, W] in [-1, 1]; a "pixel" is all channels of one of the P = H * W positions. Level s
acts on round(s * P / T) pixels (naive, mask) or with a strength growing linearly in s / T (blur, pixelate);
D(x0, 0) = x0 exactly.

The samplers take a restorer ``restore(x_s, s) -> x0_hat`` (s: integer levels [B]) and one signature:

    sampler(restore, degradation, x_T, *, generator, step=1, perturbation=None, callback=None) -> (x0, nfe)

``perturbation``: a small random image added to x_T to break the symmetry of a deterministic degradation (the
start of blur, pixelate and mask generation carries almost nothing; Bansal et al. 2022, sec. 5.2). Algorithm 2
carries an offset of x_T through to its output unchanged (every step adds D(x0_hat, s - K) - D(x0_hat, s) to
x_s), so it subtracts the perturbation at the end; Algorithm 1 forgets it after its first step.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Registry

Restorer = Callable[[Tensor, Tensor], Tensor]
DEGRADATIONS: Registry[type] = Registry("process.degradation")
COLD_SAMPLERS: Registry[Callable] = Registry("sample.sampler")
MASK_VALUE = 0.0  # a hidden pixel: the mid grey of [-1, 1] data


def _levels(s, batch: int, device) -> Tensor:
    return torch.as_tensor(s, device=device).long().reshape(-1).expand(batch)


class Degradation:
    """D(x0, s). ``state``: the randomness of a stochastic degradation (naive), drawn by :meth:`draw` and
    passed back so that two calls degrade with the same pixels and colours; deterministic ones ignore it.
    ``prior_noise``: the default std of the samplers' ``perturbation`` of x_T (``sample.prior_noise``)."""

    deterministic = True
    prior_noise = 0.0

    def __init__(self, T: int, shape: tuple, **options):
        self.T, self.shape = int(T), tuple(shape)
        self.pixels = self.shape[-1] * self.shape[-2]

    def count(self, s: Tensor) -> Tensor:
        """Pixels acted on at level s: round(s * P / T)."""
        return torch.round(s.double() * self.pixels / self.T).long()

    def draw(self, batch: int, generator: Optional[torch.Generator], device) -> Optional[dict]:
        return None

    def __call__(self, x0: Tensor, s, generator: Optional[torch.Generator] = None, state: Optional[dict] = None) -> Tensor:
        raise NotImplementedError

    def prior(self, n: int, reference: Tensor, generator: torch.Generator) -> Tensor:
        """n draws of x_T to start generation from; ``reference``: the training images."""
        raise NotImplementedError


def _ranked(x0: Tensor, ranks: Tensor, count: Tensor, values: Tensor) -> Tensor:
    """x0 with the pixels whose rank (per example or shared, [B or 1, H, W]) is below count[B] set to values."""
    chosen = (ranks < count.reshape(-1, 1, 1)).unsqueeze(1)  # [B, 1, H, W]
    return torch.where(chosen, values.to(x0.dtype), x0)


@DEGRADATIONS.register("naive")
class SaltAndPepper(Degradation):
    """The lecture's naive diffusion: round(s * P / T) pixels set to black (-1) or white (+1) at random, chosen
    without replacement along one random order per example, so the pixels of level s are among those of s + 1
    (only as-yet uncorrupted pixels are corrupted), and x_T is pure salt and pepper."""

    deterministic = False

    def draw(self, batch, generator, device):
        height, width = self.shape[-2:]
        keys = torch.rand(batch, self.pixels, generator=generator, device=device)
        ranks = keys.argsort(dim=1).argsort(dim=1).reshape(batch, height, width)
        colours = torch.randint(0, 2, (batch, 1, height, width), generator=generator, device=device) * 2.0 - 1.0
        return {"ranks": ranks, "colours": colours}

    def __call__(self, x0, s, generator=None, state=None):
        state = state or self.draw(x0.shape[0], generator, x0.device)
        return _ranked(x0, state["ranks"], self.count(_levels(s, x0.shape[0], x0.device)), state["colours"])

    def prior(self, n, reference, generator):
        x = torch.zeros((n, *self.shape), device=reference.device)
        return self(x, self.T, generator)


@DEGRADATIONS.register("mask")
class Mask(Degradation):
    """Cold: round(s * P / T) pixels hidden (set to MASK_VALUE) in one fixed random order (seeded by
    ``order_seed``, the same for every image); at T every pixel is hidden. Generation starts from the empty
    image, which carries nothing: the samplers' perturbation is all that tells two samples apart (Bansal et
    al. 2022, sec. 5: a deterministic degradation and sampler otherwise give one image). Its default std, 0.5,
    is the best of 0.03 to 1 on the digits with Algorithm 2 (FID 376 without, 203 at 0.1, 24 at 0.5, 32 at 1)."""

    prior_noise = 0.5

    def __init__(self, T, shape, order_seed: int = 0, **options):
        super().__init__(T, shape)
        order = torch.randperm(self.pixels, generator=torch.Generator().manual_seed(order_seed))
        self.ranks = order.argsort().reshape(1, *self.shape[-2:])

    def __call__(self, x0, s, generator=None, state=None):
        count = self.count(_levels(s, x0.shape[0], x0.device))
        return _ranked(x0, self.ranks.to(x0.device), count, torch.tensor(MASK_VALUE, device=x0.device))

    def prior(self, n, reference, generator):
        return torch.full((n, *self.shape), MASK_VALUE, device=reference.device)


class _MeanPrior(Degradation):
    """Blur and pixelate leave the per-channel image means (nearly) alone while removing the rest, so x_T is
    drawn as a constant image whose channel means follow a Gaussian fitted to the training images' means
    (Bansal et al. 2022, sec. 5.1 fit a mixture to the same statistics; one component here). A constant image
    says little about the digit to come: without the samplers' perturbation (std 0.01 by default, the best of
    0.001, 0.01, 0.03 and 0.1 on the digits) Algorithm 2 draws nearly one image per mean (FID 404 there; 56 with it).
    """

    prior_noise = 0.01

    def prior(self, n, reference, generator):
        means = reference.mean(dim=(2, 3)).double()  # [N, C]
        centre = means.mean(dim=0)
        cov = torch.atleast_2d(torch.cov(means.T)) + 1e-8 * torch.eye(means.shape[1], dtype=torch.float64)
        z = torch.randn(n, means.shape[1], generator=generator, device=reference.device, dtype=torch.float64)
        draws = (centre + z @ torch.linalg.cholesky(cov).T).float()
        return self(draws[:, :, None, None].expand(n, *self.shape).contiguous(), self.T)


def dct_matrix(n: int) -> Tensor:
    """The orthonormal DCT-II matrix [n, n] (float64): C[k, i] = sqrt(2 / n) cos(pi (i + 1/2) k / n), row 0 / sqrt(2)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    matrix = math.sqrt(2.0 / n) * torch.cos(math.pi * (i + 0.5) * k / n)
    matrix[0] /= math.sqrt(2.0)
    return matrix


def blur_matrix(n: int, std: float) -> Tensor:
    """The 1-D Gaussian blur of width ``std`` pixels with symmetric (reflecting) boundaries, [n, n] float64: the
    heat equation's solution, diagonal in the DCT basis with factors exp(-(pi k / n)^2 std^2 / 2) (the Gaussian's
    Fourier transform; Lee et al. 2022 and Hoogeboom & Salimans 2022 blur the same way). It keeps the image mean
    and tends to it as std grows."""
    basis = dct_matrix(n)
    k = torch.arange(n, dtype=torch.float64)
    return basis.T @ torch.diag(torch.exp(-0.5 * (math.pi * k * std / n) ** 2)) @ basis


def blur(x: Tensor, std: float) -> Tensor:
    """Separable Gaussian blur of images [B, C, H, W] (:func:`blur_matrix` along both axes); std 0 is the identity."""
    if std <= 0:
        return x
    rows, columns = (blur_matrix(n, std).to(x) for n in x.shape[-2:])
    return rows @ x @ columns.T


@DEGRADATIONS.register("blur")
class Blur(_MeanPrior):
    """Cold: Gaussian blur of std ``blur_sigma_max * s / T`` pixels (linear in s; Bansal et al. 2022 compose a
    fixed blur s times instead, which grows the std as sqrt(s))."""

    def __init__(self, T, shape, blur_sigma_max: float = 4.0, **options):
        super().__init__(T, shape)
        self.blur_sigma_max = blur_sigma_max

    def std(self, s: int) -> float:
        return self.blur_sigma_max * s / self.T

    def __call__(self, x0, s, generator=None, state=None):
        levels = _levels(s, x0.shape[0], x0.device)
        out = x0.clone()
        for level in levels.unique().tolist():
            rows = levels == level
            out[rows] = blur(x0[rows], self.std(level))
        return out


@DEGRADATIONS.register("pixelate")
class Pixelate(_MeanPrior):
    """Cold: area-average to a resolution shrinking linearly from H x W at s = 0 to 1 x 1 at s = T
    (size round(H - (H - 1) s / T)), then nearest-neighbour upsampling back to H x W."""

    def size(self, s: int) -> tuple[int, int]:
        return tuple(max(1, round(n - (n - 1) * s / self.T)) for n in self.shape[-2:])

    def __call__(self, x0, s, generator=None, state=None):
        levels = _levels(s, x0.shape[0], x0.device)
        out = x0.clone()
        for level in levels.unique().tolist():
            rows = levels == level
            small = F.adaptive_avg_pool2d(x0[rows], self.size(level))
            out[rows] = F.interpolate(small, size=tuple(self.shape[-2:]), mode="nearest")
        return out


def build_degradation(name: str, T: int, shape: tuple, *, blur_sigma_max: float = 4.0, order_seed: int = 0) -> Degradation:
    return DEGRADATIONS.get(name)(T, shape, blur_sigma_max=blur_sigma_max, order_seed=order_seed)


def restoration_loss(restore: Restorer, degradation: Degradation, x0: Tensor, generator: torch.Generator,
                     norm: str = "l2") -> Tensor:
    """Per-example loss [B]: s uniform on 1..T, the mean squared (l2) or absolute (l1) error of R(D(x0, s), s)
    against x0 (Bansal et al. 2022, eq. 1; the lecture's naive diffusion, predicting x from z_t)."""
    s = torch.randint(1, degradation.T + 1, (x0.shape[0],), generator=generator, device=x0.device)
    error = restore(degradation(x0, s, generator), s) - x0
    error = error.abs() if norm == "l1" else error.square()
    return error.flatten(1).mean(dim=1)


def _schedule(T: int, step: int) -> list[int]:
    """The visited levels T, T - K, ..., down to the last one above 0."""
    return list(range(T, 0, -max(1, int(step))))


@COLD_SAMPLERS.register("denoise_renoise")
@torch.no_grad()
def denoise_renoise(restore, degradation, x_T, *, generator, step=1, perturbation=None, callback=None):
    """Bansal et al. 2022, Algorithm 1 (the lecture's naive sampling): x0_hat = R(x_s, s), then
    x_{s-K} = D(x0_hat, s - K) with fresh randomness; the last prediction is returned. NFE = ceil(T / K)."""
    x = x_T if perturbation is None else x_T + perturbation
    x0_hat, levels = x, _schedule(degradation.T, step)
    for k, s in enumerate(levels):
        x0_hat = restore(x, _levels(s, x.shape[0], x.device))
        x = degradation(x0_hat, max(s - step, 0), generator)
        if callback:
            callback(k, s, x)
    return x0_hat, len(levels)


@COLD_SAMPLERS.register("cold_improved")
@torch.no_grad()
def cold_improved(restore, degradation, x_T, *, generator, step=1, perturbation=None, callback=None):
    """Bansal et al. 2022, Algorithm 2: x_{s-K} = x_s - D(x0_hat, s) + D(x0_hat, s - K). The two D terms of one
    step share their randomness (one draw of the naive pixels and colours per step), so for a degradation
    that is linear in x0 an error of x0_hat common to both levels cancels. The perturbation of x_T, which every
    step carries along unchanged, is subtracted from the result. NFE = ceil(T / K)."""
    x = x_T if perturbation is None else x_T + perturbation
    levels = _schedule(degradation.T, step)
    for k, s in enumerate(levels):
        x0_hat = restore(x, _levels(s, x.shape[0], x.device))
        state = degradation.draw(x.shape[0], generator, x.device)
        x = x - degradation(x0_hat, s, state=state) + degradation(x0_hat, max(s - step, 0), state=state)
        if callback:
            callback(k, s, x)
    return (x if perturbation is None else x - perturbation), len(levels)
