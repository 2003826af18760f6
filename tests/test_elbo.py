"""The discrete-time ELBO against closed forms and second computations.

- Gaussian KL: by hand in 1-D and torch.distributions.
- Transition terms: torch.distributions.Normal built from ``process.posterior``.
- The whole bound on Gaussian data with its exact denoiser: every term's expectation is a closed
  form (expectations of quadratics of Gaussians), written here from the papers' own formulas
  (Ho et al. eq. 7 for vp, Gaussian conditioning for ve), not from ``diffusion.elbo``.
- The discretized decoder: normalization over all levels, its sharp and wide limits, naive and
  50-digit (mpmath) evaluations of the CDF differences, finite gradients.
- The training estimate: its exact bookkeeping and its mean against the full bound.
"""
import math
from types import SimpleNamespace

import mpmath
import pytest
import torch

from diffusion.analytic import GaussianData
from diffusion.config import ProcessConfig
from diffusion.denoiser import Denoiser
from diffusion.elbo import (
    bits_per_dim,
    decoder_term,
    discretized_gaussian_nll,
    elbo_loss_estimate,
    elbo_term,
    elbo_terms,
    gaussian_kl,
    gaussian_nll,
    prior_term,
    reverse_variance,
    transition_term,
)
from diffusion.errors import ConfigError
from diffusion.factory import build_process

torch.set_num_threads(1)


def vp(T: int) -> ProcessConfig:
    return ProcessConfig(name="vp", schedule="linear", T=T, beta_start=1e-4, beta_end=0.02, max_beta=0.999)


def ve(T: int, sigma_min: float = 0.01) -> ProcessConfig:
    return ProcessConfig(name="ve", schedule="geometric", T=T, sigma_min=sigma_min, sigma_max=10.0)


def arbitrary_denoiser(process) -> Denoiser:
    """A deliberately poor eps prediction that works on any shape, so that KLs are far from 0."""
    return Denoiser(lambda x_t, t: 0.5 * torch.tanh(x_t) + 0.3 * t.view(-1, *[1] * (x_t.dim() - 1)), process)


def mean_and_se(x: torch.Tensor) -> tuple[float, float]:
    return x.mean().item(), (x.std() / math.sqrt(x.numel())).item()


# --------------------------------------------------------------------------------------------
# Gaussian pieces
# --------------------------------------------------------------------------------------------


def test_gaussian_kl_by_hand():
    one, zero = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    # KL(N(1, 4) || N(0, 1)) = 1/2 (log 1/4 + 4 + 1 - 1) = 2 - ln 2
    assert gaussian_kl(one, torch.tensor(4.0), zero, torch.tensor(1.0)).item() == pytest.approx(2 - math.log(2))
    # KL(N(0, 1) || N(1, 4)) = 1/2 (log 4 + 1/4 + 1/4 - 1) = ln 2 - 1/4
    assert gaussian_kl(zero, torch.tensor(1.0), one, torch.tensor(4.0)).item() == pytest.approx(math.log(2) - 0.25)
    assert gaussian_kl(one, torch.tensor(0.3), one, torch.tensor(0.3)).item() == 0.0


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean_q = torch.randn(50, 5, generator=g, dtype=torch.float64)
    mean_p = torch.randn(50, 5, generator=g, dtype=torch.float64)
    var_q = torch.rand(50, 5, generator=g, dtype=torch.float64) + 0.01
    var_p = torch.rand(5, generator=g, dtype=torch.float64) + 0.01  # broadcast over the batch
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean_q, var_q.sqrt()), torch.distributions.Normal(mean_p, var_p.sqrt())
    )
    assert torch.allclose(gaussian_kl(mean_q, var_q, mean_p, var_p), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Transition and prior terms against torch.distributions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [vp(50), ve(20)], ids=["vp", "ve"])
@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_transition_term_matches_normal_kl(cfg, variance):
    process = build_process(cfg)
    denoiser = arbitrary_denoiser(process)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(12, 1, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    i = torch.cat([torch.tensor([2, process.T]), torch.randint(2, process.T + 1, (10,), generator=g)])
    s, t = process.times(i - 1), process.times(i)

    x_t = process.marginal(x0, t, eps)
    x0_hat = denoiser.x0(x_t, t)
    mean_q, var_q = process.posterior(x_t.double(), x0.double(), s, t)
    mean_p, beta_tilde = process.posterior(x_t.double(), x0_hat.double(), s, t)
    var_p = beta_tilde if variance == "beta_tilde" else process.transition(s, t)[1]
    view = (-1, 1, 1, 1)
    q = torch.distributions.Normal(mean_q, var_q.double().sqrt().view(view))
    p = torch.distributions.Normal(mean_p, var_p.double().sqrt().view(view))
    expected = torch.distributions.kl_divergence(q, p).sum((1, 2, 3))

    got = transition_term(denoiser, x0, t, eps, variance)
    assert got.shape == (12,) and got.dtype == torch.float64
    assert torch.allclose(got, expected, rtol=1e-5)
    assert (got > 0.01).all()


def test_transition_term_checks_its_arguments():
    process = build_process(vp(10))
    denoiser, x0 = arbitrary_denoiser(process), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="i >= 2"):
        transition_term(denoiser, x0, process.times(torch.tensor([1, 2, 3])), torch.zeros(3, 2))
    with pytest.raises(ConfigError, match="beta_tilde"):
        transition_term(denoiser, x0, process.times(torch.tensor([2, 2, 3])), torch.zeros(3, 2), "large")
    with pytest.raises(ConfigError):
        reverse_variance(process, process.times(torch.tensor([1])), process.times(torch.tensor([2])), "small")


def test_reverse_variances_vp_closed_form():
    """beta and beta_tilde of Ho et al. sec. 3.2 / eq. 7, written with the betas."""
    process = build_process(vp(100))
    alphabar = process.alphas**2
    betas = 1 - alphabar[1:] / alphabar[:-1]
    i = torch.arange(2, 101)
    s, t = process.times(i - 1), process.times(i)
    assert torch.allclose(reverse_variance(process, s, t, "beta"), betas[1:], rtol=1e-9)
    beta_tilde = (1 - alphabar[i - 1]) / (1 - alphabar[i]) * betas[i - 1]
    assert torch.allclose(reverse_variance(process, s, t, "beta_tilde"), beta_tilde, rtol=1e-9)


@pytest.mark.parametrize("cfg", [vp(20), ve(20)], ids=["vp", "ve"])
def test_prior_term_matches_normal_kl(cfg):
    process = build_process(cfg)
    x0 = torch.rand(5, 3, 2, generator=torch.Generator().manual_seed(2)) * 2 - 1
    alpha_T, sigma_T = process.alphas[-1].item(), process.sigmas[-1].item()
    q = torch.distributions.Normal(alpha_T * x0.double(), sigma_T)
    p = torch.distributions.Normal(torch.zeros_like(x0, dtype=torch.float64), sigma_T)
    expected = torch.distributions.kl_divergence(q, p).sum((1, 2))
    assert torch.allclose(prior_term(process, x0), expected, rtol=1e-9, atol=1e-15)


# --------------------------------------------------------------------------------------------
# The whole bound on Gaussian data: closed form vs Monte Carlo
# --------------------------------------------------------------------------------------------

DIM = 6
DATA = GaussianData.random(DIM, seed=0, min_var=0.05, max_var=1.0)


def true_nll(data: GaussianData) -> float:
    """E[-log N(x0; mu, C)] for x0 ~ N(mu, C): the entropy 1/2 (D log 2 pi + log det C + D)."""
    return 0.5 * (data.dim * math.log(2 * math.pi) + torch.logdet(data.cov).item() + data.dim)


def expected_sq_error(data: GaussianData, alpha: float, sigma: float) -> float:
    """E||x0 - x0_hat(x_t)||^2 for x_t = alpha x0 + sigma eps and the linear Bayes estimate
    x0_hat = mu + K (x_t - alpha mu), K = alpha C (alpha^2 C + sigma^2 I)^-1 (Gaussian conditioning).
    x0 - x0_hat = A x0 + B eps + c, so E||.||^2 = ||A mu + c||^2 + tr(A C A^T) + tr(B B^T)."""
    mu, cov, eye = data.mean, data.cov, torch.eye(data.dim, dtype=torch.float64)
    gain = alpha * cov @ torch.linalg.inv(alpha**2 * cov + sigma**2 * eye)
    A, B, c = eye - alpha * gain, -sigma * gain, -mu + alpha * gain @ mu
    return ((A @ mu + c).square().sum() + torch.trace(A @ cov @ A.T) + torch.trace(B @ B.T)).item()


def textbook_posterior(process, i: int) -> tuple[float, float, float]:
    """(coefficient of x0 in the mean of q(x_{i-1} | x_i, x0), its variance, the forward variance):
    vp from Ho et al. 2020 eq. 7 in betas; ve from conditioning x_{i-1} ~ N(x0, s_{i-1}^2) on
    x_i = x_{i-1} + N(0, s_i^2 - s_{i-1}^2)."""
    if process.name == "vp":
        alphabar = (process.alphas**2).tolist()
        beta = 1 - alphabar[i] / alphabar[i - 1]
        coef_x0 = math.sqrt(alphabar[i - 1]) * beta / (1 - alphabar[i])
        return coef_x0, (1 - alphabar[i - 1]) / (1 - alphabar[i]) * beta, beta
    var = (process.sigmas**2).tolist()
    step = var[i] - var[i - 1]
    return step / var[i], var[i - 1] * step / var[i], step


HEAD = 0.3  # the constant variance-head output of the learned_range cases


def expected_bound(data: GaussianData, process, variance: str) -> dict:
    """E over x0 ~ N(mu, C) and eps of every term of the bound with the exact denoiser and the
    continuous Gaussian decoder N(x0; x0_hat(x_1), sigma_1^2 / alpha_1^2 I). learned_range: a variance
    head that outputs HEAD everywhere, so var_p = beta^f beta_tilde^(1 - f), f = (HEAD + 1) / 2."""
    D, T = data.dim, process.T
    alphas, sigmas = process.alphas.tolist(), process.sigmas.tolist()
    second_moment = data.mean.square().sum().item() + torch.trace(data.cov).item()
    prior = alphas[T] ** 2 * second_moment / (2 * sigmas[T] ** 2)
    if process.name == "vp":  # beta_1 / (1 - beta_1)
        decoder_var = (1 - alphas[1] ** 2) / alphas[1] ** 2
    else:  # sigma_min^2
        decoder_var = sigmas[1] ** 2
    decoder_error = expected_sq_error(data, alphas[1], sigmas[1])
    decoder = 0.5 * D * math.log(2 * math.pi * decoder_var) + decoder_error / (2 * decoder_var)
    transitions = []
    for i in range(2, T + 1):
        coef_x0, var_q, beta = textbook_posterior(process, i)
        fraction = {"beta_tilde": 0.0, "beta": 1.0, "learned_range": (HEAD + 1) / 2}[variance]
        var_p = beta**fraction * var_q ** (1 - fraction)
        mean_part = coef_x0**2 * expected_sq_error(data, alphas[i], sigmas[i]) / (2 * var_p)
        transitions.append(mean_part + 0.5 * D * (math.log(var_p / var_q) + var_q / var_p - 1))
    return {"prior": prior, "decoder": decoder, "transitions": transitions,
            "total": prior + decoder + sum(transitions)}


def monte_carlo_bound(process, n: int, variance: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    x0 = DATA.sample(n, g).double()
    denoiser = DATA.denoiser(process)
    if variance == "learned_range":
        exact = denoiser
        denoiser = Denoiser(lambda x, t: (exact.eps(x, t), torch.full_like(x, HEAD)), process, learned_variance=True)
    with torch.no_grad():
        return elbo_terms(denoiser, x0, None, variance, generator=g)


@pytest.mark.parametrize(
    "cfg,variance",
    [(vp(10), "beta_tilde"), (vp(10), "beta"), (ve(10), "beta_tilde"), (ve(10), "beta"),
     # beta_1 = 0.3: alpha_1 is far from 1, so the decoder variance beta_1 / (1 - beta_1) differs from beta_1
     (ProcessConfig(name="vp", schedule="linear", T=10, beta_start=3e-3, beta_end=0.02), "beta"),
     (vp(10), "learned_range"), (ve(10), "learned_range"),
     (ProcessConfig(name="vp", schedule="learned", T=10, learned_hidden=16), "beta_tilde")],
    ids=["vp-beta_tilde", "vp-beta", "ve-beta_tilde", "ve-beta", "vp-large-beta1", "vp-learned_range",
         "ve-learned_range", "learned-schedule"],
)
def test_bound_matches_closed_form_on_gaussian_data(cfg, variance):
    process = build_process(cfg)
    exact = expected_bound(DATA, process, variance)
    terms = monte_carlo_bound(process, 20_000, variance, seed=3)
    assert terms["transitions"].shape == (20_000, process.T - 1)

    mean, se = mean_and_se(terms["total"])
    assert abs(mean - exact["total"]) < 3 * se, (mean, se, exact["total"])
    for name in ("prior", "decoder"):
        mean, se = mean_and_se(terms[name])
        assert abs(mean - exact[name]) < 4 * se + 1e-9, (name, mean, se, exact[name])
    for k, value in enumerate(exact["transitions"]):
        mean, se = mean_and_se(terms["transitions"][:, k])
        assert abs(mean - value) < 4 * se, (k + 2, mean, se, value)
    assert exact["total"] > true_nll(DATA)


@pytest.mark.parametrize("make", [vp, ve], ids=["vp", "ve"])
def test_bound_exceeds_true_nll_and_tightens_with_T(make):
    nll = true_nll(DATA)
    gaps = [expected_bound(DATA, build_process(make(T)), "beta_tilde")["total"] - nll for T in (10, 100, 1000)]
    assert all(gap > 0 for gap in gaps)
    assert gaps[0] > gaps[1] > gaps[2], gaps
    # The Monte Carlo bound confirms it at T = 100: above the true NLL, at the closed form, and
    # below the T = 10 closed form by many standard errors.
    mean, se = mean_and_se(monte_carlo_bound(build_process(make(100)), 4_000, "beta_tilde", seed=4)["total"])
    assert abs(mean - (nll + gaps[1])) < 3 * se
    assert mean - 3 * se > nll
    assert mean + 10 * se < nll + gaps[0]


def test_elbo_terms_bookkeeping():
    """Columns of ``transitions`` are i = 2..T with the generator's draws in order (decoder first)."""
    process = build_process(ve(6))
    denoiser = arbitrary_denoiser(process)
    x0 = torch.rand(4, 3, generator=torch.Generator().manual_seed(5)) * 2 - 1
    terms = elbo_terms(denoiser, x0, None, "beta", generator=torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(6)
    assert torch.equal(terms["decoder"], decoder_term(denoiser, x0, torch.randn(x0.shape, generator=g), None))
    for k, i in enumerate(range(2, process.T + 1)):
        t = process.times(torch.full((4,), i))
        expected = transition_term(denoiser, x0, t, torch.randn(x0.shape, generator=g), "beta")
        assert torch.equal(terms["transitions"][:, k], expected)
    total = terms["prior"] + terms["decoder"] + terms["transitions"].sum(1)
    assert torch.equal(terms["total"], total)
    assert torch.equal(terms["prior"], prior_term(process, x0))

    one_step = elbo_terms(arbitrary_denoiser(build_process(ve(1))), x0, None)
    assert one_step["transitions"].shape == (4, 0)


# --------------------------------------------------------------------------------------------
# The discretized decoder (Ho et al. 2020, sec. 3.3)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_discretized_probabilities_sum_to_one(levels):
    values = torch.linspace(-1, 1, levels, dtype=torch.float64)[:, None]  # [levels, 1]: one 1-D example per level
    for mean in (-3.0, -1.0, -0.37, 0.0, 0.52, 1.0, 40.0):
        for std in (1e-4, 0.01, 0.3, 5.0, 1e3):
            nll = discretized_gaussian_nll(values, torch.full_like(values, mean), std, levels)
            assert torch.logsumexp(-nll, 0).item() == pytest.approx(0.0, abs=1e-9), (mean, std)


def test_discretized_sharp_decoder_on_the_data_costs_nothing():
    levels = 256
    g = torch.Generator().manual_seed(7)
    x0 = torch.randint(0, levels, (8, 3, 4, 4), generator=g).double() / (levels - 1) * 2 - 1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # both end bins
    tiny = 1e-3 / (levels - 1)
    nll = discretized_gaussian_nll(x0, x0, tiny, levels)
    assert nll.shape == (8,) and (nll >= 0).all() and nll.max().item() < 1e-12
    # One bin off with the same sharp decoder: essentially impossible.
    assert (discretized_gaussian_nll(x0, (x0 + 2.0 / (levels - 1)).clamp(max=1), tiny, levels) > 100).all()

    # The same through decoder_term: an oracle eps and a ve process whose sigma_1 is 1e-6.
    process = build_process(ve(10, sigma_min=1e-6))
    oracle = Denoiser(lambda x_t, t: (x_t - x0) / process.sigma(t).double().view(-1, 1, 1, 1), process)
    nll = decoder_term(oracle, x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), levels)
    assert nll.max().item() < 1e-9


@pytest.mark.parametrize("std", [0.1, 100.0])
def test_discretized_wide_decoder_is_density_times_bin_width(std):
    """For std >> the bin width, P(x) ~ 2h N(x; mean, std^2) for interior values (h = 1 / (levels - 1)):
    -log P ~ -log N - D log(2h); with std = 100 that is about D (log(std sqrt(2 pi)) + log((levels - 1) / 2))."""
    levels, D = 256, 20
    half_width = 1.0 / (levels - 1)
    g = torch.Generator().manual_seed(8)
    x0 = torch.randint(20, levels - 20, (16, D), generator=g).double() / (levels - 1) * 2 - 1
    mean = 0.5 * torch.rand(16, D, generator=g, dtype=torch.float64) - 0.25
    discrete = discretized_gaussian_nll(x0, mean, std, levels)
    continuous = gaussian_nll(x0, mean, torch.tensor(std**2, dtype=torch.float64)) - D * math.log(2 * half_width)
    assert torch.allclose(discrete, continuous, rtol=1e-3)
    if std == 100.0:
        scale = D * (math.log(std * math.sqrt(2 * math.pi)) + math.log((levels - 1) / 2))
        assert torch.allclose(discrete, torch.full_like(discrete, scale), rtol=1e-4)


def test_discretized_matches_naive_and_extended_precision():
    levels = 17
    half_width = 1.0 / (levels - 1)
    values = torch.tensor([-1.0, -0.5, 0.0, 0.875, 1.0], dtype=torch.float64)[:, None]

    def cdf(z):  # plain float64 Phi
        return 0.5 * math.erfc(-z / math.sqrt(2))

    def naive(x, mean, std):
        upper = 1.0 if x > 1 - half_width else cdf((x + half_width - mean) / std)
        lower = 0.0 if x < -1 + half_width else cdf((x - half_width - mean) / std)
        return -math.log(upper - lower)

    def extended(x, mean, std):
        """50 digits, any exponent; P(a < Z < b) = P(-b < Z < -a) keeps both CDFs away from 1."""
        mpmath.mp.dps = 50
        b = mpmath.inf if x > 1 - half_width else (mpmath.mpf(x) + half_width - mean) / std
        a = -mpmath.inf if x < -1 + half_width else (mpmath.mpf(x) - half_width - mean) / std
        if a + b > 0:
            a, b = -b, -a
        return float(-mpmath.log(mpmath.ncdf(b) - mpmath.ncdf(a)))

    for mean, std in [(0.1, 0.5), (-0.4, 0.3), (0.9, 1.0)]:  # within 5 std: plain float64 CDFs are accurate
        got = discretized_gaussian_nll(values, torch.full_like(values, mean), std, levels)
        for k, x in enumerate(values[:, 0].tolist()):
            assert got[k].item() == pytest.approx(naive(x, mean, std), rel=1e-9, abs=1e-12)
    for mean, std in [(3.0, 0.05), (-2.0, 0.02), (0.0, 1e-3)]:  # tails far beyond 1e-12 and float64 underflow
        got = discretized_gaussian_nll(values, torch.full_like(values, mean), std, levels)
        for k, x in enumerate(values[:, 0].tolist()):
            assert got[k].item() == pytest.approx(extended(x, mean, std), rel=1e-9, abs=1e-12), (x, mean, std)
    assert got.max().item() > 1e4  # far beyond the 27.6 nats a clamp at 1e-12 would allow


def test_discretized_gradients_are_finite():
    levels = 17
    x0 = torch.tensor([[-1.0, -0.875, 0.0, 0.875, 1.0]], dtype=torch.float64).repeat(4, 1)
    mean = torch.tensor([[-0.9], [0.0], [30.0], [-30.0]], dtype=torch.float64).repeat(1, 5).requires_grad_(True)
    std = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    discretized_gaussian_nll(x0, mean, std, levels).sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(std.grad)


def test_discretized_rejects_off_grid_data_and_bad_levels():
    with pytest.raises(ValueError, match="evenly spaced"):
        discretized_gaussian_nll(torch.tensor([[0.03]]), torch.zeros(1, 1), 0.1, 17)
    with pytest.raises(ValueError, match="levels"):
        discretized_gaussian_nll(torch.zeros(1, 1), torch.zeros(1, 1), 0.1, 1)


# --------------------------------------------------------------------------------------------
# The training estimate
# --------------------------------------------------------------------------------------------


def test_estimate_terms_sum_to_the_bound():
    """For fixed eps, prior + mean over i of T * L_{i-1} is exactly the bound with that eps."""
    process = build_process(vp(12))
    denoiser = arbitrary_denoiser(process)
    g = torch.Generator().manual_seed(9)
    x0 = torch.randint(0, 17, (5, 1, 2, 2), generator=g).float() / 16 * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    per_step = torch.stack(
        [elbo_term(denoiser, x0, torch.full((5,), i), eps, 17, "beta") for i in range(1, process.T + 1)], 1
    )
    estimate_mean = prior_term(process, x0) + (process.T * per_step).mean(1)
    transitions = [
        transition_term(denoiser, x0, process.times(torch.full((5,), i)), eps, "beta") for i in range(2, process.T + 1)
    ]
    bound = prior_term(process, x0) + decoder_term(denoiser, x0, eps, 17) + torch.stack(transitions, 1).sum(1)
    assert torch.allclose(estimate_mean, bound, rtol=1e-12)
    # A batch with mixed steps gives each example its own term.
    mixed = torch.tensor([1, 2, 7, 12, 1])
    got = elbo_term(denoiser, x0, mixed, eps, 17, "beta")
    assert torch.equal(got, per_step[torch.arange(5), mixed - 1])


@pytest.mark.parametrize("cfg", [vp(10), ve(10)], ids=["vp", "ve"])
def test_estimate_is_unbiased(cfg):
    """The mean of elbo_loss_estimate over many draws equals the mean of elbo_terms' total."""
    process = build_process(cfg)
    denoiser = GaussianData.random(4, seed=1).denoiser(process)  # some model, not the data's own
    g = torch.Generator().manual_seed(10)
    base = torch.randint(0, 17, (8, 4), generator=g).float() / 16 * 2 - 1  # sklearn-digits-like grid values
    x0 = base.repeat(3_000, 1)
    with torch.no_grad():
        total = elbo_terms(denoiser, x0, 17, "beta_tilde", generator=g)["total"]
        estimate = elbo_loss_estimate(denoiser, x0, 17, "beta_tilde", generator=g)
    (m_total, se_total), (m_estimate, se_estimate) = mean_and_se(total), mean_and_se(estimate)
    assert abs(m_estimate - m_total) < 3 * math.hypot(se_total, se_estimate), (m_estimate, m_total, se_estimate)


def test_estimate_has_gradients():
    process = build_process(vp(10))
    network = torch.nn.Linear(4, 4)
    denoiser = Denoiser(lambda x_t, t: network(x_t), process)
    x0 = torch.randint(0, 17, (32, 4), generator=torch.Generator().manual_seed(11)).float() / 16 * 2 - 1
    loss = elbo_loss_estimate(denoiser, x0, 17, "beta_tilde", torch.Generator().manual_seed(12)).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in network.parameters())


# --------------------------------------------------------------------------------------------


def test_bits_per_dim():
    D = 3 * 32 * 32
    assert bits_per_dim(torch.tensor([D * math.log(2)]), D).item() == pytest.approx(1.0)
    # A uniform distribution over 256 levels in every dimension costs 8 bits per dimension.
    assert bits_per_dim(torch.tensor([D * math.log(256)]), D).item() == pytest.approx(8.0)


def test_options_are_checked_before_any_work():
    process = build_process(vp(10))
    denoiser, x0 = arbitrary_denoiser(process), torch.zeros(2, 3)
    with pytest.raises(ConfigError, match="model.variance"):
        elbo_term(denoiser, x0, torch.ones(2), x0, None, "large")  # only the decoder step: no KL to trip on
    with pytest.raises(ValueError, match="levels"):
        elbo_loss_estimate(denoiser, x0, 0, "beta")
    continuous_time = SimpleNamespace(name="vp", T=None)  # a continuous-time process has no steps
    with pytest.raises(ValueError, match="discrete process"):
        elbo_terms(arbitrary_denoiser(continuous_time), x0, None)
