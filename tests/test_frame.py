"""Parameterizations, loss weightings and the denoiser against closed forms."""
import pytest
import torch

from diffusion.analytic import GaussianData
from diffusion.config import ProcessConfig
from diffusion.denoiser import Denoiser
from diffusion.losses import WEIGHTINGS, diffusion_loss
from diffusion.parameterizations import PARAMETERIZATIONS, eps_to_score, eps_to_x0
from diffusion.factory import build_process
from diffusion.processes import expand


def _frame(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    alpha, sigma = torch.rand(64, 1, generator=g) + 0.1, torch.rand(64, 1, generator=g) + 0.1
    return x0, eps, alpha, sigma, alpha * x0 + sigma * eps


@pytest.mark.parametrize("name", PARAMETERIZATIONS.names())
def test_parameterization_round_trip(name):
    """Every parameterization converts to eps and back to within 1e-6, on the grid of a discrete process
    (``mean`` refers to the previous step, so t and the process come along)."""
    process = build_process(ProcessConfig(name="vp", schedule="cosine", T=100))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    t = torch.randint(1, 101, (64,), generator=g).float() / 100
    alpha, sigma = expand(process.alpha(t), x0), expand(process.sigma(t), x0)
    x_t = alpha * x0 + sigma * eps
    p = PARAMETERIZATIONS.get(name)
    ctx = {"t": t, "process": process}
    round_trip = p.to_eps(p.from_eps(eps, x_t, alpha, sigma, **ctx), x_t, alpha, sigma, **ctx)
    assert torch.allclose(round_trip, eps, atol=1e-6 if name != "mean" else 1e-4)
    if not p.needs_step:  # the others hold for any alpha, sigma
        x0, eps, alpha, sigma, x_t = _frame()
        assert torch.allclose(p.to_eps(p.from_eps(eps, x_t, alpha, sigma), x_t, alpha, sigma), eps, atol=1e-6)


def test_mean_parameterization_is_ho_et_al_posterior_mean():
    """mean predicts mu~_t(x_t, x0) = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_{t-1})
    / (1 - abar_t) x_t (Ho et al. 2020, eq. 7), written here with the betas of the linear schedule."""
    T = 50
    process = build_process(ProcessConfig(name="vp", schedule="linear", T=T))
    betas = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(1)
    i = torch.tensor([1, 2, 7, 25, 50])
    x0, eps = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    a_t, a_prev = abar[i - 1][:, None], torch.where(i > 1, abar[(i - 2).clamp(min=0)], 1.0)[:, None]
    x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
    beta = betas[i - 1][:, None]
    mu = a_prev.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * x_t
    p = PARAMETERIZATIONS.get("mean")
    t = i.float() / T
    alpha, sigma = expand(process.alpha(t), x0).double(), expand(process.sigma(t), x0).double()
    assert torch.allclose(p.from_eps(eps, x_t, alpha, sigma, t=t, process=process), mu, atol=1e-5)
    assert torch.allclose(p.to_eps(mu, x_t, alpha, sigma, t=t, process=process), eps, atol=1e-4)
    # at the first step the posterior mean is x0 itself
    assert torch.allclose(mu[0], x0[0], atol=1e-6)


def test_conversions_recover_x0_and_score():
    x0, eps, alpha, sigma, x_t = _frame()
    assert torch.allclose(eps_to_x0(eps, x_t, alpha, sigma), x0, atol=1e-5)
    # score of q(x_t | x0) = N(alpha x0, sigma^2): -(x_t - alpha x0) / sigma^2
    assert torch.allclose(eps_to_score(eps, sigma), -(x_t - alpha * x0) / sigma**2, atol=1e-5)
    score = PARAMETERIZATIONS.get("score")
    assert torch.allclose(score.to_eps(-(x_t - alpha * x0) / sigma**2, x_t, alpha, sigma), eps, atol=1e-5)


def test_sigma2_weighting_is_half_the_simple_loss():
    """lambda(sigma) = sigma^2 turns score matching into eps matching (Song & Ermon 2019, sec. 4.2)."""
    x0, eps, alpha, sigma, x_t = _frame()
    eps_hat = eps + 0.3 * torch.randn_like(eps)
    simple = WEIGHTINGS.get("simple")(eps_hat, eps, alpha, sigma)
    sigma2 = WEIGHTINGS.get("sigma2")(eps_hat, eps, alpha, sigma)
    assert torch.allclose(sigma2, 0.5 * simple, rtol=1e-5)
    assert torch.allclose(simple, ((eps_hat - eps) ** 2).mean(1))


@pytest.mark.parametrize("name,schedule", [("vp", "cosine"), ("ve", "geometric")])
def test_loss_of_exact_denoiser_equals_closed_form(name, schedule):
    """With the Bayes-optimal denoiser of N(mu, C), E||eps - E[eps|x_t]||^2 / D at time t equals
    (1/D) sum_j alpha^2 l_j / (alpha^2 l_j + sigma^2), l_j the eigenvalues of C."""
    data = GaussianData.random(8, seed=3)
    process = build_process(ProcessConfig(name=name, schedule=schedule, T=50, sigma_max=5.0))
    denoiser = data.denoiser(process)
    alpha2, sigma2 = process.alphas[1:] ** 2, process.sigmas[1:] ** 2
    per_t = (alpha2[:, None] * data.eigvals / (alpha2[:, None] * data.eigvals + sigma2[:, None])).mean(1)
    expected = per_t.mean().item()  # t uniform on {1..T}
    g = torch.Generator().manual_seed(0)
    x0 = data.sample(200_000, g)
    loss = diffusion_loss(denoiser, WEIGHTINGS.get("simple"), x0, g).item()
    assert loss == pytest.approx(expected, rel=0.02)
    # any other denoiser does worse
    worse = Denoiser(lambda x, t: 0.9 * denoiser.eps(x, t), process)
    assert diffusion_loss(worse, WEIGHTINGS.get("simple"), x0, torch.Generator().manual_seed(0)).item() > loss


def test_denoiser_predictions_are_consistent():
    data = GaussianData.random(4, seed=1)
    process = build_process(ProcessConfig(T=100))
    denoiser = data.denoiser(process)
    x = torch.randn(16, 4)
    t = torch.full((16,), 0.3)
    alpha, sigma = expand(process.alpha(t), x), expand(process.sigma(t), x)
    assert torch.allclose(denoiser.x0(x, t) * alpha + sigma * denoiser.eps(x, t), x, atol=1e-5)
    assert torch.allclose(denoiser.score(x, t) * -sigma, denoiser.eps(x, t), atol=1e-6)


def test_x0_and_v_parameterizations_against_their_definitions():
    x0, eps, alpha, sigma, x_t = _frame(1)
    x0_p, v_p = PARAMETERIZATIONS.get("x0"), PARAMETERIZATIONS.get("v")
    assert torch.allclose(x0_p.from_eps(eps, x_t, alpha, sigma), x0, atol=1e-5)
    v = alpha * eps - sigma * x0  # Salimans & Ho 2022, sec. 4
    assert torch.allclose(v_p.from_eps(eps, x_t, alpha, sigma), v, atol=1e-5)
    assert torch.allclose(v_p.to_eps(v, x_t, alpha, sigma), eps, atol=1e-5)
    # on a variance-preserving path, x0 = alpha x_t - sigma v (Salimans & Ho, eq. 11 context)
    a, s = torch.full_like(alpha, 0.6), torch.full_like(sigma, 0.8)
    x_vp = a * x0 + s * eps
    v_vp = a * eps - s * x0
    assert torch.allclose(a * x_vp - s * v_vp, x0, atol=1e-5)


def test_edm_preconditioning_matches_karras_table_1():
    """D(y) = c_skip y + c_out F(c_in y) in y = x/alpha, sigma~ = sigma/alpha (sigma_data = 0.5)."""
    x0, eps, alpha, sigma, x_t = _frame(2)
    edm = PARAMETERIZATIONS.get("edm")
    output = torch.randn_like(x0)
    scaled = sigma / alpha
    c_skip = 0.25 / (scaled**2 + 0.25)
    c_out = scaled * 0.5 / (scaled**2 + 0.25).sqrt()
    c_in = 1 / (scaled**2 + 0.25).sqrt()
    denoised = c_skip * x_t / alpha + c_out * output
    eps_from_output = edm.to_eps(output, x_t, alpha, sigma)
    assert torch.allclose((x_t - sigma * eps_from_output) / alpha, denoised, atol=1e-5)
    assert torch.allclose(edm.input_scale(alpha, sigma) * x_t, c_in * x_t / alpha, atol=1e-6)
    # the network's target F = (x0 - c_skip y) / c_out has unit variance for data of std sigma_data (Karras eq. 8)
    data = 0.5 * torch.randn(200_000, 1)
    noise = torch.randn_like(data)
    a, s = torch.tensor([[0.7]]), torch.tensor([[1.3]])
    target = edm.from_eps(noise, a * data + s * noise, a, s)
    assert target.var().item() == pytest.approx(1.0, rel=0.02)


def test_new_weightings_against_their_papers():
    x0, eps, alpha, sigma, x_t = _frame(3)
    eps_hat = eps + 0.2 * torch.randn_like(eps)
    err = ((eps_hat - eps) ** 2).mean(1)
    snr = (alpha / sigma) ** 2
    got = WEIGHTINGS.get("min_snr")(eps_hat, eps, alpha, sigma, gamma=5.0)
    x0_err = (((x_t - sigma * eps_hat) / alpha - x0) ** 2).mean(1)
    assert torch.allclose(got, snr.clamp(max=5).squeeze(1) * x0_err, rtol=1e-4)
    edm = WEIGHTINGS.get("edm")(eps_hat, eps, alpha, sigma)
    scaled = (sigma / alpha).squeeze(1)
    lam = (scaled**2 + 0.25) / (scaled * 0.5) ** 2  # Karras et al. 2022, Table 1
    assert torch.allclose(edm, lam * x0_err, rtol=1e-4)
    # likelihood weighting on the VP-SDE: g^2 = beta(t) = 0.1 + 19.9 t
    process = build_process(ProcessConfig(T="continuous"))
    t = torch.rand(64, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    a, s = expand(process.alpha(t), x0), expand(process.sigma(t), x0)
    got = WEIGHTINGS.get("likelihood")(eps_hat, eps, a, s, t=t, process=process)
    expected = 0.5 * (0.1 + 19.9 * t) / s.squeeze(1) ** 2 * err
    assert torch.allclose(got, expected, rtol=1e-4)


@pytest.mark.parametrize("name", ["x0", "v", "edm", "score", "mean"])
def test_exact_denoiser_read_through_every_parameterization(name):
    """A network that outputs from_eps(exact eps) gives back the exact denoiser through network_denoiser."""
    from diffusion.denoiser import network_denoiser

    data = GaussianData.random(4, seed=2)
    process = build_process(ProcessConfig(T=10 if name == "mean" else "continuous"))
    p = PARAMETERIZATIONS.get(name)

    denoiser = network_denoiser(data.oracle_network(process, p), p, process)
    x = torch.randn(32, 4)
    t = torch.full((32,), 0.4)
    assert torch.allclose(denoiser.eps(x, t), data.exact_eps(x, process.alpha(t), process.sigma(t)), atol=1e-4)


def test_elbo_weighting_is_the_exact_bound_in_discrete_time_and_vdm_in_continuous_time():
    from diffusion.elbo import elbo_loss_estimate

    data = GaussianData.random(4, seed=5)
    x0 = data.sample(64, torch.Generator().manual_seed(0))
    discrete = data.denoiser(build_process(ProcessConfig(T=20)))
    got = diffusion_loss(discrete, WEIGHTINGS.get("elbo"), x0, torch.Generator().manual_seed(1), levels=None)
    expected = elbo_loss_estimate(discrete, x0, None, "beta_tilde", torch.Generator().manual_seed(1)).mean() / 4
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # continuous time: -1/2 dlambda/dt, with dlambda/dt computed by finite differences of the log-SNR
    process = build_process(ProcessConfig(T="continuous"))
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    h = 1e-6
    log_snr64 = lambda u: 2 * (process.log_alpha64(u) - process.log_sigma64(u))  # noqa: E731
    dlambda = (log_snr64(t + h) - log_snr64(t - h)) / (2 * h)
    _, g2 = process.sde(t.float())
    sigma2 = process.sigma(t.float()).double() ** 2
    assert torch.allclose(g2.double() / sigma2, -dlambda, rtol=1e-3)
    eps, eps_hat = torch.zeros(3, 4), torch.ones(3, 4)
    a, s = expand(process.alpha(t.float()), eps), expand(process.sigma(t.float()), eps)
    weight = WEIGHTINGS.get("elbo")(eps_hat, eps, a, s, t=t.float(), process=process)
    assert torch.allclose(weight.double(), -0.5 * dlambda, rtol=1e-3)


@pytest.mark.parametrize("objective", ["implicit", "sliced"])
def test_score_matching_objectives_differ_from_denoising_by_a_model_free_constant(objective):
    """E[sigma^2 (tr grad s + 1/2 ||s||^2)] and E[1/2 sigma^2 ||s - grad log q(x_t|x0)||^2] differ by a constant
    (Hyvarinen 2005; Vincent 2011): the change between two models is the same for both objectives."""
    data = GaussianData.random(2, seed=7)
    process = build_process(ProcessConfig(name="ve", schedule="geometric", T="continuous", sigma_min=0.05, sigma_max=3.0))
    exact = data.denoiser(process)
    worse = Denoiser(lambda x, t: 0.7 * exact.eps(x, t), process)
    x0 = data.sample(100_000, torch.Generator().manual_seed(0))
    options = dict(objective=objective, n_projections=4)

    def loss(model, opts):
        return diffusion_loss(model, WEIGHTINGS.get("sigma2"), x0, torch.Generator().manual_seed(1), **opts).item()

    change_sm = loss(worse, options) - loss(exact, options)
    change_dsm = loss(worse, {}) - loss(exact, {})
    assert change_dsm > 0.01
    assert change_sm == pytest.approx(change_dsm, rel=0.1)


def test_loss_options_are_checked():
    """The plain-number loss functions refuse what they cannot do, naming the parameter (a config is refused
    earlier, by diffusion.validation, naming its key)."""
    from diffusion.losses import TimeSampler, score_matching_loss

    process = build_process(ProcessConfig(T="continuous"))
    with pytest.raises(ValueError, match="t_sampling must be one of importance, uniform, got 'stratified'"):
        TimeSampler(process, "stratified")
    with pytest.raises(ValueError, match="importance_bins must be an integer >= 1, got 0"):
        TimeSampler(process, "importance", importance_bins=0)
    denoiser = GaussianData.random(2, seed=7).denoiser(process)
    with pytest.raises(ValueError, match="objective must be one of implicit, sliced, got 'denoising'"):
        score_matching_loss(denoiser, torch.zeros(4, 2), torch.Generator(), "denoising")
    with pytest.raises(ValueError, match="objective must be one of implicit, sliced, got 'exact'"):
        diffusion_loss(denoiser, WEIGHTINGS.get("sigma2"), torch.zeros(4, 2), torch.Generator(), objective="exact")


def test_importance_sampling_of_t_is_unbiased_and_reduces_variance():
    """Nichol & Dhariwal 2021, sec. 3.3: with p_t proportional to sqrt(E[L_t^2]) and weights p_uniform / p_t the
    estimate keeps its mean and, for the heavy-tailed likelihood weighting, loses variance."""
    from diffusion.losses import TimeSampler

    data = GaussianData.random(4, seed=9)
    process = build_process(ProcessConfig(T="continuous"))
    denoiser = data.denoiser(process)
    weighting = WEIGHTINGS.get("likelihood")
    g = torch.Generator().manual_seed(0)
    sampler = TimeSampler(process, "importance", importance_bins=20)
    while (sampler.counts < 10).any():  # fill every bin's history
        diffusion_loss(denoiser, weighting, data.sample(512, g), g, time_sampler=sampler)
    p = sampler.probabilities()
    expected = (sampler.history**2).mean(1).sqrt()
    assert torch.allclose(p, 0.999 * expected / expected.sum() + 0.001 / 20)
    frozen = TimeSampler(process, "importance", importance_bins=20)
    frozen.load_state_dict(sampler.state_dict())
    frozen.update = lambda t, losses: None  # keep p fixed while measuring
    uniform, weighted = [], []
    for _ in range(200):
        x0 = data.sample(256, g)
        uniform.append(diffusion_loss(denoiser, weighting, x0, g).item())
        weighted.append(diffusion_loss(denoiser, weighting, x0, g, time_sampler=frozen).item())
    uniform, weighted = torch.tensor(uniform), torch.tensor(weighted)
    stderr = (uniform.var() / 200 + weighted.var() / 200).sqrt()
    assert abs(uniform.mean() - weighted.mean()) < 4 * stderr
    assert weighted.var() < 0.5 * uniform.var()
