"""Exact log-likelihoods through the probability-flow ODE (Song et al. 2021, sec. 4.3 and appendix D).

The probability-flow ODE dx/dt = v(x, t) = f(t) x - 1/2 g(t)^2 score(x, t) (``GaussianProcess.sde``)
carries the prior p_1 at t = 1 to a model density p_t at every earlier time; along a solution x_t
the instantaneous change of variables (Chen et al. 2018, Neural ODEs, thm. 1) gives
d log p_t(x_t) / dt = -div v(x_t, t), so

    log p_{t0}(x_{t0}) = log p_1(x_1) + int_{t0}^{1} div v(x_t, t) dt.

:func:`ode_log_likelihood` integrates the augmented state [x, int div v] forward from the data at
t0 to t = 1 with scipy's adaptive RK45 (the solver of ``samplers.ode_rk45``) and returns the
negative log-likelihood in nats per example. The divergence is either exact (:func:`divergence_exact`,
one backward pass per data dimension: low-dimensional data) or Hutchinson's estimate
(:func:`divergence_hutchinson`, Hutchinson 1989; Grathwohl et al. 2019, FFJORD) with the probe
vectors drawn once and kept fixed for the whole solve, so the integrand is a smooth function of
t that the adaptive solver can integrate and the estimate of log p is unbiased.

Conventions (documented where they act):

- **Start time.** The score is only trained on [t_min, 1] and, as t -> 0, sigma -> 0 so the score
  and the velocity blow up; the integral starts at t0 = ``process.t_min`` (continuous processes: the
  analogue of Song et al.'s eps, 1e-5 in their likelihood runs, 1e-3 by default here) or at t0 = 1/T, the first noisy grid time, for a discrete process
  (whose path between grid times is the interpolation of ``DiscreteProcess``: a genuine continuous
  Gaussian path with the discrete marginals at every grid time, the same one ``ode_rk45`` solves; the
  network is conditioned on t between grid times as in that sampler). That path's g(t)^2 jumps at
  every grid time, which RK45 crosses without resolving: expect many more evaluations than on a
  smooth continuous path (~400 against ~50 at T = 1000, rtol = 1e-5) and a systematic error of the
  order of 1e-3 bits/dim that a smaller rtol does not remove.
  The data point x0 is used as the ODE's state at t0 as it is (not scaled by alpha(t0), not
  perturbed): what is returned is -log p_{t0}(x0), the model's density of the slightly noised
  marginal q_{t0} = alpha(t0) x0 + sigma(t0) eps evaluated at x0, Song et al.'s convention.
- **Prior.** p_1 = N(0, sigma(1)^2 I), the distribution ``GaussianProcess.prior_sample`` draws from
  (N(0, I) for vp, N(0, sigma_max^2 I) for ve). Its mismatch with the true q_1 belongs to the model.
- **Units.** nats per example; :func:`bits_per_dim` converts, :func:`dequantized_bits_per_dim` adds
  the offset of 8-bit (or any ``levels``) data dequantized into [-1, 1] (see there).

The held-out bits/dim a trial records (``bpd_ode`` and ``bpd_elbo``) are ``diffusion.bpd.heldout_likelihood``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from .denoiser import Denoiser
from .processes import GaussianProcess
from .registry import Registry

VectorField = Callable[[Tensor], Tensor]
# eval.probe and eval.divergence: the names a user writes (the implementations are draw_probes and divergence_*)
PROBES: Registry = Registry("eval.probe")
PROBES.register("rademacher")("rademacher")
PROBES.register("gaussian")("gaussian")
DIVERGENCES: Registry = Registry("eval.divergence")
_LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------
# Divergences
# --------------------------------------------------------------------------------------------


def draw_probes(shape: tuple[int, ...], probes: int, distribution: str = "rademacher",
                generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
                device="cpu") -> Tensor:
    """``probes`` random vectors per example, [probes, *shape], with E[v v^T] = I: Rademacher (+-1 with
    probability 1/2 each; the lower-variance choice, Hutchinson 1989) or standard Gaussian."""
    if distribution not in PROBES:
        raise ValueError(f"distribution must be one of {', '.join(PROBES.names())}, got {distribution!r}")
    if probes < 1:
        raise ValueError(f"probes must be an integer >= 1, got {probes}")
    full = (probes, *shape)
    if distribution == "gaussian":
        return torch.randn(full, generator=generator, dtype=dtype, device=device)
    bits = torch.randint(0, 2, full, generator=generator, device=device)
    return (2 * bits - 1).to(dtype)


def _forward(fn: VectorField, x: Tensor) -> tuple[Tensor, Tensor]:
    """(x with requires_grad, fn(x)) under enable_grad, whatever the caller's grad mode."""
    x = x.detach().requires_grad_(True)
    out = fn(x)
    if out.shape != x.shape:
        raise ValueError(f"fn must map [B, ...] to the same shape, got {tuple(x.shape)} -> {tuple(out.shape)}")
    return x, out


def _exact_trace(x: Tensor, out: Tensor) -> Tensor:
    """sum_i d out_i / d x_i per example: one vector-Jacobian product per dimension i (the row e_i^T J of
    every example at once), keeping its i-th entry. Assumes examples do not interact (out[b] depends
    on x[b] only), as for any denoiser. (A vmapped backward, ``is_grads_batched``, measured slower on
    CPU for small D.)"""
    B, D = x.shape[0], x[0].numel()
    flat = out.reshape(B, D)
    trace = out.new_zeros(B)
    for i in range(D):
        (row,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
        trace = trace + row.reshape(B, D)[:, i]
    return trace


def _hutchinson_terms(x: Tensor, out: Tensor, vectors: Tensor) -> Tensor:
    """v^T J v for each probe v, [B, probes]: one vjp (v^T J) per probe, then the dot product with v."""
    terms = []
    for v in vectors:
        (vjp,) = torch.autograd.grad(out, x, v.to(out.dtype), retain_graph=True)
        terms.append((vjp * v).reshape(x.shape[0], -1).sum(1))
    return torch.stack(terms, 1)


def divergence_exact(fn: VectorField, x: Tensor) -> Tensor:
    """The trace of the Jacobian of ``fn``: [B, ...] -> [B, ...] at x, per example [B] (detached).

    Exact, by one vector-Jacobian product per data dimension: D times the cost of a backward pass,
    for low-dimensional data. fn must treat examples independently."""
    with torch.enable_grad():
        x_, out = _forward(fn, x)
        return _exact_trace(x_, out).detach()


def divergence_hutchinson(fn: VectorField, x: Tensor, probes: int = 1, distribution: str = "rademacher",
                          generator: Optional[torch.Generator] = None, *, vectors: Optional[Tensor] = None,
                          per_probe: bool = False) -> Tensor:
    """Hutchinson's unbiased estimate of div fn = tr J: the mean over probes of v^T J v with E[v v^T] = I,
    per example [B] (detached); any data shape [B, ...]. One vjp per probe.

    The probes are ``vectors`` [probes, B, ...] if given (fixed probes, as in an ODE solve), else drawn
    from ``distribution`` with ``generator`` (:func:`draw_probes`). Variance per probe: for Gaussian
    probes 2 ||J_s||_F^2, for Rademacher 2 (||J_s||_F^2 - sum_i J_ii^2), J_s = (J + J^T) / 2.
    ``per_probe=True`` returns the single-probe estimates [B, probes] instead of their mean."""
    if vectors is None:
        vectors = draw_probes(tuple(x.shape), probes, distribution, generator, x.dtype, x.device)
    elif vectors.shape[1:] != x.shape:
        raise ValueError(f"vectors must have shape [probes, {', '.join(map(str, x.shape))}], "
                         f"got {tuple(vectors.shape)}")
    with torch.enable_grad():
        x_, out = _forward(fn, x)
        terms = _hutchinson_terms(x_, out, vectors).detach()
    return terms if per_probe else terms.mean(1)


# --------------------------------------------------------------------------------------------
# The probability-flow ODE likelihood
# --------------------------------------------------------------------------------------------


@dataclass
class LikelihoodResult:
    """Per-example results of :func:`ode_log_likelihood` (float64 [B] unless said otherwise).

    nll = -(prior_logp + delta_logp) in nats; prior_logp = log p_1(x_1); delta_logp the integral of
    div v from t_start to 1; x1 [B, ...] the ODE's state at t = 1 (the latent code); nfe the
    solver's evaluations of the augmented vector field (each one forward pass of the denoiser plus
    the divergence's backward passes); dims the data dimensions per example."""

    nll: Tensor
    prior_logp: Tensor
    delta_logp: Tensor
    x1: Tensor
    nfe: int
    t_start: float
    dims: int

    def bits_per_dim(self, offset_bits: float = 0.0) -> Tensor:
        return bits_per_dim(self.nll, self.dims, offset_bits)


DIVERGENCES.register("exact")(divergence_exact)
DIVERGENCES.register("hutchinson")(divergence_hutchinson)


def default_t_start(process: GaussianProcess) -> float:
    """Where the likelihood integral starts: ``process.t_min``, which is Song et al.'s eps for a
    continuous process and 1/T (the first noisy grid time, sigma = sigma_1 > 0) for a discrete one.
    Below 1/T a discrete path has sigma = 0 and no score."""
    return float(process.t_min)


def prior_log_prob(process: GaussianProcess, x1: Tensor) -> Tensor:
    """log N(x1; 0, sigma(1)^2 I) per example, float64 [B]: the prior ``prior_sample`` draws from."""
    log_sigma = process.log_sigma64(torch.ones(1, dtype=torch.float64)).item()
    x = x1.double().reshape(x1.shape[0], -1)
    D = x.shape[1]
    return -0.5 * D * (math.log(2 * math.pi) + 2 * log_sigma) - 0.5 * x.square().sum(1) * math.exp(-2 * log_sigma)


def _velocity_and_divergence(denoiser: Denoiser, x: Tensor, t: float, vectors: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """v(x, t) = f(t) x - 1/2 g(t)^2 score(x, t) and div v per example [B], both detached: exact
    (``vectors`` None) or Hutchinson's estimate with the fixed probes ``vectors`` [probes, B, ...]."""
    tt = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
    f, g2 = denoiser.process.sde(torch.tensor([t], dtype=torch.float64))
    f, g2 = f.item(), g2.item()

    def velocity(z: Tensor) -> Tensor:
        return f * z - 0.5 * g2 * denoiser.score(z, tt).to(z.dtype)

    with torch.enable_grad():
        x_, v = _forward(velocity, x)
        div = _exact_trace(x_, v) if vectors is None else _hutchinson_terms(x_, v, vectors).mean(1)
    return v.detach(), div.detach()


def _augmented_field(denoiser: Denoiser, x0: Tensor, vectors: Optional[Tensor],
                     max_nfe: Optional[int]) -> Callable[[float, np.ndarray], np.ndarray]:
    """The right-hand side d/dt [x, delta] = [v, div v] on scipy's flattened float64 state (x in x0's
    shape, dtype and device for the denoiser), raising RuntimeError past ``max_nfe`` evaluations."""
    shape, device, dtype, n = x0.shape, x0.device, x0.dtype, x0.numel()
    evaluations = 0

    def augmented(t: float, y: np.ndarray) -> np.ndarray:
        nonlocal evaluations
        evaluations += 1
        if max_nfe is not None and evaluations > max_nfe:
            raise RuntimeError(f"the probability-flow ODE solve needed more than {max_nfe} evaluations "
                               f"(eval.ode_max_nfe), at t = {t:.4g}")
        x = torch.from_numpy(y[:n]).to(device, dtype).reshape(shape)
        v, div = _velocity_and_divergence(denoiser, x, t, vectors)
        return np.concatenate([v.double().cpu().numpy().ravel(), div.double().cpu().numpy()])

    return augmented


def ode_log_likelihood(denoiser: Denoiser, x0: Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
                       divergence: str = "hutchinson", probes: int = 1, distribution: str = "rademacher",
                       generator: Optional[torch.Generator] = None, t_start: Optional[float] = None,
                       max_nfe: Optional[int] = None) -> LikelihoodResult:
    """-log p_{t_start}(x0) in nats per example under the probability-flow ODE of ``denoiser``.

    Integrates d/dt [x, delta] = [v(x, t), div v(x, t)], v = f x - 1/2 g^2 score, from (x0, 0) at
    t = t_start to t = 1 with scipy's RK45 (``rtol``, ``atol``) over the whole flattened batch in one
    float64 state (the step sizes are shared by the batch, so an example's value depends very slightly
    on its batch companions, within the tolerances); then log p(x0) = log p_1(x_1) + delta(1) with
    the prior p_1 = N(0, sigma(1)^2 I) (:func:`prior_log_prob`).

    - ``t_start``: default :func:`default_t_start` (``process.t_min``; 1/T for a discrete process).
      x0 is the state at t_start unchanged (module docstring, "Start time"): the result is the model's
      density at t_start, approximating q_{t_start}, at the clean x0 (the data density smoothed at sigma(t_start)).
    - ``divergence``: "exact" (``divergence_exact``, D backward passes per evaluation) or
      "hutchinson" (``probes`` vectors of ``distribution`` per example, drawn once from ``generator``
      and fixed for the solve; the trajectory does not depend on them and delta is linear in the
      estimates, so the NLL is an unbiased estimate of the exact-divergence NLL, up to solver error).
    - ``max_nfe``: give up (RuntimeError) once the solver has evaluated the vector field this many times,
      instead of letting a stiff or non-smooth field (a model that is not a smooth function of t) run on.
    - The denoiser is evaluated in x0's dtype (float32 data for a float32 network, which should be in
      eval mode; float64 for an exact analytic denoiser), with t as float32 [B] as the samplers pass it.
    """
    from scipy.integrate import solve_ivp

    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES.names())}, got {divergence!r}")
    process = denoiser.process
    t0 = default_t_start(process) if t_start is None else float(t_start)
    if not 0.0 < t0 < 1.0:
        raise ValueError(f"t_start must be in (0, 1), got {t0}")
    if not x0.is_floating_point():
        raise ValueError("x0 must be a floating-point tensor (dequantize integer data first)")
    B, D = x0.shape[0], x0[0].numel()
    vectors = (draw_probes(tuple(x0.shape), probes, distribution, generator, x0.dtype, x0.device)
               if divergence == "hutchinson" else None)
    # The likelihood is one integral (Song et al. 2021, appendix D): one adaptive solve, not split further.
    state = np.concatenate([x0.detach().double().cpu().numpy().ravel(), np.zeros(B)])
    solution = solve_ivp(_augmented_field(denoiser, x0, vectors, max_nfe), (t0, 1.0), state, method="RK45",
                         rtol=rtol, atol=atol)
    if not solution.success:
        raise RuntimeError(f"the probability-flow ODE solve failed: {solution.message}")
    end = torch.from_numpy(solution.y[:, -1].copy())
    x1, delta = end[: B * D].reshape(x0.shape), end[B * D:]
    prior = prior_log_prob(process, x1)
    return LikelihoodResult(nll=-(prior + delta), prior_logp=prior, delta_logp=delta, x1=x1,
                            nfe=int(solution.nfev), t_start=t0, dims=D)


# --------------------------------------------------------------------------------------------
# Units and dequantization
# --------------------------------------------------------------------------------------------


def bits_per_dim(nll_nats: Tensor, dims: int, offset_bits: float = 0.0) -> Tensor:
    """nats per example -> bits per dimension: nll / (dims ln 2) + offset_bits (the offset of a change
    of scale, see :func:`dequantized_bits_per_dim`)."""
    return nll_nats / (dims * _LN2) + offset_bits


def dequantize(levels_k: Tensor, generator: Optional[torch.Generator] = None, levels: int = 256,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform dequantization of integer data k in {0, ..., levels - 1} (uint8 or any integer-valued
    tensor) into [-1, 1): y = 2 (k + u) / levels - 1, u ~ U[0, 1) per entry (Theis et al. 2016;
    Song et al. 2021's evaluation). Bin k becomes the interval [2k/levels - 1, 2(k + 1)/levels - 1)
    of width 2/levels, so the bins tile [-1, 1) exactly.

    Note the scale differs slightly from the training scale of ``diffusion.data`` (k / (levels - 1)
    * 2 - 1, end values on the grid): use :func:`to_levels` to recover k from such data first."""
    if levels < 2:
        raise ValueError(f"levels must be an integer >= 2, got {levels}")
    k = levels_k.to(torch.float64)
    if ((k != k.round()) | (k < 0) | (k > levels - 1)).any():
        raise ValueError(f"dequantize expects integers in [0, {levels - 1}]")
    u = torch.rand(k.shape, generator=generator, dtype=torch.float64, device=k.device)
    return (2 * (k + u) / levels - 1).to(dtype)


def to_levels(x: Tensor, levels: int = 256) -> Tensor:
    """Integer levels k (int64) of data on the training scale x = k / (levels - 1) * 2 - 1."""
    k = ((x.double() + 1) / 2 * (levels - 1)).round()
    if ((k < 0) | (k > levels - 1)).any():
        raise ValueError(f"x must lie in [-1, 1] (levels={levels})")
    return k.long()


def dequantized_bits_per_dim(nll_y: Tensor, dims: int, levels: int = 256) -> Tensor:
    """Bits per dimension of ``levels``-level discrete data from the NLL (nats) of its dequantized
    version y = 2 (k + u) / levels - 1 in [-1, 1) (:func:`dequantize`).

    The usual scale of discrete data is the dequantized x = k + u in [0, levels), where the bins have
    width 1 and a density is a probability per bin on average. y = 2 x / levels - 1 gives
    p_x(x) = p_y(y) (2 / levels)^D, so -log p_x = NLL_y + D log(levels / 2) and

        bits/dim = NLL_y / (D ln 2) + log2(levels / 2)        (= NLL_y / (D ln 2) + 7 for 8-bit data),

    Song et al. 2021's offset of 7 for data centred on [-1, 1] (8 on [0, 1)). By Jensen's inequality,
    E_u[-log p_x(k + u)] >= -log P(k) for the discrete model P(k) = int_bin p_x, so this is an upper
    bound on the discrete data's bits/dim (Theis et al. 2016), tight when p is flat within bins.
    Example: a model uniform on [-1, 1]^D has NLL_y = D ln 2 and costs 1 + 7 = 8 bits, log2(256)."""
    return bits_per_dim(nll_y, dims, offset_bits=math.log2(levels / 2))
