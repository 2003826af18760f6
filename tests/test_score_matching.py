"""Noise-free score matching on a 2-D Gaussian N(mu, C), whose score -C^{-1} (x - mu) is known.

Reference values used below, for p = N(mu, C) with precision P = C^{-1}:
- for a linear score model s(x) = A x + b, the implicit loss is tr(A) + 1/2 ||A x + b||^2 per
  example, with expectation J(A, b) = tr(A) + 1/2 tr(A C A^T) + 1/2 ||A mu + b||^2, a quadratic in
  (A, b) minimised by the exact score A* = -P, b* = P mu, with J* = -tr(P) / 2 and excess
  J(A* + dA, b* + db) - J* = 1/2 tr(dA C dA^T) + 1/2 ||dA mu + db||^2;
- on N samples with mean m and covariance S (1/N normalisation), the empirical loss is the same
  quadratic with (m, S) in place of (mu, C), minimised by (-S^{-1}, S^{-1} m): the best any
  training can do from those samples;
- unadjusted Langevin with step h on this score is linear, x <- M x + h/2 P mu + sqrt(h) z with
  M = I - h P / 2, so the law of every chain after n steps is a Gaussian computable exactly.
"""
import math

import pytest
import torch
from torch import nn

from diffusion.errors import ConfigError
from diffusion.nets import MLP
from diffusion.score_matching import (
    OBJECTIVES,
    PROJECTIONS,
    FixedTimeScore,
    fit_score,
    implicit_score_matching_loss,
    jacobian_trace,
    langevin,
    sliced_score_matching_loss,
)

torch.set_num_threads(1)

MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)  # eigenvalues 0.29 and 1.51
PRECISION = torch.linalg.inv(COV)
CHOLESKY = torch.linalg.cholesky(COV)
A_EXACT, B_EXACT = -PRECISION, PRECISION @ MU


def exact_score(x: torch.Tensor) -> torch.Tensor:
    """grad log N(x; mu, C) = -P (x - mu), x [B, 2]."""
    return (MU - x) @ PRECISION  # P is symmetric


def gaussian_samples(n: int, seed: int) -> torch.Tensor:
    """n i.i.d. draws of N(mu, C), float64 [n, 2]."""
    g = torch.Generator().manual_seed(seed)
    return MU + torch.randn(n, 2, generator=g, dtype=torch.float64) @ CHOLESKY.T


def moment_matched_samples(n: int, seed: int) -> torch.Tensor:
    """n points whose empirical mean is exactly mu and empirical covariance (1/n) exactly C."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    whitener = torch.linalg.cholesky(z.T @ z / n)
    z = torch.linalg.solve_triangular(whitener, z.T, upper=False).T  # now z^T z / n = I
    return MU + z @ CHOLESKY.T


class LinearScore(nn.Module):
    """s(x) = A x + b, x [B, D] -> [B, D]."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(A.clone().double())
        self.b = nn.Parameter(b.clone().double())

    def forward(self, x):
        return x @ self.A.T + self.b


def expected_implicit_loss(A, b, mean=MU, cov=COV):
    """J(A, b) = tr(A) + 1/2 tr(A C A^T) + 1/2 ||A mu + b||^2."""
    return torch.trace(A) + 0.5 * torch.trace(A @ cov @ A.T) + 0.5 * (A @ mean + b).pow(2).sum()


def random_mlp(dim: int, seed: int) -> FixedTimeScore:
    """The project's MLP at t = 0 in float64, with its zero-initialised output layer randomised
    (otherwise its score and Jacobian are identically 0)."""
    torch.manual_seed(seed)
    net = MLP(dim, hidden=16, depth=2).double()
    nn.init.normal_(net.output.weight, std=0.5)
    nn.init.normal_(net.output.bias, std=0.5)
    return FixedTimeScore(net)


def relative_error(estimate, truth) -> float:
    return ((estimate - truth).norm() / truth.norm()).item()


# --------------------------------------------------------------------------------------------
# The implicit loss against its closed form
# --------------------------------------------------------------------------------------------

A_OFF = torch.tensor([[-0.7, 0.4], [-0.2, -1.3]], dtype=torch.float64)  # a non-optimal, non-symmetric A
B_OFF = torch.tensor([0.3, 0.8], dtype=torch.float64)


def test_implicit_loss_per_example_is_trace_plus_half_squared_norm():
    model = LinearScore(A_OFF, B_OFF)
    x = gaussian_samples(64, seed=1)
    loss = implicit_score_matching_loss(model, x)
    assert loss.shape == (64,)
    expected = torch.trace(A_OFF) + 0.5 * (x @ A_OFF.T + B_OFF).pow(2).sum(1)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_implicit_loss_monte_carlo_mean_matches_gaussian_expectation():
    model = LinearScore(A_OFF, B_OFF)
    expected = expected_implicit_loss(A_OFF, B_OFF).item()

    # i.i.d. samples: the mean of N per-example losses is within a few standard errors of J(A, b).
    loss = implicit_score_matching_loss(model, gaussian_samples(20_000, seed=2)).detach()
    standard_error = loss.std().item() / math.sqrt(loss.numel())
    assert abs(loss.mean().item() - expected) < 5 * standard_error

    # The loss is quadratic in x, so on points with exactly the moments (mu, C) its mean is J(A, b)
    # up to rounding: no Monte Carlo error left.
    loss = implicit_score_matching_loss(model, moment_matched_samples(1000, seed=3)).detach()
    assert loss.mean().item() == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_exact_score_minimises_the_implicit_loss():
    x = moment_matched_samples(1000, seed=4)  # empirical loss == closed form J, so its minimiser is exact
    exact_model = LinearScore(A_EXACT, B_EXACT)
    best = implicit_score_matching_loss(exact_model, x).mean()
    assert best.item() == pytest.approx(-0.5 * torch.trace(PRECISION).item(), rel=1e-10)

    # Stationary: the gradient of the loss (through the create_graph Jacobian) vanishes at the exact score.
    best.backward()
    assert exact_model.A.grad.abs().max() < 1e-9 and exact_model.b.grad.abs().max() < 1e-9

    # Minimum: every small perturbation increases the loss, by exactly the quadratic excess.
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        dA = 0.05 * torch.randn(2, 2, generator=g, dtype=torch.float64)
        db = 0.05 * torch.randn(2, generator=g, dtype=torch.float64)
        perturbed = implicit_score_matching_loss(LinearScore(A_EXACT + dA, B_EXACT + db), x).mean().item()
        excess = 0.5 * torch.trace(dA @ COV @ dA.T) + 0.5 * (dA @ MU + db).pow(2).sum()
        assert perturbed > best.item()
        assert perturbed - best.item() == pytest.approx(excess.item(), rel=1e-6)


# --------------------------------------------------------------------------------------------
# Jacobian trace and the sliced estimator on a nonlinear network
# --------------------------------------------------------------------------------------------


def test_exact_jacobian_trace_matches_autograd_functional_jacobian():
    dim, batch = 3, 5
    score_fn = random_mlp(dim, seed=0)
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    jac = torch.autograd.functional.jacobian(score_fn, x, create_graph=True)  # [B, D, B, D]
    blocks = torch.stack([jac[b, :, b, :] for b in range(batch)])  # per-example Jacobians [B, D, D]
    assert jac.abs().sum() - blocks.abs().sum() < 1e-12  # examples do not interact
    reference = blocks.diagonal(dim1=1, dim2=2).sum(-1)  # [B]

    trace = jacobian_trace(score_fn, x)
    torch.testing.assert_close(trace, reference, rtol=1e-10, atol=1e-12)
    assert reference.abs().min() > 1e-3  # a non-trivial network

    # create_graph=True: the trace's gradient with respect to the parameters is right too.
    params = list(score_fn.parameters())
    ours = torch.autograd.grad(trace.sum(), params, allow_unused=True)
    theirs = torch.autograd.grad(reference.sum(), params, allow_unused=True)
    for g_ours, g_theirs in zip(ours, theirs):
        if g_theirs is None:
            assert g_ours is None or g_ours.abs().max() == 0
        else:
            torch.testing.assert_close(g_ours, g_theirs, rtol=1e-9, atol=1e-12)

    # The implicit loss is that trace plus 1/2 ||s||^2, and works under no_grad.
    with torch.no_grad():
        loss = implicit_score_matching_loss(score_fn, x)
    torch.testing.assert_close(loss, reference.detach() + 0.5 * score_fn(x).detach().pow(2).sum(1))


def test_score_independent_of_x_has_zero_trace():
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bias = nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))
    for score_fn in (lambda x: torch.ones_like(x), lambda x: bias.expand_as(x)):  # no graph; graph without x
        torch.testing.assert_close(jacobian_trace(score_fn, x), torch.zeros(5, dtype=torch.float64))
        expected = 0.5 * score_fn(x).detach().pow(2).sum(1)
        torch.testing.assert_close(implicit_score_matching_loss(score_fn, x).detach(), expected)
        torch.testing.assert_close(sliced_score_matching_loss(score_fn, x).detach(), expected)


@pytest.mark.parametrize("variance_reduction", [True, False])
def test_sliced_loss_in_one_dimension_with_rademacher_projections_is_exact(variance_reduction):
    # v = +-1: v J v = J and (v s)^2 = s^2, so a single projection gives the implicit loss exactly.
    score_fn = random_mlp(1, seed=1)
    x = torch.randn(7, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sliced = sliced_score_matching_loss(
        score_fn, x, generator=torch.Generator().manual_seed(2), distribution="rademacher",
        variance_reduction=variance_reduction,
    )
    torch.testing.assert_close(sliced, implicit_score_matching_loss(score_fn, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("variance_reduction", [True, False])
def test_sliced_loss_averages_to_implicit_loss(distribution, variance_reduction):
    dim, batch, repeats, per_repeat = 3, 6, 50, 40
    mlp = random_mlp(dim, seed=2)

    def score_fn(x):  # nonlinear, with a restoring drift -x as a real score has: tr J is about -3
        return mlp(x) - x

    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    implicit = implicit_score_matching_loss(score_fn, x).detach()

    g = torch.Generator().manual_seed(4)
    estimates = torch.stack([  # [repeats, B]: independent averages of per_repeat projections each
        sliced_score_matching_loss(score_fn, x, n_projections=per_repeat, generator=g, distribution=distribution,
                                   variance_reduction=variance_reduction, create_graph=False).detach()
        for _ in range(repeats)
    ])
    assert estimates.shape == (repeats, batch)
    mean = estimates.mean(0)
    standard_error = estimates.std(0) / math.sqrt(repeats)  # of the mean of repeats * per_repeat projections
    assert (standard_error > 0).all()
    assert ((mean - implicit).abs() < 5 * standard_error).all()
    # Sharp enough to catch any bug that changes the trace term by half or more.
    trace = jacobian_trace(score_fn, x).detach()
    assert (5 * standard_error < 0.5 * trace.abs()).all()


# --------------------------------------------------------------------------------------------
# Training recovers the score
# --------------------------------------------------------------------------------------------

TRAIN_N = 8000


def sampling_error_quantile(n: int, quantile: float = 0.999, datasets: int = 500) -> tuple[float, float]:
    """The `quantile` of the relative errors (of A, of b) of the exact empirical minimiser
    (-S^{-1}, S^{-1} m) over `datasets` simulated data sets of n points: the error that sample size
    alone allows (about 1.5 / sqrt(n) on average here)."""
    g = torch.Generator().manual_seed(99)
    x = MU + torch.randn(datasets, n, 2, generator=g, dtype=torch.float64) @ CHOLESKY.T
    mean = x.mean(1)
    centred = x - mean[:, None]
    precision = torch.linalg.inv(centred.transpose(1, 2) @ centred / n)
    error_A = (precision - PRECISION).flatten(1).norm(dim=1) / PRECISION.norm()
    error_b = ((precision @ mean[..., None])[..., 0] - B_EXACT).norm(dim=1) / B_EXACT.norm()
    return error_A.quantile(quantile).item(), error_b.quantile(quantile).item()


@pytest.mark.parametrize("objective", ["implicit", "sliced"])
def test_training_a_linear_model_recovers_the_gaussian_score(objective):
    data = gaussian_samples(TRAIN_N, seed=10)
    model = LinearScore(torch.zeros(2, 2), torch.zeros(2))
    losses = fit_score(model, data, objective, steps=400, lr=0.05, batch_size=None,
                       generator=torch.Generator().manual_seed(11))
    A, b = model.A.detach(), model.b.detach()

    # Optimisation: training reaches the minimiser of the empirical loss on these samples.
    mean = data.mean(0)
    empirical_precision = torch.linalg.inv(torch.cov(data.T, correction=0))
    optimisation_slack = 0.01
    assert relative_error(A, -empirical_precision) < optimisation_slack
    assert relative_error(b, empirical_precision @ mean) < optimisation_slack
    assert losses[-1] < losses[0]

    # Statistics: that minimiser is off the truth only by sampling error; the tolerance is the 99.9 %
    # quantile of that error at this sample size plus the optimisation slack (< 0.1 by construction).
    quantile_A, quantile_b = sampling_error_quantile(TRAIN_N)
    tolerance = max(quantile_A, quantile_b) + optimisation_slack
    assert tolerance < 0.1
    assert relative_error(A, A_EXACT) < tolerance
    assert relative_error(b, B_EXACT) < tolerance


@pytest.mark.parametrize("objective", ["implicit", "sliced"])
def test_training_a_small_mlp_learns_the_gaussian_score(objective):
    torch.manual_seed(20)
    model = FixedTimeScore(MLP(2, hidden=32, depth=2))  # float32, as trained in the project
    data = gaussian_samples(20_000, seed=21).float()
    fit_score(model, data, objective, steps=500, lr=5e-3, batch_size=256, generator=torch.Generator().manual_seed(22))

    held_out = gaussian_samples(5000, seed=23)
    truth = exact_score(held_out)
    with torch.no_grad():
        learned = model(held_out.float()).double()
    mse = (learned - truth).pow(2).sum(1).mean().item()
    mse_of_zero = truth.pow(2).sum(1).mean().item()  # E||P (x - mu)||^2 = tr(P) = 4.09
    # A flexible model and a loose bound: 20x better than predicting nothing (typically ~300x).
    assert mse < 0.05 * mse_of_zero


# --------------------------------------------------------------------------------------------
# Langevin dynamics
# --------------------------------------------------------------------------------------------


def test_langevin_with_exact_score_reproduces_mean_and_covariance():
    chains, n_steps, step = 20_000, 2000, 0.01
    g = torch.Generator().manual_seed(30)
    x_init = torch.randn(chains, 2, generator=g, dtype=torch.float64)  # N(0, I), far from N(mu, C)
    x, nfe = langevin(exact_score, x_init, n_steps, step, generator=g)
    assert nfe == n_steps and x.shape == x_init.shape
    assert not torch.equal(x_init, x)

    # The exact law of a chain after n_steps: N(mean_n, cov_n) by the linear recursion.
    contraction = torch.eye(2, dtype=torch.float64) - 0.5 * step * PRECISION
    mean_n, cov_n = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    for _ in range(n_steps):
        mean_n = contraction @ mean_n + 0.5 * step * PRECISION @ MU
        cov_n = contraction @ cov_n @ contraction.T + step * torch.eye(2, dtype=torch.float64)

    # That law is close to N(mu, C): the transient has died out (contraction^n_steps ~ 1e-3) and the
    # step-size bias is small: the variance lam along each eigenvector of C becomes
    # lam / (1 - h / (4 lam)), at most 0.9 % larger here (0.3 % on the entries of C).
    assert (mean_n - MU).abs().max() < 2e-3
    assert ((cov_n - COV).abs() / COV.abs()).max() < 0.01

    # Sample moments of the independent chains: within 5 standard errors of the exact law,
    # hence within (bias + 5 standard errors) of (mu, C).
    sample_mean, sample_cov = x.mean(0), torch.cov(x.T)
    mean_se = (cov_n.diagonal() / chains).sqrt()
    cov_se = ((cov_n.diagonal()[:, None] * cov_n.diagonal()[None, :] + cov_n**2) / chains).sqrt()
    assert ((sample_mean - mean_n).abs() < 5 * mean_se).all()
    assert ((sample_cov - cov_n).abs() < 5 * cov_se).all()
    assert ((sample_mean - MU).abs() < (mean_n - MU).abs() + 5 * mean_se).all()
    assert ((sample_cov - COV).abs() < (cov_n - COV).abs() + 5 * cov_se).all()


def test_langevin_is_reproducible_and_counts_evaluations():
    calls = []

    def counted_score(x):
        calls.append(1)
        return exact_score(x)

    x_init = torch.zeros(4, 2, dtype=torch.float64)
    a, nfe = langevin(counted_score, x_init, 7, 0.1, generator=torch.Generator().manual_seed(0))
    b, _ = langevin(exact_score, x_init, 7, 0.1, generator=torch.Generator().manual_seed(0))
    assert nfe == 7 == len(calls)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert x_init.abs().max() == 0  # x_init is not modified in place


# --------------------------------------------------------------------------------------------
# Registry and errors
# --------------------------------------------------------------------------------------------


def test_objectives_registry_and_errors():
    assert OBJECTIVES.get("implicit") is implicit_score_matching_loss
    assert OBJECTIVES.get("sliced") is sliced_score_matching_loss
    with pytest.raises(ConfigError) as info:
        OBJECTIVES.get("exact")
    message = str(info.value)
    assert "loss.objective" in message and "implicit" in message and "sliced" in message

    model = LinearScore(A_EXACT, B_EXACT)
    with pytest.raises(ConfigError, match="loss.objective.*implicit.*sliced"):
        fit_score(model, gaussian_samples(8, seed=0), "exact", steps=1)
    x = gaussian_samples(4, seed=0)
    assert PROJECTIONS.names() == ["gaussian", "rademacher"]
    with pytest.raises(ConfigError, match="gaussian, rademacher"):
        sliced_score_matching_loss(model, x, distribution="uniform")
    with pytest.raises(ConfigError, match="n_projections"):
        sliced_score_matching_loss(model, x, n_projections=0)
