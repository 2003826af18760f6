"""Parameterizations, loss weightings and the denoiser against closed forms."""
import pytest
import torch

from diffusion.analytic import GaussianData
from diffusion.config import ProcessConfig
from diffusion.denoiser import Denoiser
from diffusion.losses import WEIGHTINGS, diffusion_loss
from diffusion.parameterizations import PARAMETERIZATIONS, eps_to_score, eps_to_x0
from diffusion.processes import build_process, expand


def _frame(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    alpha, sigma = torch.rand(64, 1, generator=g) + 0.1, torch.rand(64, 1, generator=g) + 0.1
    return x0, eps, alpha, sigma, alpha * x0 + sigma * eps


@pytest.mark.parametrize("name", PARAMETERIZATIONS.names())
def test_parameterization_round_trip(name):
    x0, eps, alpha, sigma, x_t = _frame()
    p = PARAMETERIZATIONS.get(name)
    assert torch.allclose(p.to_eps(p.from_eps(eps, x_t, alpha, sigma), x_t, alpha, sigma), eps, atol=1e-6)


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
