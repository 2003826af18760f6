"""Inverse problems solved with an unconditional diffusion model: sample x0 given a measurement y.

A measurement is y = A x0 + sigma_y n, n ~ N(0, I): :class:`Inpainting` (A keeps the observed entries,
sigma_y = 0) or :class:`Denoising` (A = I). The target is the posterior p(x0 | y), whose reverse process
needs the conditional score grad log p_t(x_t | y) = grad log p_t(x_t) + grad log p_t(y | x_t) (Song et al.
2021, "Score-Based Generative Modeling through SDEs", sec. 5, eq. 14). The unconditional term is the
model's; the solvers differ in how they bring in y. All take ancestral steps (Ho et al. 2020,
Algorithm 2 with beta-tilde: x_s ~ q(x_s | x_t, x0_hat)) and one signature

    solver(denoiser, measurement, y, timesteps, *, generator, guidance=1.0, clip=None) -> (x0, nfe)

(timesteps largest first, as from ``samplers.make_timesteps``; nfe = denoiser calls x ``denoiser.cost``; ``clip``:
the data range, x0 estimates clamped to [-clip, clip], used for images in [-1, 1], see :func:`_clip`).

- ``replacement``. Inpainting: Song et al. 2021, appendix I.2 ("imputation"): after each step the observed
  entries of x_s are replaced by a fresh draw alpha_s y + sigma_s z of q(x_s | y), and the last step returns
  x0_hat with the observed entries set to y. It is approximate: the hidden entries are moved by the score
  given that noisy draw instead of given y (Lugmayr et al. 2022, RePaint; Chung et al. 2022, MCG).
  Denoising: an exact projection. y = x0 + sigma_y n is itself a noisy version of x0 with noise-to-signal
  sigma_y, so x_{t*} = alpha(t*) y with sigma(t*) / alpha(t*) = sigma_y has the law q(x_{t*} | x0) =
  N(alpha x0, sigma^2 I) given x0. Hence p(x0 | y) = p(x0 | x_{t*}), and the ordinary reverse process started
  at t* from alpha(t*) y samples the exact posterior (with an exact denoiser, up to the step error). t* is
  clamped to [t_min, 1]: a sigma_y beyond the process's range is no longer exact.
- ``likelihood``: the conditional score with grad log p(y | x_t) by autograd through the denoiser, where
  p(y | x_t) ~ N(y; A x0_hat(x_t), (sigma_y^2 + r_t^2) I) on the observed entries, r_t^2 = sigma_t^2 /
  (alpha_t^2 + sigma_t^2) (PiGDM: Song, Vahdat, Mardani & Kautz 2023; the x0_hat plug-in is DPS,
  Chung et al. 2022). It is exact when Cov(x0 | x_t) = r_t^2 I (data with covariance I); for Gaussian data
  N(mu, C), Cov(x0 | x_t) = sigma_t^2 C (alpha_t^2 C + sigma_t^2 I)^{-1}. ``guidance`` scales the gradient;
  eps_cond = -sigma_t score_cond. The backward pass is not counted in nfe.

- ``tweedie``: the likelihood solver with Tweedie's posterior covariance in place of r_t^2 I (Boys et al. 2023,
  TMPD), solved by conjugate gradients on vector-Jacobian products: exact for Gaussian data.

On Gaussian data with the exact denoiser (tests/test_inverse.py) the hidden entries' mean is off by about 0.4
(replacement) and 0.15 (likelihood) conditional standard deviations, at 200 steps as at 1000, and by 0.008
(tweedie, at 12 network passes per step).

Metrics: :func:`psnr` and :func:`ssim` (Wang et al. 2004) for images in [-1, 1]; :func:`restoration_grid`
lays out observed / restored / true rows for MLflow.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError
from .processes import GaussianProcess
from .registry import Registry
from .samplers import _coef, _full, _noise, _pairs

INVERSE_SOLVERS: Registry[Callable] = Registry("eval.inverse_solver")
STAGES = ("inpaint", "denoise")
MASKS = ("centre", "random", "half")


# --- measurements -------------------------------------------------------------------------------------
class Inpainting:
    """y = mask * x0: the observed entries (mask 1) kept, the others 0. ``mask`` broadcasts to one example."""

    sigma_y = 0.0

    def __init__(self, mask: Tensor):
        self.mask = mask.float()
        self.observed = mask.bool()

    def apply(self, x: Tensor) -> Tensor:
        return self.mask.to(x.device) * x

    def observe(self, x0: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return self.apply(x0)


class Denoising:
    """y = x0 + sigma_y n, n ~ N(0, I)."""

    def __init__(self, sigma_y: float):
        if not sigma_y > 0:
            raise ConfigError("eval.inverse_sigma_y", sigma_y, "a number > 0")
        self.sigma_y = float(sigma_y)

    def apply(self, x: Tensor) -> Tensor:
        return x

    def observe(self, x0: Tensor, generator: torch.Generator) -> Tensor:
        return x0 + self.sigma_y * _noise(x0, generator)

    def start_time(self, process: GaussianProcess) -> float:
        """t* with sigma(t*) / alpha(t*) = sigma_y, i.e. log-SNR -2 log sigma_y (clamped to [t_min, 1])."""
        return process.time_of_log_snr(torch.tensor([-2 * math.log(self.sigma_y)])).item()


def make_mask(kind: str, shape: tuple[int, ...], generator: Optional[torch.Generator] = None,
              fraction: float = 0.5) -> Tensor:
    """The observed entries (True) of one example of ``shape`` [C, H, W] or [D]. ``centre``: the centred
    H//2 x W//2 block hidden (the middle D//2 entries of a vector); ``half``: columns W//2 onwards hidden
    (entries D//2 onwards); ``random``: each pixel position (all its channels) hidden with probability
    ``fraction``, drawn with ``generator``."""
    spatial = tuple(shape[1:]) if len(shape) == 3 else tuple(shape)
    observed = torch.ones(spatial, dtype=torch.bool)
    if kind == "centre":
        index = tuple(slice((n - n // 2) // 2, (n - n // 2) // 2 + n // 2) for n in spatial)
        observed[index] = False
    elif kind == "half":
        observed[..., spatial[-1] // 2:] = False
    elif kind == "random":
        observed = torch.rand(spatial, generator=generator) >= fraction
    else:
        raise ConfigError("eval.inverse_mask", kind, "centre, random or half")
    return observed.expand(shape).clone() if len(shape) == 3 else observed


# --- solvers ------------------------------------------------------------------------------------------
def _scalar_path(process: GaussianProcess) -> GaussianProcess:
    """The solvers need one alpha and sigma per time: masks and y live in data space."""
    if getattr(process, "per_dimension", False):
        raise ConfigError("process.name", process.name, "a process with one alpha and sigma per time (vp, ve, subvp)",
                          detail="inverse problems are solved in data space; a per-dimension process is not supported")
    return process


def _clip(x0: Tensor, clip: Optional[float]) -> Tensor:
    """x0 estimates clamped to the data range [-clip, clip] (None: not clamped). With a network, x0_hat = (x_t -
    sigma eps_hat) / alpha amplifies the network's error by 1 / alpha (1e5 at t = 1 with T = 20) and a likelihood
    gradient through it diverges; clamped, the residual stays bounded and clamped entries pass no gradient."""
    return x0 if clip is None else x0.clamp(-clip, clip)


def _ancestral(process: GaussianProcess, x: Tensor, x0_hat: Tensor, t: float, s: float, generator) -> Tensor:
    """x_s ~ q(x_s | x_t, x0_hat) with the posterior (beta-tilde) variance; x0_hat itself when s = 0."""
    if s == 0:
        return x0_hat
    c_t, c_0, var = (c.item() for c in process.posterior_coefficients(torch.tensor([s]), torch.tensor([t])))
    return c_t * x + c_0 * x0_hat + var**0.5 * _noise(x, generator)


@INVERSE_SOLVERS.register("replacement")
@torch.no_grad()
def replacement(denoiser, measurement, y, timesteps, *, generator, guidance=1.0, clip=None):
    """Imputation for inpainting, the exact projection for denoising (module docstring). ``guidance`` unused."""
    process = _scalar_path(denoiser.process)
    if isinstance(measurement, Denoising):
        t_star = measurement.start_time(process)
        timesteps = torch.cat([timesteps.new_tensor([t_star]), timesteps[timesteps < t_star]])
        x = _coef(process, t_star)[0] * y
    else:
        x = process.prior_sample(tuple(y.shape), generator, y.device)
    observed = getattr(measurement, "observed", None)
    for _, t, s in _pairs(timesteps):
        alpha_t, sigma_t = _coef(process, t)
        x0_hat = _clip((x - sigma_t * denoiser.eps(x, _full(t, x))) / alpha_t, clip)
        x = _ancestral(process, x, x0_hat, t, s, generator)
        if observed is not None:  # a fresh draw of q(x_s | y) on the observed entries, y itself at s = 0
            known = y
            if s > 0:
                alpha_s, sigma_s = _coef(process, s)
                known = alpha_s * y + sigma_s * _noise(x, generator)
            x = torch.where(observed.to(x.device), known, x)
    return x, len(timesteps) * denoiser.cost


@INVERSE_SOLVERS.register("likelihood")
@torch.no_grad()
def likelihood(denoiser, measurement, y, timesteps, *, generator, guidance=1.0, clip=None):
    """Ancestral steps with eps_cond = eps_hat - guidance sigma_t grad log N(y; A x0_hat, (sigma_y^2 + r_t^2) I)."""
    process = _scalar_path(denoiser.process)
    x = process.prior_sample(tuple(y.shape), generator, y.device)
    for _, t, s in _pairs(timesteps):
        alpha_t, sigma_t = _coef(process, t)
        variance = measurement.sigma_y**2 + sigma_t**2 / (alpha_t**2 + sigma_t**2)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            eps_hat = denoiser.eps(x_in, _full(t, x))
            residual = y - measurement.apply(_clip((x_in - sigma_t * eps_hat) / alpha_t, clip))
            log_likelihood = -(residual**2).sum() / (2 * variance)  # examples are independent: one backward
            grad = torch.autograd.grad(log_likelihood, x_in)[0]
        eps_cond = eps_hat.detach() - guidance * sigma_t * grad
        x = _ancestral(process, x, _clip((x - sigma_t * eps_cond) / alpha_t, clip), t, s, generator)
    return x, len(timesteps) * denoiser.cost


def _batched_dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).flatten(1).sum(1).reshape(-1, *([1] * (a.dim() - 1)))


def conjugate_gradients(operator: Callable[[Tensor], Tensor], b: Tensor, iterations: int) -> Tensor:
    """w with operator(w) = b for every example of a batch (operator symmetric positive definite per example),
    by ``iterations`` steps of conjugate gradients from w = 0 (exact after as many steps as dimensions). A trained
    network's Jacobian is only nearly symmetric and positive: an example whose search direction meets curvature
    p^T operator(p) <= 0 keeps its last iterate (truncated CG, as in Steihaug's trust-region method)."""
    w, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), _batched_dot(r, r)
    active = torch.ones_like(rr, dtype=torch.bool)
    for _ in range(iterations):
        q = operator(p)
        curvature = _batched_dot(p, q)
        active = active & (curvature > 0) & torch.isfinite(curvature) & (rr > 0)
        step = torch.where(active, rr / torch.where(active, curvature, 1.0), 0.0)
        w, r = w + step * p, r - step * q
        rr_next = _batched_dot(r, r)
        p, rr = r + torch.where(active, rr_next / torch.where(active, rr, 1.0), 0.0) * p, rr_next
    return w


@INVERSE_SOLVERS.register("tweedie")
@torch.no_grad()
def tweedie(denoiser, measurement, y, timesteps, *, generator, guidance=1.0, clip=None, cg_iterations=10):
    """Tweedie moment projection (Boys et al. 2023, TMPD): p(y | x_t) ~ N(y; A x0_hat, A C_t A^T + sigma_y^2 I) with
    the posterior covariance from Tweedie's second moment, C_t = Cov(x0 | x_t) = (sigma_t^2 / alpha_t) d x0_hat /
    d x_t, so grad log p(y | x_t) = J^T A^T (A C_t A^T + sigma_y^2 I)^-1 (y - A x0_hat), J = d x0_hat / d x_t.
    The linear solve is ``cg_iterations`` steps of :func:`conjugate_gradients`, each one vector-Jacobian
    product. For Gaussian data C_t does not depend on x_t and the conditional score is exact: the solver then
    samples the posterior p(x0 | y) up to the step error, for inpainting as for denoising. nfe counts the
    network passes per step: the forward pass, the CG products and the final one (2 + cg_iterations)."""
    process = _scalar_path(denoiser.process)
    x = process.prior_sample(tuple(y.shape), generator, y.device)
    mask = getattr(measurement, "mask", None)
    mask = torch.ones_like(y) if mask is None else mask.to(y.device).expand_as(y)
    for _, t, s in _pairs(timesteps):
        alpha_t, sigma_t = _coef(process, t)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            eps_hat = denoiser.eps(x_in, _full(t, x))
            x0_hat = (x_in - sigma_t * eps_hat) / alpha_t

            def vjp(v: Tensor) -> Tensor:
                return torch.autograd.grad(x0_hat, x_in, v, retain_graph=True)[0]

            def operator(v: Tensor) -> Tensor:  # A C_t A^T + sigma_y^2 I on the observed entries, I elsewhere
                return mask * (sigma_t**2 / alpha_t) * vjp(mask * v) + measurement.sigma_y**2 * mask * v + (1 - mask) * v

            residual = mask * (y - measurement.apply(_clip(x0_hat.detach(), clip)))
            grad = vjp(mask * conjugate_gradients(operator, residual, cg_iterations))
        eps_cond = eps_hat.detach() - guidance * sigma_t * grad
        x = _ancestral(process, x, _clip((x - sigma_t * eps_cond) / alpha_t, clip), t, s, generator)
    return x, len(timesteps) * (2 + cg_iterations) * denoiser.cost


# --- metrics ------------------------------------------------------------------------------------------
def psnr(x: Tensor, ref: Tensor, data_range: float = 2.0) -> Tensor:
    """10 log10(data_range^2 / MSE) per example [B] (inf where x == ref)."""
    mse = (x.double() - ref.double()).flatten(1).pow(2).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float = 1.5) -> Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: Tensor, ref: Tensor, data_range: float = 2.0) -> Tensor:
    """SSIM of Wang et al. 2004 per example [B] for images [B, C, H, W]: an 11 x 11 Gaussian window
    (sigma 1.5), K1 = 0.01, K2 = 0.03, (weighted) population moments per channel, the map averaged over
    the positions where the window fits whole ("valid") and over channels. Images smaller than 11 pixels
    in a side use a window of the smaller side rounded down to odd (7 x 7 for 8 x 8 digits; still sigma 1.5,
    renormalized). From 11 pixels up this equals scikit-image's ``structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False)`` to rounding; below, scikit-image keeps its 11-tap filter over
    reflect-padded borders and the two differ."""
    channels, size = x.shape[1], min(11, *x.shape[-2:])
    size -= 1 - size % 2
    window = _gaussian_window(size).to(x.device).expand(channels, 1, size, size)
    x, ref = x.double(), ref.double()

    def local(v: Tensor) -> Tensor:
        return F.conv2d(v, window, groups=channels)

    mu_x, mu_y = local(x), local(ref)
    var_x, var_y = local(x * x) - mu_x**2, local(ref * ref) - mu_y**2
    cov = local(x * ref) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return value.flatten(1).mean(1)


def restoration_grid(observed: Tensor, restored: Tensor, truth: Tensor, nrow: int) -> Tensor:
    """One image [3, H', W'] in [0, 1]: rows of the first ``nrow`` observed, restored and true images
    (in [-1, 1]), as the sample grids logged to MLflow."""
    from torchvision.utils import make_grid

    n = min(nrow, observed.shape[0])
    images = torch.cat([observed[:n], restored[:n], truth[:n]]).float().cpu().clamp(-1, 1)
    return make_grid(images, nrow=n, padding=1, normalize=True, value_range=(-1, 1), pad_value=0.5)


def solve_heldout(stage: str, denoiser, images: Tensor, timesteps: Tensor, generator: torch.Generator, *,
                  solver: str = "replacement", mask: str = "centre", fraction: float = 0.5, sigma_y: float = 0.2,
                  guidance: float = 1.0, cg_iterations: int = 10) -> dict:
    """One inverse-problem stage on held-out ``images`` [B, C, H, W] (in [-1, 1]) with the registered ``solver``
    (``replacement``, ``likelihood`` or ``tweedie``, with ``guidance`` and, for tweedie, ``cg_iterations``) at the
    ``timesteps``: ``inpaint`` hides the pixels of ``mask`` (:func:`make_mask`: ``centre``, ``random`` with
    ``fraction`` of the pixels hidden, ``half``; drawn from ``generator`` and the same for every image), ``denoise``
    adds Gaussian noise of std ``sigma_y``. The defaults are the eval section's (``eval.inverse_solver``,
    ``inverse_mask``, ``inverse_fraction``, ``inverse_sigma_y``, ``inverse_guidance``, ``inverse_cg_iterations``).
    Returns ``metrics`` (``<stage>_psnr``, ``<stage>_ssim``: means over the images of the restored images clipped to
    [-1, 1]; ``<stage>_psnr_observed``, ``<stage>_ssim_observed``: the measurement itself, hidden pixels grey, as
    the baseline; ``<stage>_nfe``), and ``observed``, ``restored``."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    if solver not in INVERSE_SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(INVERSE_SOLVERS.names())}, got {solver!r}")
    if stage == "inpaint":
        hidden = make_mask(mask, tuple(images.shape[1:]), generator=generator, fraction=fraction)
        measurement = Inpainting(hidden.to(images.device))
    else:
        measurement = Denoising(sigma_y)
    y = measurement.observe(images, generator)
    extra = {"cg_iterations": cg_iterations} if solver == "tweedie" else {}
    restored, nfe = INVERSE_SOLVERS.get(solver)(denoiser, measurement, y, timesteps, generator=generator,
                                                guidance=guidance, clip=1.0, **extra)
    restored, observed = restored.clamp(-1, 1), y.clamp(-1, 1)
    metrics = {f"{stage}_psnr": psnr(restored, images).mean().item(), f"{stage}_ssim": ssim(restored, images).mean().item(),
               f"{stage}_psnr_observed": psnr(observed, images).mean().item(),
               f"{stage}_ssim_observed": ssim(observed, images).mean().item(), f"{stage}_nfe": float(nfe)}
    return {"metrics": metrics, "observed": observed, "restored": restored}
