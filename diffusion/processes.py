"""Gaussian diffusion paths x_t = alpha(t) x0 + sigma(t) eps, eps ~ N(0, I), t in [0, 1].

Every process is two functions of time. Discrete processes with T steps are known on the grid
t_i = i / T (alpha_0 = 1, sigma_0 = 0) and extended between grid points by interpolating
log alpha and log sigma linearly; continuous processes (the SDEs of Song et al. 2021) are closed
forms. The network always sees t, never a rescaled index.

- ``vp``: alpha = sqrt(alphabar), sigma = sqrt(1 - alphabar) (DDPM, Ho et al. 2020; VP-SDE).
- ``ve``: alpha = 1, sigma increasing (NCSN, Song & Ermon 2019; VE-SDE).
- ``subvp``: alpha = sqrt(alphabar), sigma = 1 - alphabar (Song et al. 2021, eq. 29).

Transitions, posteriors, the SDE coefficients f(t) and g(t)^2 and the probability-flow ODE all
follow from alpha and sigma alone (Kingma et al. 2021, VDM, eqs. 3-4 and appendix A), so every
sampler and loss serves every process.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

CONTINUOUS = "continuous"


def vp_process(betas: Tensor) -> "DiscreteProcess":
    """The discrete VP path of betas_1..T: alphabar_i = prod_{j <= i} (1 - beta_j) (Ho et al. 2020, eq. 4)."""
    zero = torch.zeros(1, dtype=torch.float64)
    alphabar = torch.cat([zero + 1, torch.cumprod(1 - betas, 0)])
    return DiscreteProcess("vp", alphabar.sqrt(), (1 - alphabar).sqrt())


def ve_process(sigmas: Tensor) -> "DiscreteProcess":
    """The discrete VE path of sigmas_1..T (Song & Ermon 2019): alpha = 1, sigma_0 = 0."""
    sigmas = torch.cat([torch.zeros(1, dtype=torch.float64), sigmas])
    return DiscreteProcess("ve", torch.ones_like(sigmas), sigmas)


def continuous_process(name: str, alphabar_or_sigma: Callable[[Tensor], Tensor], t_min: float = 1e-3) -> "ContinuousProcess":
    """The SDE of Song et al. 2021 for a continuous schedule: ve (alpha = 1, sigma(t)), vp (alpha^2 = alphabar,
    sigma^2 = 1 - alphabar) or subvp (alpha^2 = alphabar, sigma = 1 - alphabar, eq. 29)."""
    if name == "ve":
        return ContinuousProcess("ve", torch.zeros_like, lambda t: alphabar_or_sigma(t).log(), t_min)
    log_alphabar = lambda t: alphabar_or_sigma(t).log()  # noqa: E731
    if name == "vp":
        return ContinuousProcess("vp", lambda t: 0.5 * log_alphabar(t),
                                 lambda t: 0.5 * torch.log(-torch.expm1(log_alphabar(t))), t_min)
    return ContinuousProcess("subvp", lambda t: 0.5 * log_alphabar(t),
                             lambda t: torch.log(-torch.expm1(log_alphabar(t))), t_min)


class GaussianProcess:
    """x_t = alpha(t) x0 + sigma(t) eps. Subclasses give log alpha and log sigma (float64 in, float64
    out, differentiable in t); everything else is derived here.

    ``T`` is the number of discrete steps, or None in continuous time; ``t_min`` the smallest
    time at which the network is trained and sampled (1/T in discrete time).
    """

    name: str
    T: int | None
    t_min: float
    learned = False  # True when alpha and sigma have trainable parameters (``process.schedule: learned``)
    # True when alpha and sigma hold one value per data dimension of a basis (``diffusion.blur``): alpha(t) is
    # then [B, *shape] instead of [B], and samplers work on to_basis(x)
    per_dimension = False

    def to_basis(self, x: Tensor) -> Tensor:
        """The coordinates the process is diagonal in (the identity, but for ``diffusion.blur``'s DCT)."""
        return x

    def from_basis(self, u: Tensor) -> Tensor:
        return u

    def noise(self, shape: tuple, generator: torch.Generator, device) -> Tensor:
        """eps ~ N(0, I) in the process's basis."""
        return torch.randn(shape, generator=generator, device=device)

    def log_alpha64(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def log_sigma64(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    # --- the path ---------------------------------------------------------------------------
    def alpha(self, t: Tensor) -> Tensor:
        """alpha(t) (float [B] -> float32 [B] on t's device)."""
        return self.log_alpha64(t.double()).exp().to(torch.float32)

    def sigma(self, t: Tensor) -> Tensor:
        return self.log_sigma64(t.double()).exp().to(torch.float32)

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha^2 / sigma^2) (Kingma et al. 2021, eq. 5), float32."""
        t64 = t.double()
        return (2 * (self.log_alpha64(t64) - self.log_sigma64(t64))).to(torch.float32)

    def marginal(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps, a draw from q(x_t | x0)."""
        return expand(self.alpha(t), x0) * x0 + expand(self.sigma(t), x0) * eps

    def transition(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """q(x_t | x_s) = N(alpha_{t|s} x_s, sigma2_{t|s} I) for s < t (VDM eq. 3), float64 [B] each.

        alpha_{t|s} = alpha_t / alpha_s, sigma2_{t|s} = sigma_t^2 - alpha_{t|s}^2 sigma_s^2.
        For vp with s = t - 1 this is (sqrt(1 - beta_t), beta_t); for ve it is (1, sigma_t^2 - sigma_s^2).
        """
        s64, t64 = s.double(), t.double()
        alpha_ts = (self.log_alpha64(t64) - self.log_alpha64(s64)).exp()
        sigma2_ts = (2 * self.log_sigma64(t64)).exp() - alpha_ts**2 * (2 * self.log_sigma64(s64)).exp()
        return alpha_ts, sigma2_ts.clamp(min=0)

    def posterior(self, x_t: Tensor, x0: Tensor, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """q(x_s | x_t, x0) = N(mean, var I) for s < t (Ho et al. 2020 eqs. 6-7; VDM eq. 4).

        mean = alpha_{t|s} sigma_s^2 / sigma_t^2 x_t + alpha_s sigma2_{t|s} / sigma_t^2 x0,
        var = sigma2_{t|s} sigma_s^2 / sigma_t^2 (beta-tilde for vp with s = t - 1). var: float32 [B].
        """
        coef_xt, coef_x0, var = (c.to(x_t.device, torch.float32) for c in self.posterior_coefficients(s, t))
        return expand(coef_xt, x_t) * x_t + expand(coef_x0, x0) * x0, var

    def posterior_coefficients(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_t, c_0, var) of q(x_s | x_t, x0) = N(c_t x_t + c_0 x0, var I), float64 [B] each."""
        alpha_ts, sigma2_ts = self.transition(s, t)
        s64, t64 = s.double(), t.double()
        sigma2_s, sigma2_t = (2 * self.log_sigma64(s64)).exp(), (2 * self.log_sigma64(t64)).exp()
        return (alpha_ts * sigma2_s / sigma2_t, self.log_alpha64(s64).exp() * sigma2_ts / sigma2_t,
                sigma2_ts * sigma2_s / sigma2_t)

    def posterior_variance(self, s: Tensor, t: Tensor) -> Tensor:
        """The variance of q(x_s | x_t, x0), sigma2_{t|s} sigma_s^2 / sigma_t^2 (float64 [B])."""
        _, sigma2_ts = self.transition(s, t)
        return sigma2_ts * (2 * (self.log_sigma64(s.double()) - self.log_sigma64(t.double()))).exp()

    def prior_sample(self, shape: tuple[int, ...], generator: torch.Generator, device) -> Tensor:
        """A draw from the prior at t = 1: N(0, sigma(1)^2 I) (N(0, I) for vp, N(0, sigma_max^2 I) for ve)."""
        sigma = self.sigma(torch.ones(1))
        return (sigma.item() if sigma.numel() == 1 else sigma.to(device)) * self.noise(shape, generator, device)

    # --- the SDE (Song et al. 2021, eq. 5; Kingma et al. 2021, appendix A.1) ----------------
    def sde(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(f(t), g(t)^2) of dx = f(t) x dt + g(t) dw whose marginals are this path:
        f = d log alpha / dt, g^2 = d sigma^2 / dt - 2 f sigma^2 = -sigma^2 d lambda / dt. float32 [B]."""
        keep_graph = self.learned and torch.is_grad_enabled()  # a learned schedule trains through g^2
        with torch.enable_grad():
            t64 = t.detach().double().requires_grad_(True)
            log_alpha, log_sigma = self.log_alpha64(t64), self.log_sigma64(t64)
            dlog_alpha, dlog_sigma = (_derivative(value, t64, keep_graph) for value in (log_alpha, log_sigma))
        if not keep_graph:
            log_sigma = log_sigma.detach()
        g2 = 2 * (2 * log_sigma).exp() * (dlog_sigma - dlog_alpha)
        return dlog_alpha.to(torch.float32), g2.to(torch.float32)

    def network_time(self, t: Tensor) -> Tensor:
        """The time the network is conditioned on: t itself, except for a learned schedule."""
        return t

    # --- times --------------------------------------------------------------------------------
    def sample_times(self, batch: int, generator: torch.Generator, device) -> Tensor:
        """Training times: i/T with i uniform on {1, ..., T} (Ho et al. 2020, Algorithm 1), or
        t uniform on [t_min, 1] in continuous time (Song et al. 2021, eq. 7)."""
        if self.T is not None:
            i = torch.randint(1, self.T + 1, (batch,), generator=generator, device=device)
            return i.float() / self.T
        u = torch.rand(batch, generator=generator, device=device)
        return self.t_min + (1 - self.t_min) * u

    def time_of_log_snr(self, log_snr: Tensor, iterations: int = 60) -> Tensor:
        """The t in [t_min, 1] with lambda(t) = log_snr (lambda decreases in t), by bisection; clamped
        to the ends. float64 in, float32 out."""
        low = torch.full_like(log_snr, self.t_min, dtype=torch.float64)
        high = torch.ones_like(low)
        target = log_snr.double()
        for _ in range(iterations):
            mid = (low + high) / 2
            above = 2 * (self.log_alpha64(mid) - self.log_sigma64(mid)) > target
            low, high = torch.where(above, mid, low), torch.where(above, high, mid)
        return ((low + high) / 2).to(torch.float32)


class DiscreteProcess(GaussianProcess):
    """A Gaussian path known on the grid t_i = i / T, i = 0..T (float64 tables of length T + 1 with
    alphas[0] = 1, sigmas[0] = 0); between grid points log alpha and log sigma are linear in t."""

    def __init__(self, name: str, alphas: Tensor, sigmas: Tensor):
        if alphas.shape != sigmas.shape or len(alphas) < 2:
            raise ValueError("alphas and sigmas must be tensors of equal shape [T + 1, ...], T >= 1")
        self.name = name
        self.alphas = alphas.to(torch.float64)
        self.sigmas = sigmas.to(torch.float64)
        self.T = len(alphas) - 1
        self.t_min = 1.0 / self.T

    def _interpolate(self, table: Tensor, t: Tensor) -> Tensor:
        log_table = table.log().to(t.device)
        position = t * self.T
        position = position - (position - position.clamp(0, self.T)).detach()  # clamped, d/dt = T
        # float32 grid times i/T are not exact: snap them so grid values are the table's own (the
        # detached shift keeps d position / dt = T for the SDE coefficients)
        nearest = position.round()
        position = position + torch.where((position - nearest).abs() < 1e-4, nearest - position, 0.0).detach()
        # segment [i-1, i] for t in (t_{i-1}, t_i]: at a grid time, the step that leads to it; but
        # never the segment from t_0 (where log sigma = -inf) once t >= t_1
        lower = (position.ceil() - 1).clamp(min=0)
        lower = torch.where(position >= 1, lower.clamp(min=1), lower).clamp(max=self.T - 1)
        weight = position - lower
        left, right = log_table[lower.long()], log_table[lower.long() + 1]
        weight = weight.reshape(weight.shape + (1,) * (log_table.dim() - 1))  # per-dimension tables (blur)
        # log sigma_0 = -inf: sigma stays 0 on (0, t_1) and the blend must not produce inf * 0
        infinite = torch.isinf(left)
        blend = (1 - weight) * torch.where(infinite, 0.0, left) + weight * right
        return torch.where(infinite & (weight < 1), left, blend)

    def log_alpha64(self, t: Tensor) -> Tensor:
        return self._interpolate(self.alphas, t)

    def log_sigma64(self, t: Tensor) -> Tensor:
        return self._interpolate(self.sigmas, t)

    def index(self, t: Tensor) -> Tensor:
        """Step indices i = round(t * T) of grid times t (float [B] -> int64 [B])."""
        return torch.round(t.double() * self.T).long()

    def times(self, indices: Tensor) -> Tensor:
        """Grid times t_i = i / T (int [B] -> float32 [B])."""
        return indices.float() / self.T


class ContinuousProcess(GaussianProcess):
    """A Gaussian path given by closed forms of log alpha(t) and log sigma(t) (float64, differentiable)."""

    def __init__(self, name: str, log_alpha: Callable[[Tensor], Tensor], log_sigma: Callable[[Tensor], Tensor],
                 t_min: float):
        self.name, self.T, self.t_min = name, None, t_min
        self._log_alpha, self._log_sigma = log_alpha, log_sigma

    def log_alpha64(self, t: Tensor) -> Tensor:
        return self._log_alpha(t)

    def log_sigma64(self, t: Tensor) -> Tensor:
        return self._log_sigma(t)


class MonotoneLogSNR(torch.nn.Module):
    """The learned noise schedule of VDM (Kingma et al. 2021, sec. 5.1 and appendix H): the log-SNR
    lambda(t) = -gamma(t) with gamma monotone increasing and fixed end points,

        gamma~(t) = l1(t) + l3(sigmoid(l2(l1(t)))),   l1: 1 -> 1, l2: 1 -> hidden, l3: hidden -> 1,
        gamma(t) = gamma_0 + (gamma_1 - gamma_0) (gamma~(t) - gamma~(0)) / (gamma~(1) - gamma~(0)),

    every weight kept positive (softplus of a free parameter), so gamma~ is increasing in t; gamma_0 =
    -``log_snr_max`` and gamma_1 = -``log_snr_min`` (VDM: -13.3 and 5). At initialisation l3 is small and
    gamma is close to linear in t. Parameters and arithmetic are float64.
    """

    def __init__(self, log_snr_max: float, log_snr_min: float, hidden: int = 1024):
        super().__init__()
        self.gamma_0, self.gamma_1 = -float(log_snr_max), -float(log_snr_min)
        g = torch.Generator().manual_seed(0)  # the initial schedule does not depend on the trial seed
        self.w1 = torch.nn.Parameter(torch.full((1,), math.log(math.expm1(1.0)), dtype=torch.float64))  # softplus -> 1
        self.b1 = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(torch.randn(hidden, generator=g, dtype=torch.float64))
        self.b2 = torch.nn.Parameter(torch.randn(hidden, generator=g, dtype=torch.float64))
        self.w3 = torch.nn.Parameter(torch.full((hidden,), -8.0, dtype=torch.float64))  # softplus -> 3e-4

    def _raw(self, t: Tensor) -> Tensor:
        softplus = torch.nn.functional.softplus
        h = softplus(self.w1) * t + self.b1
        return h + torch.sigmoid(h[..., None] * softplus(self.w2) + self.b2) @ softplus(self.w3)

    def gamma(self, t: Tensor) -> Tensor:
        """gamma(t) = -lambda(t), float64 in and out (on t's device)."""
        device = t.device
        t = t.to(self.w1.device, torch.float64)
        ends = self._raw(torch.tensor([0.0, 1.0], dtype=torch.float64, device=t.device))
        unit = (self._raw(t) - ends[0]) / (ends[1] - ends[0])
        return (self.gamma_0 + (self.gamma_1 - self.gamma_0) * unit).to(device)

    def forward(self, t: Tensor) -> Tensor:
        return -self.gamma(t)


class LearnedProcess(DiscreteProcess):
    """The variance-preserving path of a learned log-SNR (``process.schedule: learned``, vp only):
    alpha^2 = sigmoid(lambda(t)), sigma^2 = sigmoid(-lambda(t)) (VDM eq. 2-3 with gamma = -lambda).

    With an integer T it is a discrete process on the grid i / T (t_0 = 0 is the data: alpha = 1,
    sigma = 0; its tables are recomputed from the schedule on every use, so the discrete bound
    differentiates through them); with T = None it is continuous on [t_min, 1]. The network is
    conditioned on the normalized gamma(t) in [0, 1] instead of t, as in VDM, so that the shape of
    the schedule does not change what the network sees at a given noise level."""

    learned = True

    def __init__(self, schedule: MonotoneLogSNR, T: int | None, t_min: float):
        self.name, self.schedule, self.T = "vp", schedule, T
        self.t_min = 1.0 / T if T is not None else t_min

    def _log_snr64(self, t: Tensor) -> Tensor:
        return self.schedule(t.double())

    def log_alpha64(self, t: Tensor) -> Tensor:
        value = 0.5 * torch.nn.functional.logsigmoid(self._log_snr64(t))
        return torch.where(t <= 0, 0.0, value) if self.T is not None else value

    def log_sigma64(self, t: Tensor) -> Tensor:
        value = 0.5 * torch.nn.functional.logsigmoid(-self._log_snr64(t))
        return torch.where(t <= 0, -math.inf, value) if self.T is not None else value

    def network_time(self, t: Tensor) -> Tensor:
        unit = (self.schedule.gamma(t) - self.schedule.gamma_0) / (self.schedule.gamma_1 - self.schedule.gamma_0)
        return unit.to(torch.float32)

    @property
    def alphas(self) -> Tensor:
        if self.T is None:
            raise AttributeError("a continuous process has no tables")
        return self.log_alpha64(torch.arange(self.T + 1, dtype=torch.float64) / self.T).exp()

    @property
    def sigmas(self) -> Tensor:
        if self.T is None:
            raise AttributeError("a continuous process has no tables")
        return self.log_sigma64(torch.arange(self.T + 1, dtype=torch.float64) / self.T).exp()

    def parameters(self):
        return self.schedule.parameters()


def _derivative(value: Tensor, t: Tensor, create_graph: bool = False) -> Tensor:
    """d value / d t elementwise (zero where value does not depend on t, as ve's log alpha = 0);
    ``create_graph`` keeps it differentiable (for a learned schedule)."""
    if not value.requires_grad:
        return torch.zeros_like(t)
    (grad,) = torch.autograd.grad(value.sum(), t, retain_graph=True, allow_unused=True, create_graph=create_graph)
    return torch.zeros_like(t) if grad is None else grad


def expand(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-example tensor [B] to broadcast against ``like`` [B, ...]; a per-dimension one (as
    ``like``'s shape, or broadcasting to it: a per-dimension process) is returned as it is."""
    if v.dim() == like.dim():
        return v
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))
