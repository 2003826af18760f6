"""The discrete-time variational bound of a Gaussian diffusion, in nats per example.

For a process with T steps on the grid t_i = i / T, the negative ELBO of one example x0
(Sohl-Dickstein et al. 2015, eq. 14; Ho et al. 2020, eq. 5) is

    -log p(x0) <= L_T + sum_{i=2}^{T} L_{i-1} + L_0, with
    L_T     = KL(q(x_T | x0) || p(x_T))                                      (prior term)
    L_{i-1} = E_{q(x_i | x0)} KL(q(x_{i-1} | x_i, x0) || p(x_{i-1} | x_i))   (transition terms)
    L_0     = E_{q(x_1 | x0)} [-log p(x0 | x_1)]                             (decoder term)

Every distribution is written with alpha and sigma alone (Kingma et al. 2021, VDM, eqs. 3-4 and
appendix A), so one code path serves ``vp`` and ``ve`` processes:

- q(x_i | x0) = N(alpha_i x0, sigma_i^2 I), drawn as x_i = alpha_i x0 + sigma_i eps;
- q(x_s | x_t, x0) = N(mu(x_t, x0), beta_tilde I), ``DiscreteProcess.posterior`` (Ho et al. eqs. 6-7);
- p(x_s | x_t) = N(mu(x_t, x0_hat), v I) with x0_hat = ``denoiser.x0(x_t, t)`` and v either
  beta_tilde or beta = sigma^2_{t|s} (Ho et al. sec. 3.2, the two fixed reverse variances);
- p(x_T) = N(0, sigma_T^2 I), the prior ``DiscreteProcess.prior_sample`` draws from.

Each expectation over q(x_i | x0) is estimated with one draw of eps. Values are summed over data
dimensions (not averaged, unlike ``diffusion.losses``), returned per example as float64 [B], and
computed in float64; divide by D ln 2 (:func:`bits_per_dim`) for bits per dimension.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .denoiser import Denoiser
from .processes import DiscreteProcess, expand
from .registry import Registry

# model.variance: the variance of p(x_s | x_t), each (process, s, t, v) -> variance (see reverse_variance)
REVERSE_VARIANCES: Registry = Registry("model.variance")
_LN2 = math.log(2.0)
_TINY = 1e-300  # floor of a log-difference of CDFs: keeps log(Phi(b) - Phi(a)) finite (>= -691)


# --------------------------------------------------------------------------------------------
# Gaussian pieces
# --------------------------------------------------------------------------------------------


def gaussian_kl(mean_q: Tensor, var_q: Tensor, mean_p: Tensor, var_p: Tensor) -> Tensor:
    """Elementwise KL(N(mean_q, var_q) || N(mean_p, var_p)) in nats; arguments broadcast together.

    KL = 1/2 [log(var_p / var_q) + var_q / var_p - 1 + (mean_q - mean_p)^2 / var_p]
    (e.g. Kingma & Welling 2014, appendix B; Ho et al. 2020, eq. 8 for equal variances). The ratio
    term is kept apart from the squared distance so that equal variances cancel exactly.
    """
    var_q, var_p = torch.as_tensor(var_q), torch.as_tensor(var_p)
    return 0.5 * (
        torch.log(var_p) - torch.log(var_q) + var_q / var_p - 1.0 + (mean_q - mean_p) ** 2 / var_p
    )


def gaussian_nll(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """-log N(x; mean, var I) in nats, summed over all but the first dimension: [B, ...] -> [B]."""
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    nll = 0.5 * (math.log(2 * math.pi) + torch.log(var) + (x - mean) ** 2 / var)
    return _sum_dims(nll.expand_as(x))


def _log1mexp(d: Tensor) -> Tensor:
    """log(1 - exp(-d)) for d > 0, accurate for small and large d (Maechler 2012). Both branches
    see safe inputs, so gradients stay finite."""
    d = d.clamp(min=_TINY)
    small = d <= _LN2
    near = torch.log(-torch.expm1(-torch.where(small, d, torch.full_like(d, _LN2))))
    far = torch.log1p(-torch.exp(-torch.where(small, torch.full_like(d, _LN2), d)))
    return torch.where(small, near, far)


def log_normal_interval(lower: Tensor, upper: Tensor) -> Tensor:
    """log(Phi(upper) - Phi(lower)) for standardized bounds lower < upper (either may be infinite).

    Stable in both tails: an interval whose midpoint is positive is reflected to (-upper, -lower),
    which has the same probability, so both CDFs are evaluated where they are not close to 1; then
    log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b))) with
    ``torch.special.log_ndtr``. This replaces the clamp of the probability at 1e-12 in Ho et al.'s
    implementation, which caps the loss per dimension at 27.6 nats; here the result is exact down
    to about -690 nats per dimension.
    """
    flip = (lower + upper) > 0
    lower, upper = torch.where(flip, -upper, lower), torch.where(flip, -lower, upper)
    log_upper = torch.special.log_ndtr(upper)
    log_lower = torch.special.log_ndtr(lower)
    return log_upper + _log1mexp(log_upper - log_lower)


def discretized_gaussian_nll(x0: Tensor, mean: Tensor, std: Tensor | float, levels: int) -> Tensor:
    """-log P(x0) under the discretized Gaussian decoder of Ho et al. 2020, sec. 3.3 (eq. 13), in nats.

    The data take ``levels`` evenly spaced values in [-1, 1] (256 for 8-bit images, 17 for sklearn
    digits); value x owns the bin [x - h, x + h] with half-width h = 1 / (levels - 1), and the bins of
    the end values -1 and 1 extend to -inf and +inf, so the probabilities of all levels sum to 1:
    P(x) = Phi((x + h - mean) / std) - Phi((x - h - mean) / std), computed by
    :func:`log_normal_interval`.

    x0, mean: [B, ...]; std: a float or a tensor broadcastable against x0. Returns float64 [B], the
    sum over data dimensions. x0 must lie on the grid (checked up to 1% of the spacing).
    """
    _check_levels(levels)
    x0, mean = x0.double(), mean.double()
    std = torch.as_tensor(std, dtype=torch.float64, device=x0.device)
    half_width = 1.0 / (levels - 1)
    off_grid = ((x0 + 1) / (2 * half_width) - torch.round((x0 + 1) / (2 * half_width))).abs()
    if x0.numel() and (off_grid.max().item() > 0.01 or x0.abs().max().item() > 1 + 0.02 * half_width):
        raise ValueError(
            f"discretized decoder: x0 must take the {levels} evenly spaced values in [-1, 1]; "
            "use levels=None (continuous Gaussian decoder) for continuous data"
        )
    infinity = torch.full_like(x0, math.inf)
    upper = torch.where(x0 > 1 - half_width, infinity, (x0 + half_width - mean) / std)
    lower = torch.where(x0 < -1 + half_width, -infinity, (x0 - half_width - mean) / std)
    return -_sum_dims(log_normal_interval(lower, upper))


# --------------------------------------------------------------------------------------------
# The terms of the bound
# --------------------------------------------------------------------------------------------


def reverse_variance(process: DiscreteProcess, s: Tensor, t: Tensor, variance: str, v: Optional[Tensor] = None) -> Tensor:
    """The variance of p(x_s | x_t) for times s < t [B], float64:

    - ``"beta_tilde"``: the posterior variance sigma^2_{t|s} sigma_s^2 / sigma_t^2 (optimal when x0 is
      a point mass; with it the variance part of each transition KL vanishes), [B];
    - ``"beta"``: the forward variance sigma^2_{t|s} = ``transition(s, t)[1]`` (optimal for x0 ~ N(0, I)), [B]
      (Ho et al. 2020, sec. 3.2, the two fixed choices);
    - ``"learned_range"``: exp(f log beta + (1 - f) log beta_tilde) per dimension, f = (v + 1) / 2 from the
      network's variance head v [B, ...] (Nichol & Dhariwal 2021, eq. 15), [B, ...].
    """
    return REVERSE_VARIANCES.get(variance)(process, s, t, v)


@REVERSE_VARIANCES.register("beta_tilde")
def _beta_tilde(process: DiscreteProcess, s: Tensor, t: Tensor, v: Optional[Tensor] = None) -> Tensor:
    return process.posterior_variance(s, t).to(t.device)


@REVERSE_VARIANCES.register("beta")
def _beta(process: DiscreteProcess, s: Tensor, t: Tensor, v: Optional[Tensor] = None) -> Tensor:
    return process.transition(s, t)[1].to(t.device)


@REVERSE_VARIANCES.register("learned_range")
def _learned_range(process: DiscreteProcess, s: Tensor, t: Tensor, v: Optional[Tensor] = None) -> Tensor:
    if v is None:
        raise ValueError("learned_range needs the network's variance head (model.variance: learned_range)")
    log_beta = expand(process.transition(s, t)[1].to(v.device).log(), v)
    log_beta_tilde = expand(process.posterior_variance(s, t).to(v.device).clamp(min=_TINY).log(), v)
    fraction = (v.double() + 1) / 2
    return (fraction * log_beta + (1 - fraction) * log_beta_tilde).exp()


def reverse_variance_like(process: DiscreteProcess, s: Tensor, t: Tensor, variance: str, v: Optional[Tensor],
                          like: Tensor) -> Tensor:
    """:func:`reverse_variance` shaped to broadcast against ``like`` [B, ...]."""
    var = reverse_variance(process, s, t, variance, v)
    return var if var.dim() == like.dim() else expand(var, like)


def decoder_variance(process: DiscreteProcess) -> Tensor:
    """Variance of the decoder p(x0 | x_1): sigma_1^2 / alpha_1^2.

    This is the variance of x0 given x_1 under the forward step alone (x0 = (x_1 - sigma_1 eps) / alpha_1):
    beta_1 / (1 - beta_1) ~ beta_1 for vp, Ho et al.'s fixed sigma_1^2 = beta_1 to first order, and
    sigma_1^2 = sigma_min^2 for ve. It does not depend on the ``variance`` option of the transitions.
    A float64 scalar tensor (differentiable for a learned schedule).
    """
    process = _discrete(process)
    return process.sigmas[1] ** 2 / process.alphas[1] ** 2


def prior_term(process: DiscreteProcess, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x0) || p(x_T)) = KL(N(alpha_T x0, sigma_T^2 I) || N(0, sigma_T^2 I))
    = alpha_T^2 ||x0||^2 / (2 sigma_T^2) (Ho et al. 2020, eq. 5). x0: [B, ...] -> float64 [B]."""
    alpha_T, sigma_T = _discrete(process).alphas[-1].item(), process.sigmas[-1].item()
    x0 = x0.double()
    kl = gaussian_kl(alpha_T * x0, torch.tensor(sigma_T**2), torch.zeros_like(x0), torch.tensor(sigma_T**2))
    return _sum_dims(kl)


def elbo_term(
    denoiser: Denoiser,
    x0: Tensor,
    i: Tensor,
    eps: Tensor,
    levels: Optional[int],
    variance: str = "beta_tilde",
    prediction: Optional[tuple[Tensor, Optional[Tensor]]] = None,
    detach_mean: bool = False,
) -> Tensor:
    """One-draw estimate of the term L_{i-1} of the bound for per-example step indices i.

    x_i = alpha_i x0 + sigma_i eps with t_i = i / T, and x0_hat = denoiser.x0(x_i, t_i) (one network
    evaluation for the whole batch). Then, per example:

    - i = 1: the decoder term -log p(x0 | x_1), p = N(x0_hat, sigma_1^2 / alpha_1^2 I) discretized on
      ``levels`` values (:func:`discretized_gaussian_nll`), or its density when ``levels`` is None;
      x0_hat is also the posterior mean at s = 0 (its x_t coefficient vanishes there);
    - i >= 2: KL(q(x_{i-1} | x_i, x0) || p(x_{i-1} | x_i)), both Gaussians with means from
      ``process.posterior`` at x0 and at x0_hat, variances beta_tilde and :func:`reverse_variance`.

    x0, eps: [B, ...]; i: int [B] in 1..T. Returns float64 [B], summed over data dimensions.
    ``prediction``: the denoiser's (eps_hat, v) at this x_i, if the caller already has it;
    ``detach_mean``: stop the gradient through the mean (the variance head alone learns from the term,
    the L_vlb of Nichol & Dhariwal's hybrid loss).
    """
    process = _discrete(denoiser.process)
    REVERSE_VARIANCES.get(variance)
    if levels is not None:
        _check_levels(levels)
    i = i.to(device=x0.device, dtype=torch.long)
    if ((i < 1) | (i > process.T)).any():
        raise ValueError(f"step indices must lie in 1..{process.T}")
    t = process.times(i)
    x_t = process.marginal(x0, t, eps)
    eps_hat, head = prediction if prediction is not None else denoiser.predict(x_t, t)
    if detach_mean:
        eps_hat = eps_hat.detach()
    alpha, sigma = expand(process.alpha(t), x_t), expand(process.sigma(t), x_t)
    x0_hat = (x_t - sigma * eps_hat) / alpha
    parts = []
    first = i == 1
    if first.any():
        var = decoder_variance(process).to(x0.device)
        x0_first, mean = x0[first], x0_hat[first]
        parts.append((first, gaussian_nll(x0_first.double(), mean.double(), var)
                      if levels is None else discretized_gaussian_nll(x0_first, mean, var.sqrt(), levels)))
    rest = ~first
    if rest.any():
        s = process.times(i[rest] - 1)
        v = head[rest] if head is not None else None
        parts.append((rest, _transition_kl(process, x0[rest], x_t[rest], x0_hat[rest], s, t[rest], variance, v)))
    out = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
    for mask, values in parts:  # index_put keeps the gradient of each part
        out = out.index_put((mask.nonzero().squeeze(1),), values)
    return out


def _transition_kl(process, x0, x_t, x0_hat, s, t, variance, v=None) -> Tensor:
    """KL(N(mu(x_t, x0), beta_tilde) || N(mu(x_t, x0_hat), var_p)) summed over dimensions, float64 [B]."""
    x0, x_t, x0_hat = x0.double(), x_t.double(), x0_hat.double()
    mean_q, _ = process.posterior(x_t, x0, s, t)
    mean_p, _ = process.posterior(x_t, x0_hat, s, t)
    var_q = expand(process.posterior_variance(s, t).to(t.device), x0)
    var_p = reverse_variance_like(process, s, t, variance, v, x0)
    return _sum_dims(gaussian_kl(mean_q, var_q, mean_p, var_p))


def transition_term(
    denoiser: Denoiser, x0: Tensor, t: Tensor, eps: Tensor, variance: str = "beta_tilde"
) -> Tensor:
    """L_{i-1} = KL(q(x_s | x_t, x0) || p(x_s | x_t)) at x_t = alpha_t x0 + sigma_t eps, for grid times
    t = i / T with i >= 2 and s = (i - 1) / T (Ho et al. 2020, eqs. 5-8; VDM eq. 4 for the alpha/sigma
    form). p has mean mu(x_t, x0_hat), x0_hat = denoiser.x0(x_t, t), and the ``variance`` option.

    x0, eps: [B, ...]; t: float [B] (or a scalar). Returns float64 [B].
    """
    process = _discrete(denoiser.process)
    i = process.index(t.expand(x0.shape[0]) if t.dim() == 0 else t)
    if (i < 2).any():
        raise ValueError("transition_term needs t = i / T with i >= 2; i = 1 is the decoder term")
    return elbo_term(denoiser, x0, i, eps, None, variance)


def decoder_term(denoiser: Denoiser, x0: Tensor, eps: Tensor, levels: Optional[int]) -> Tensor:
    """L_0 = -log p(x0 | x_1) at x_1 = alpha_1 x0 + sigma_1 eps (Ho et al. 2020, sec. 3.3, eq. 13).

    p(x0 | x_1) is N(x0_hat, sigma_1^2 / alpha_1^2 I) (:func:`decoder_variance`) with x0_hat =
    denoiser.x0(x_1, t_1), discretized on ``levels`` values in [-1, 1] (:func:`discretized_gaussian_nll`);
    ``levels=None`` uses the continuous density instead, for continuous data (then the bound is on
    -log of a density, not of a probability). x0, eps: [B, ...]. Returns float64 [B].
    """
    i = torch.ones(x0.shape[0], dtype=torch.long, device=x0.device)
    return elbo_term(denoiser, x0, i, eps, levels)


def elbo_terms(
    denoiser: Denoiser,
    x0: Tensor,
    levels: Optional[int],
    variance: str = "beta_tilde",
    generator: Optional[torch.Generator] = None,
) -> dict[str, Tensor]:
    """The whole bound of Ho et al. 2020, eq. 5, term by term, for a batch x0 [B, ...].

    Returns float64 tensors: ``"prior"`` [B] (L_T, exact), ``"decoder"`` [B] (L_0),
    ``"transitions"`` [B, T - 1] (column k is L_{i-1} for i = k + 2, i.e. i = 2..T) and ``"total"`` [B]
    = prior + decoder + transitions.sum(1), an upper bound on -log p(x0) in nats (a probability when
    ``levels`` is an int, a density when it is None). Each term uses its own eps draw (decoder first,
    then i = 2..T); T network evaluations on the batch. Gradients are kept: wrap the call in
    ``torch.no_grad()`` when evaluating.
    """
    process = _discrete(denoiser.process)
    batch = x0.shape[0]

    def noise() -> Tensor:
        return torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)

    prior = prior_term(process, x0)
    decoder = decoder_term(denoiser, x0, noise(), levels)
    columns = []
    for i in range(2, process.T + 1):
        steps = torch.full((batch,), i, dtype=torch.long, device=x0.device)
        columns.append(elbo_term(denoiser, x0, steps, noise(), levels, variance))
    transitions = (
        torch.stack(columns, 1) if columns else torch.zeros(batch, 0, dtype=torch.float64, device=x0.device)
    )
    return {
        "prior": prior,
        "decoder": decoder,
        "transitions": transitions,
        "total": prior + decoder + transitions.sum(1),
    }


def elbo_loss_estimate(
    denoiser: Denoiser,
    x0: Tensor,
    levels: Optional[int],
    variance: str = "beta_tilde",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """An unbiased one-sample estimate of ``elbo_terms(...)["total"]`` for training: float64 [B].

    Per example, i ~ Uniform{1, ..., T} and eps ~ N(0, I); the estimate is L_T + T * L_{i-1}(eps)
    with L_0 the decoder term and L_{i-1}, i >= 2, the transition terms (:func:`elbo_term`). Since
    sum_{i=1}^{T} L_{i-1} = T * E_i[L_{i-1}], its expectation over i and eps is exactly the expected
    total bound (Ho et al. 2020, sec. 3 and Algorithm 1 use the same uniform draw of t; the prior term
    needs no network and is added exactly). One network evaluation on the batch.
    """
    process = _discrete(denoiser.process)
    i = torch.randint(1, process.T + 1, (x0.shape[0],), generator=generator, device=x0.device)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    return prior_term(process, x0) + process.T * elbo_term(denoiser, x0, i, eps, levels, variance)


def bits_per_dim(nats: Tensor, dims: int) -> Tensor:
    """Convert a negative log-likelihood in nats per example to bits per dimension: nats / (dims ln 2)."""
    return nats / (dims * _LN2)


# --------------------------------------------------------------------------------------------


def _sum_dims(x: Tensor) -> Tensor:
    return x.flatten(1).sum(1) if x.dim() > 1 else x


def _discrete(process: DiscreteProcess) -> DiscreteProcess:
    """The bound is a sum over the T steps of a discrete process; continuous-time processes have none."""
    if getattr(process, "T", None) is None or not hasattr(process, "alphas"):
        raise ValueError("the discrete-time ELBO needs a discrete process (integer process.T)")
    return process


def _check_levels(levels) -> None:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an integer >= 2 (or None for the continuous decoder), got {levels!r}")
