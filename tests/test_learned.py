"""The learned parts of a model: the VDM schedule (Kingma et al. 2021) and the learned_range reverse variance
with the hybrid loss (Nichol & Dhariwal 2021), against closed forms on Gaussian data."""
import math

import pytest
import torch

from diffusion.analytic import GaussianData
from diffusion.config import ProcessConfig
from diffusion.denoiser import Denoiser
from diffusion.elbo import reverse_variance
from diffusion.losses import WEIGHTINGS, TimeSampler, diffusion_loss
from diffusion.factory import build_process

DATA = GaussianData.random(4, seed=11)


def learned(T="continuous", perturb: int | None = None, **kw):
    """A learned-schedule process; with ``perturb`` its parameters are moved at random (seeded)."""
    process = build_process(ProcessConfig(name="vp", schedule="learned", T=T, learned_hidden=64, **kw))
    if perturb is not None:
        g = torch.Generator().manual_seed(perturb)
        with torch.no_grad():  # w3 raised: the sigmoid features, not the linear part, shape the schedule
            for p in process.parameters():
                p.add_(2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            process.schedule.w3.add_(8.0)
            process.schedule.w2.add_(6.0)  # steep sigmoids, clustered at a random time
            centre = 6 * torch.rand(1, generator=g, dtype=torch.float64)
            process.schedule.b2.copy_(-centre - 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            process.schedule.b1.zero_()
    return process


@pytest.mark.parametrize("perturb", [None, 1, 2])
def test_learned_schedule_has_fixed_end_points_and_is_monotone(perturb):
    process = learned(perturb=perturb)
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    log_snr = process.schedule(t)
    assert log_snr[0].item() == pytest.approx(13.3, abs=1e-9)
    assert log_snr[-1].item() == pytest.approx(-5.0, abs=1e-9)
    assert (log_snr[1:] < log_snr[:-1]).all()
    # variance preserving: alpha^2 + sigma^2 = 1, alpha^2 / sigma^2 = exp(lambda)
    a, s = process.alpha(t.float()).double(), process.sigma(t.float()).double()
    assert torch.allclose(a**2 + s**2, torch.ones_like(a), atol=1e-6)
    assert torch.allclose(process.log_snr(t.float()).double(), log_snr, atol=1e-4)


def test_learned_schedule_sde_matches_finite_differences_and_is_differentiable():
    """g^2 / sigma^2 = -d lambda / dt (VDM appendix A), and g^2 carries gradients to the schedule."""
    process = learned(perturb=3)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    h = 1e-6
    dlambda = (process.schedule(t.double() + h) - process.schedule(t.double() - h)) / (2 * h)
    with torch.no_grad():  # sampling: no graph is kept
        f, g2 = process.sde(t)
    assert not g2.requires_grad
    sigma2 = process.sigma(t).double() ** 2
    assert torch.allclose(g2.double() / sigma2, -dlambda.detach(), rtol=1e-3)
    # f = d log alpha / dt = 1/2 sigma^2 d lambda / dt for alpha^2 = sigmoid(lambda)
    assert torch.allclose(f.double(), 0.5 * sigma2 * dlambda.detach(), rtol=1e-3)
    _, g2 = process.sde(t)
    g2.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in process.parameters())
    assert process.schedule.w3.grad.abs().sum() > 0


def exact_bound_rate(process) -> float:
    """E_t E||.||: the continuous-time VDM loss of the Bayes-optimal denoiser of N(mu, C), per dimension.

    With gamma = -lambda, the eps error at time t is sum_j l_j / (l_j + e^gamma) (C's eigenvalues l_j), so
    E_{t ~ U[t_min, 1]} 1/2 gamma'(t) err / D = 1/(2 D (1 - t_min)) sum_j [gamma - log(l_j + e^gamma)]
    between gamma(t_min) and gamma(1): it depends on the schedule only through its end points."""
    ends = -process.schedule(torch.tensor([process.t_min, 1.0], dtype=torch.float64)).detach()
    antiderivative = lambda g: (g - torch.log(DATA.eigvals + math.exp(g))).sum().item()  # noqa: E731
    return (antiderivative(ends[1].item()) - antiderivative(ends[0].item())) / (2 * DATA.dim * (1 - process.t_min))


def bound_samples(process, n=50_000, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return diffusion_loss(DATA.denoiser(process), WEIGHTINGS.get("elbo"), DATA.sample(n, g), g,
                              reduction="none").double()


def test_continuous_bound_with_exact_denoiser_is_invariant_to_the_schedule_shape():
    """VDM sec. 5.1: the continuous-time bound depends only on the end points of the log-SNR, whatever the
    shape in between (three shapes that differ by up to several nats of log-SNR)."""
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    shapes = []
    for perturb in (None, 4, 5):
        process = learned(perturb=perturb)
        losses = bound_samples(process)
        se = losses.std().item() / math.sqrt(len(losses))
        assert abs(losses.mean().item() - exact_bound_rate(process)) < 4 * se
        shapes.append(process.schedule(t).detach())
    assert (shapes[2] - shapes[0]).abs().max() > 3


def test_variance_objective_reduces_the_variance_and_keeps_the_bound():
    """Descending E[L^2] on the schedule parameters (VDM sec. 5.2) lowers the estimator's variance while its
    mean stays at the closed form."""
    process = learned(perturb=6)
    before = bound_samples(process, n=20_000, seed=1)
    optimizer = torch.optim.Adam(process.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(2)
    for _ in range(12):
        losses = diffusion_loss(DATA.denoiser(process), WEIGHTINGS.get("elbo"), DATA.sample(1024, g), g,
                                reduction="none")
        optimizer.zero_grad()
        (losses**2).mean().backward()
        optimizer.step()
    after = bound_samples(process, n=20_000, seed=1)
    assert after.var() < 0.9 * before.var()
    se = after.std().item() / math.sqrt(len(after))
    assert abs(after.mean().item() - exact_bound_rate(process)) < 4 * se


def test_discrete_learned_schedule_trains_through_the_bound():
    """In discrete time the bound depends on the whole schedule: its gradient reaches every parameter."""
    process = learned(T=20, perturb=7)
    g = torch.Generator().manual_seed(0)
    loss = diffusion_loss(DATA.denoiser(process), WEIGHTINGS.get("elbo"), DATA.sample(512, g), g, levels=None)
    loss.backward()
    grads = [p.grad for p in process.parameters()]
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads)
    assert sum(grad.abs().sum() for grad in grads) > 0
    assert process.alphas[0] == 1 and process.sigmas[0] == 0  # t_0 is the data


def test_learned_range_interpolates_between_beta_and_beta_tilde():
    """Nichol & Dhariwal 2021, eq. 15: v = -1 gives beta-tilde, v = 1 gives beta, v = 0 their geometric mean."""
    process = build_process(ProcessConfig(T=50))
    s, t = torch.tensor([0.2, 0.5, 0.98]), torch.tensor([0.22, 0.52, 1.0])
    beta = process.transition(s, t)[1]
    beta_tilde = process.posterior_variance(s, t)
    v = torch.ones(3, 2)
    assert torch.allclose(reverse_variance(process, s, t, "learned_range", -v)[:, 0], beta_tilde)
    assert torch.allclose(reverse_variance(process, s, t, "learned_range", v)[:, 1], beta)
    assert torch.allclose(reverse_variance(process, s, t, "learned_range", 0 * v)[:, 0], (beta * beta_tilde).sqrt())


class TwoHeads(torch.nn.Module):
    """A linear model with separate parameters for the eps prediction and the variance head."""

    def __init__(self, dim: int):
        super().__init__()
        self.mean_head = torch.nn.Linear(dim + 1, dim)
        self.variance_head = torch.nn.Linear(dim + 1, dim)

    def forward(self, x, t):
        h = torch.cat([x, t[:, None]], 1)
        return torch.cat([self.mean_head(h), self.variance_head(h)], 1)


@pytest.mark.parametrize("weighting", ["simple", "min_snr"])
def test_hybrid_loss_trains_the_mean_by_the_weighting_and_the_variance_by_the_bound(weighting):
    """L_hybrid = L + lambda L_vlb with the mean's gradient stopped in L_vlb (Nichol & Dhariwal 2021, sec. 3.1):
    the mean head's gradient is exactly that of L alone; the variance head's is lambda times that of L_vlb."""
    from diffusion.denoiser import network_denoiser
    from diffusion.parameterizations import PARAMETERIZATIONS

    process = build_process(ProcessConfig(T=20))
    net = TwoHeads(4)
    denoiser = network_denoiser(net, PARAMETERIZATIONS.get("eps"), process, learned_variance=True)
    x0 = DATA.sample(256, torch.Generator().manual_seed(0))

    def grads(name, variance, **options):
        net.zero_grad()
        g = torch.Generator().manual_seed(1)
        diffusion_loss(denoiser, WEIGHTINGS.get(name), x0, g, levels=None, variance=variance, **options).backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]

    hybrid = grads(weighting, "learned_range", hybrid_lambda=0.01)
    alone = grads(weighting, "beta_tilde")  # the same draws; no bound term
    bound = grads("elbo", "learned_range")  # the whole bound, both heads
    for h, a in zip(hybrid[:2], alone[:2]):  # mean head
        assert torch.allclose(h, a, atol=1e-7)
    for h, b in zip(hybrid[2:], bound[2:]):  # variance head
        assert torch.allclose(h, 0.01 * b, rtol=1e-4, atol=1e-9)
    assert all(a.abs().sum() == 0 for a in alone[2:]) and any(b.abs().sum() > 0 for b in bound[2:])


def test_importance_sampled_discrete_bound_is_unbiased():
    """The discrete elbo with t drawn in proportion to sqrt(E[L_t^2]) and reweighted has the uniform estimate's mean."""
    process = build_process(ProcessConfig(T=10))
    denoiser = Denoiser(lambda x, t: 0.8 * DATA.exact_eps(x, process.alpha(t), process.sigma(t)), process)
    weighting = WEIGHTINGS.get("elbo")
    g = torch.Generator().manual_seed(0)
    sampler = TimeSampler(process, "importance")
    while (sampler.counts < 10).any():
        diffusion_loss(denoiser, weighting, DATA.sample(64, g), g, levels=None, time_sampler=sampler)
    assert not torch.allclose(sampler.probabilities(), torch.full((10,), 0.1, dtype=torch.float64), atol=1e-3)
    sampler.update = lambda t, losses: None
    with torch.no_grad():
        x0 = DATA.sample(30_000, g)
        uniform = diffusion_loss(denoiser, weighting, x0, g, levels=None, reduction="none").double()
        weighted = diffusion_loss(denoiser, weighting, x0, g, levels=None, time_sampler=sampler,
                                  reduction="none").double()
    stderr = (uniform.var() / len(uniform) + weighted.var() / len(weighted)).sqrt()
    assert abs(uniform.mean() - weighted.mean()) < 4 * stderr
    assert weighted.var() < uniform.var()
