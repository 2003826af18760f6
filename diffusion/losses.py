"""Loss weightings: weights on one squared error between predicted and true noise.

Every weighting is a function ``(eps_hat, eps, alpha, sigma, *, <what else it reads>) -> loss [B]``
with alpha and sigma broadcast against the data; a weight that depends on the time takes ``t`` [B] and the
``process``, and a weighting's own options are plain numbers with its paper's defaults (``min_snr``'s ``gamma``).
``diffusion_loss`` takes plain numbers too and passes each weighting exactly what it declares; a LossConfig
becomes its keywords through ``registry.options_for`` and :func:`weighting_options`. The
errors of x0 and the score follow from the eps error (x0 error = sigma / alpha * eps error, score
error = eps error / sigma), so every weighting is written where its paper writes it. Squared errors are averaged over data dimensions (not summed), so
losses are comparable across image sizes; the papers' sums are D times larger.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .config import LossConfig
from .denoiser import Denoiser
from .elbo import elbo_term, prior_term
from .parameterizations import SIGMA_DATA, eps_to_score
from .processes import expand
from .registry import Registry, options_for
from .score_matching import OBJECTIVES

Weighting = Callable[..., Tensor]
WEIGHTINGS: Registry[Weighting] = Registry("loss.weighting")
# loss.t_sampling: whether t is drawn by importance (TimeSampler) instead of uniformly
T_SAMPLINGS: Registry[bool] = Registry("loss.t_sampling")
T_SAMPLINGS.register("uniform")(False)
T_SAMPLINGS.register("importance")(True)


def _mean_over_dims(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


@WEIGHTINGS.register("simple")
def simple(eps_hat: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """L_simple = ||eps - eps_hat||^2 (Ho et al. 2020, eq. 14 and Algorithm 1)."""
    return _mean_over_dims((eps_hat - eps) ** 2)


@WEIGHTINGS.register("sigma2")
def sigma2(eps_hat: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Denoising score matching with lambda(sigma) = sigma^2 (Song & Ermon 2019, eqs. 5-6):
    1/2 lambda(sigma) ||s_hat(x_t) - grad log q(x_t | x0)||^2 with grad log q(x_t | x0) = -eps / sigma
    For alpha != 1 this is the same expression with q(x_t | x0) = N(alpha x0, sigma^2 I)."""
    score_hat = eps_to_score(eps_hat, sigma)
    score_target = eps_to_score(eps, sigma)
    return 0.5 * _mean_over_dims(sigma**2 * (score_hat - score_target) ** 2)


@WEIGHTINGS.register("min_snr")
def min_snr(eps_hat: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, *, gamma: float = 5.0) -> Tensor:
    """Min-SNR-gamma (Hang et al. 2023, eq. 5): min(SNR, gamma) ||x0_hat - x0||^2, i.e. min(SNR, gamma) / SNR
    times the eps error, SNR = alpha^2 / sigma^2 (gamma = 5 in the paper; ``loss.min_snr_gamma`` in a config)."""
    snr = (alpha / sigma) ** 2
    return _mean_over_dims(snr.clamp(max=gamma) / snr * (eps_hat - eps) ** 2)


@WEIGHTINGS.register("likelihood")
def likelihood(eps_hat: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, *, t: Tensor, process) -> Tensor:
    """Likelihood weighting lambda(t) = g(t)^2 (Song et al. 2021b, "Maximum Likelihood Training of Score-Based
    Diffusion Models", Theorem 1): 1/2 g^2 ||s_hat - grad log q(x_t | x0)||^2 = 1/2 g^2 / sigma^2 ||eps_hat - eps||^2."""
    _, g2 = process.sde(t)
    weight = expand(g2.to(eps.device), eps) / sigma**2
    return 0.5 * _mean_over_dims(weight * (eps_hat - eps) ** 2)


@WEIGHTINGS.register("elbo")
def elbo(eps_hat: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, *, t: Tensor, process) -> Tensor:
    """The variational bound's weight. Continuous time: -1/2 dlambda/dt ||eps_hat - eps||^2 (Kingma et al. 2021,
    VDM eq. 17), which is 1/2 g^2 / sigma^2 since g^2 = -sigma^2 dlambda/dt: the same weight as ``likelihood``
    (Song et al. 2021b show the equivalence). In discrete time ``diffusion_loss`` uses the exact bound instead
    (every KL term, the prior and the discretized decoder, ``diffusion.elbo``)."""
    return likelihood(eps_hat, eps, alpha, sigma, t=t, process=process)


@WEIGHTINGS.register("edm")
def edm(eps_hat: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Karras et al. 2022, sec. 5 and Table 1: lambda(sigma~) ||D - x0||^2 with lambda = (sigma~^2 + sd^2) / (sigma~ sd)^2
    in their coordinates (sigma~ = sigma / alpha, sd = SIGMA_DATA, the x0 error is sigma~ times the eps error):
    (sigma~^2 + sd^2) / sd^2 times the eps error, so the effective target has unit variance at every noise level."""
    scaled = sigma / alpha
    return _mean_over_dims((scaled**2 + SIGMA_DATA**2) / SIGMA_DATA**2 * (eps_hat - eps) ** 2)


class TimeSampler:
    """Draws training times and the weights that keep the loss estimate unbiased.

    ``t_sampling`` (``loss.t_sampling``, default uniform):

    ``uniform``: the process's own times (uniform on {1..T}/T, or on [t_min, 1]), weight 1.
    ``importance`` (Nichol & Dhariwal 2021, sec. 3.3): the time range is split into ``bins`` (the T steps in
    discrete time, ``importance_bins`` equal bins in continuous time, default 100 as ``loss.importance_bins``);
    once every bin holds ``history`` recent losses, bin k is drawn with p_k proportional to sqrt(E[L_k^2]) (mixed
    with ``uniform_share`` of the uniform law) and each example is weighted by p_uniform / p_k. The loss
    history is part of the state, so a resumed run continues exactly.
    """

    def __init__(self, process, t_sampling: str = "uniform", *, importance_bins: int = 100, history: int = 10,
                 uniform_share: float = 1e-3):
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"t_sampling must be one of {', '.join(T_SAMPLINGS.names())}, got {t_sampling!r}")
        if process.T is None and importance_bins < 1:
            raise ValueError(f"importance_bins must be an integer >= 1, got {importance_bins}")
        self.process, self.importance = process, T_SAMPLINGS.get(t_sampling)
        self.bins = process.T if process.T is not None else importance_bins
        self.history = torch.zeros(self.bins, history, dtype=torch.float64)
        self.counts = torch.zeros(self.bins, dtype=torch.long)
        self.uniform_share = uniform_share

    def probabilities(self) -> Tensor:
        """p_k over the bins (float64 [bins]); uniform until every bin has a full history."""
        uniform = torch.full((self.bins,), 1.0 / self.bins, dtype=torch.float64)
        if not self.importance or (self.counts < self.history.shape[1]).any():
            return uniform
        p = (self.history**2).mean(1).sqrt()
        p = p / p.sum()
        return (1 - self.uniform_share) * p + self.uniform_share * uniform

    def sample(self, batch: int, generator: torch.Generator, device) -> tuple[Tensor, Tensor]:
        """(t [B], weights [B]) with E[weight * L(t)] = E_uniform[L(t)]."""
        if not self.importance:
            return self.process.sample_times(batch, generator, device), torch.ones(batch, device=device)
        p = self.probabilities()
        k = torch.multinomial(p.to(device), batch, replacement=True, generator=generator)
        weights = (1.0 / (self.bins * p.to(device)[k])).float()
        if self.process.T is not None:
            return (k + 1).float() / self.process.T, weights
        t_min = self.process.t_min
        u = torch.rand(batch, generator=generator, device=device)
        return t_min + (1 - t_min) * (k.float() + u) / self.bins, weights

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-example losses (unweighted) at times t."""
        if not self.importance:
            return
        if self.process.T is not None:
            k = (t.double() * self.process.T).round().long() - 1
        else:
            k = ((t.double() - self.process.t_min) / (1 - self.process.t_min) * self.bins).long()
        for bin_index, value in zip(k.clamp(0, self.bins - 1).tolist(), losses.detach().double().tolist()):
            self.history[bin_index] = torch.roll(self.history[bin_index], 1)
            self.history[bin_index, 0] = value
            self.counts[bin_index] += 1

    def state_dict(self) -> dict:
        return {"history": self.history.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.history.copy_(state["history"])
        self.counts.copy_(state["counts"])


def diffusion_loss(
    denoiser: Denoiser, weighting: Weighting, x0: Tensor, generator: torch.Generator, *,
    levels: int | None = None, variance: str = "beta_tilde", objective: str = "denoising",
    hybrid_lambda: float = 0.001, n_projections: int = 1, projection: str = "gaussian",
    weighting_options: dict | None = None, time_sampler: TimeSampler | None = None, reduction: str = "mean",
) -> Tensor:
    """One Monte Carlo estimate of the weighted loss on a batch x0 [B, ...]: the mean over the batch
    (``reduction="none"``: the per-example estimates [B], importance weights applied).

    On a discrete process the variational bound enters in two cases (``diffusion.elbo``, nats per data
    dimension, with the decoder discretized to ``levels`` values and the reverse ``variance``):

    - the ``elbo`` weighting: the loss is the unbiased one-step estimate L_T + T L_{i-1} of the whole
      bound (Ho et al. 2020, eq. 5), i drawn by the time sampler (uniform or importance-sampled with its
      unbiasing weight, Nichol & Dhariwal 2021, sec. 3.3);
    - ``variance="learned_range"`` with any other weighting: Nichol & Dhariwal's hybrid loss
      L + ``hybrid_lambda`` L_vlb (default 0.001, ``loss.hybrid_lambda``), where L_vlb is the same bound estimate
      with the gradient through the mean stopped, so that the bound trains only the variance head (their sec. 3.1).

    ``objective`` (``loss.objective``): ``denoising`` (the default, all of the above) or ``implicit`` / ``sliced``
    score matching, :func:`score_matching_loss` with ``n_projections`` and ``projection`` (which it alone reads).
    The weighting gets ``weighting_options`` (its own options, default none: its signature's defaults, e.g.
    ``{"gamma": 5.0}`` for ``min_snr``; :func:`weighting_options` reads them from a LossConfig), and the times and
    process if it takes them. ``time_sampler``: default uniform times (``TimeSampler(process)``). One network
    evaluation per example either way."""
    process = denoiser.process
    if objective != "denoising":
        return score_matching_loss(denoiser, x0, generator, objective, n_projections=n_projections,
                                   projection=projection, time_sampler=time_sampler, reduction=reduction)
    time_sampler = time_sampler or TimeSampler(process)
    t, importance = time_sampler.sample(x0.shape[0], generator, x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    x_t = process.marginal(x0, t, eps)
    eps_hat, head = denoiser.predict(x_t, t)
    bound = None
    if process.T is not None and (weighting is elbo or variance == "learned_range"):
        term = elbo_term(denoiser, x0, process.index(t), eps, levels, variance, prediction=(eps_hat, head),
                         detach_mean=weighting is not elbo)
        bound = ((prior_term(process, x0) + process.T * term) / x0[0].numel()).float()
    if weighting is elbo and bound is not None:
        losses = bound
    else:
        alpha, sigma = denoiser._coefs(x_t, t)
        keywords = {**(weighting_options or {}), **options_for(weighting, None, t=t, process=process)}
        losses = weighting(eps_hat.float(), eps, alpha, sigma, **keywords)
        if bound is not None:
            losses = losses + hybrid_lambda * bound
    time_sampler.update(t, losses)
    return _reduce(importance * losses, reduction)


def weighting_options(weighting: Weighting, options: LossConfig, **inputs: Any) -> dict:
    """The keyword arguments ``weighting`` declares: its options read from the LossConfig by name (min_snr's
    ``gamma`` from ``min_snr_gamma``) and those of ``inputs`` (the times ``t``, the ``process``) it takes.
    Without ``inputs``: the ``weighting_options`` of :func:`diffusion_loss` for a config."""
    return options_for(weighting, options, renames={"gamma": "min_snr_gamma"}, **inputs)


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    return losses.mean() if reduction == "mean" else losses


def score_matching_loss(denoiser: Denoiser, x0: Tensor, generator: torch.Generator, objective: str, *,
                        n_projections: int = 1, projection: str = "gaussian", time_sampler: TimeSampler | None = None,
                        reduction: str = "mean") -> Tensor:
    """Implicit or sliced score matching (``diffusion.score_matching``) of the noised data x_t ~ q_t at a
    random t per example, weighted by lambda = sigma^2 (Song & Ermon 2019, eq. 6) and averaged over
    dimensions: for every model it equals the ``sigma2`` denoising loss up to a constant that does not
    depend on the model (Hyvarinen 2005, Theorem 1; Vincent 2011). For data [B, D].

    ``objective``: ``implicit`` (exact Jacobian trace) or ``sliced``, the latter with ``n_projections`` random
    projections per example drawn from ``projection`` (``gaussian`` or ``rademacher``; defaults 1 and gaussian as
    ``loss.n_projections`` and ``loss.projection``). ``time_sampler``: default uniform times; ``reduction`` as in
    :func:`diffusion_loss`."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES.names())}, got {objective!r}")
    process = denoiser.process
    time_sampler = time_sampler or TimeSampler(process)
    t, importance = time_sampler.sample(x0.shape[0], generator, x0.device)
    x_t = process.marginal(x0, t, torch.randn(x0.shape, generator=generator, device=x0.device))
    score_fn = lambda x: denoiser.score(x, t)  # noqa: E731 - rows of x are the examples at times t
    extra = {"n_projections": n_projections, "distribution": projection} if objective == "sliced" else {}
    per_example = OBJECTIVES.get(objective)(score_fn, x_t, generator=generator, **extra)
    sigma = process.sigma(t).to(x0.device)
    losses = sigma**2 * per_example / x0[0].numel()
    time_sampler.update(t, losses)
    return _reduce(importance * losses, reduction)
