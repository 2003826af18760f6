"""Schedules against published constants and a second computation; q(x_t|x0) and the posterior."""
import math

import pytest
import torch

from diffusion.config import ProcessConfig
from diffusion.errors import ConfigError
from diffusion.factory import build_process
from diffusion.schedules import cosine_alphabar, linear_betas


def test_linear_schedule_constants():
    process = build_process(ProcessConfig(name="vp", schedule="linear", T=1000))
    alphabar = process.alphas**2
    # Published value for Ho et al.'s schedule: alphabar at the last step (index 999 counting from 0).
    assert alphabar[1000].item() == pytest.approx(4.036e-5, rel=1e-3)
    # Second computation: exp of the summed log(1 - beta), written out by hand.
    betas = [1e-4 + (0.02 - 1e-4) * k / 999 for k in range(1000)]
    assert alphabar[1000].item() == pytest.approx(math.exp(sum(math.log(1 - b) for b in betas)), rel=1e-9)
    assert (process.sigmas**2 + alphabar).sub(1).abs().max() < 1e-12


def test_cosine_schedule_constants():
    process = build_process(ProcessConfig(name="vp", schedule="cosine", T=1000))
    alphabar = process.alphas**2
    beta_first = 1 - alphabar[1] / alphabar[0]
    assert beta_first.item() == pytest.approx(4.128e-5, rel=1e-3)  # Nichol & Dhariwal's beta_0
    assert alphabar[500].item() == pytest.approx(0.4938, abs=1e-4)  # alphabar_499 counting from 0
    # Second computation: away from the clipped end the product of (1 - beta) is f(t)/f(0) itself.
    grid = torch.arange(1001, dtype=torch.float64) / 1000
    closed_form = cosine_alphabar(grid, 0.008)
    assert (alphabar[:990] - closed_form[:990]).abs().max() < 1e-10
    # Betas are clipped at 0.999 at the end.
    betas = 1 - alphabar[1:] / alphabar[:-1]
    assert betas.max().item() == pytest.approx(0.999, abs=1e-9)


def test_linear_schedule_scales_with_T():
    betas = linear_betas(100)  # plain numbers: Ho et al.'s 1e-4 to 0.02 (scaled to T = 100)
    assert betas[0].item() == pytest.approx(1e-3) and betas[-1].item() == pytest.approx(0.2)


def test_geometric_sigmas():
    process = build_process(ProcessConfig(name="ve", schedule="geometric", T=10, sigma_min=0.01, sigma_max=1.0))
    sigmas = process.sigmas[1:]
    assert sigmas[0].item() == pytest.approx(0.01) and sigmas[-1].item() == pytest.approx(1.0)
    ratios = sigmas[1:] / sigmas[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, 100 ** (1 / 9)))
    assert (process.alphas == 1).all()


def test_marginal_equals_iterated_chain_in_distribution():
    """x_t from the closed form q(x_t | x0) matches t steps of x_i = sqrt(1-beta_i) x_{i-1} + sqrt(beta_i) z."""
    process = build_process(ProcessConfig(name="vp", schedule="linear", T=50))
    betas = 1 - (process.alphas[1:] / process.alphas[:-1]) ** 2
    g = torch.Generator().manual_seed(0)
    n, step = 200_000, 30
    x0 = torch.full((n,), 0.7, dtype=torch.float64)
    x = x0.clone()
    for i in range(step):
        x = (1 - betas[i]).sqrt() * x + betas[i].sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    t = torch.full((n,), step / 50)
    closed = process.marginal(x0.float(), t, torch.randn(n, generator=g))
    se = 4 / math.sqrt(n)
    assert abs(x.mean().item() - closed.double().mean().item()) < 2 * 4 * se
    assert abs(x.var().item() - closed.double().var().item()) < 4 * math.sqrt(2 / n) * 2


@pytest.mark.parametrize("name,schedule", [("vp", "linear"), ("ve", "geometric")])
def test_posterior_matches_bayes_rule_1d(name, schedule):
    """q(x_s | x_t, x0) ∝ q(x_t | x_s) q(x_s | x0), done by hand with 1-D Gaussian algebra."""
    process = build_process(ProcessConfig(name=name, schedule=schedule, T=20, sigma_max=5.0))
    s, t = torch.tensor([0.35]), torch.tensor([0.6])
    x0, x_t = torch.tensor([0.3]), torch.tensor([-0.8])
    a_s, sig_s = process.alphas[7].item(), process.sigmas[7].item()
    a_t, sig_t = process.alphas[12].item(), process.sigmas[12].item()
    a_ts = a_t / a_s
    v_ts = sig_t**2 - a_ts**2 * sig_s**2
    # product of N(x_s; a_s x0, sig_s^2) and N(x_t; a_ts x_s, v_ts) as a function of x_s
    precision = 1 / sig_s**2 + a_ts**2 / v_ts
    mean = (a_s * 0.3 / sig_s**2 + a_ts * -0.8 / v_ts) / precision
    got_mean, got_var = process.posterior(x_t, x0, s, t)
    assert got_mean.item() == pytest.approx(mean, rel=1e-5)
    assert got_var.item() == pytest.approx(1 / precision, rel=1e-5)


def test_vp_posterior_variance_is_beta_tilde():
    process = build_process(ProcessConfig(T=1000))
    alphabar = process.alphas**2
    i = 500
    beta = 1 - alphabar[i] / alphabar[i - 1]
    beta_tilde = (1 - alphabar[i - 1]) / (1 - alphabar[i]) * beta  # Ho et al. eq. 7
    _, var = process.posterior(torch.zeros(1), torch.zeros(1), torch.tensor([0.499]), torch.tensor([0.5]))
    assert var.item() == pytest.approx(beta_tilde.item(), rel=1e-5)
    assert process.transition(torch.tensor([0.499]), torch.tensor([0.5]))[1].item() == pytest.approx(beta.item())


@pytest.mark.parametrize(
    "changes,key",
    [({"name": "foo"}, "process.name"), ({"schedule": "geometric"}, "process.schedule"),
     ({"T": 0}, "process.T"), ({"name": "ve", "schedule": "geometric", "sigma_min": 50.0}, "process.sigma_min")],
)
def test_bad_process_config(changes, key):
    with pytest.raises(ConfigError, match=key):
        build_process(ProcessConfig(**changes))


def test_scaled_linear_schedule_constant_and_continuous_limit():
    """Stable Diffusion's scaled_linear (beta 0.00085 to 0.012, T = 1000) ends at alphabar_T = 0.00466."""
    cfg = ProcessConfig(schedule="scaled_linear", T=1000, beta_start=0.00085, beta_end=0.012)
    alphabar = build_process(cfg).alphas ** 2
    assert alphabar[-1].item() == pytest.approx(0.00466, rel=0.01)
    continuous = build_process(ProcessConfig(schedule="scaled_linear", T="continuous", beta_start=0.00085, beta_end=0.012))
    t = torch.tensor([0.25, 0.5, 0.75, 1.0])
    # the limit integrates beta where the chain sums -log(1 - beta) = beta + beta^2/2 + ...: ~1e-2 apart
    assert torch.allclose(continuous.alpha(t) ** 2, alphabar[[250, 500, 750, 1000]].float(), rtol=0.03)


def test_continuous_vp_sde_is_the_limit_of_ddpm_linear():
    """beta_min = T beta_start = 0.1, beta_max = T beta_end = 20 (Song et al. 2021, appendix C)."""
    discrete = build_process(ProcessConfig(T=1000))
    continuous = build_process(ProcessConfig(T="continuous"))
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    # -log(1 - beta) = beta + beta^2/2 + ...: the chain and its limit differ by ~sum beta^2 / 4 in log alpha
    assert torch.allclose(continuous.alpha(t), discrete.alpha(t), rtol=0.03)
    # closed form: alphabar(t) = exp(-0.1 t - 9.95 t^2)
    assert torch.allclose(continuous.alpha(t) ** 2, torch.exp(-0.1 * t - 9.95 * t**2), rtol=1e-5)
    assert torch.allclose(continuous.alpha(t) ** 2 + continuous.sigma(t) ** 2, torch.ones(5), atol=1e-6)


def test_sigmoid_schedule_closed_form_and_ends():
    discrete = build_process(ProcessConfig(schedule="sigmoid", T=1000))
    alphabar = discrete.alphas**2
    grid = torch.arange(1001, dtype=torch.float64) / 1000
    s = torch.sigmoid
    closed = (s(torch.tensor(3.0, dtype=torch.float64)) - s(6 * grid - 3)) / (s(torch.tensor(3.0, dtype=torch.float64)) - s(torch.tensor(-3.0, dtype=torch.float64)))
    assert (alphabar[:990] - closed[:990]).abs().max() < 1e-9  # before the clipped end
    assert alphabar[0] == 1 and alphabar[-1] < 1e-3


def test_sigmoid_schedule_docstring_states_the_code():
    """The formula sigmoid_alphabar's docstring displays, evaluated as written (with the v_start and v_end it
    defines), is the continuous sigmoid process's alphabar at every t, 1 at t = 0, for non-default start, end, tau."""
    import re

    from diffusion.schedules import sigmoid_alphabar

    doc = sigmoid_alphabar.__doc__
    formula = re.search(r"^\s*alphabar\(t\) = (.+)$", doc, re.MULTILINE)
    ends = dict(re.findall(r"\b(v_start|v_end) = (sigmoid\([^)]*\))", doc))
    assert formula and set(ends) == {"v_start", "v_end"}, \
        "the docstring displays alphabar(t) = ... and defines v_start, v_end"
    cfg = ProcessConfig(schedule="sigmoid", T="continuous", sigmoid_start=-2.0, sigmoid_end=4.0, sigmoid_tau=0.7)
    t = torch.tensor([0.0, 0.1, 0.4, 0.8, 0.95], dtype=torch.float64)
    names = {"sigmoid": torch.sigmoid, "t": t,
             **{k: torch.tensor(getattr(cfg, f"sigmoid_{k}"), dtype=torch.float64) for k in ("start", "end", "tau")}}
    names.update({name: eval(expression, {}, names) for name, expression in ends.items()})
    documented = eval(formula.group(1), {}, names)
    assert documented[0].item() == pytest.approx(1.0, abs=1e-12)
    code = build_process(cfg).alpha(t.float()).double() ** 2
    assert torch.allclose(documented, code, rtol=1e-5, atol=1e-7)


def test_subvp_and_ve_sde_marginals():
    """sub-VP: sigma = 1 - alphabar (Song et al. 2021, eq. 29); VE-SDE: sigma(t) = sigma_min (sigma_max / sigma_min)^t."""
    vp = build_process(ProcessConfig(T="continuous"))
    subvp = build_process(ProcessConfig(name="subvp", T="continuous"))
    t = torch.tensor([0.2, 0.6])
    assert torch.allclose(subvp.sigma(t), 1 - vp.alpha(t) ** 2, atol=1e-6)
    assert torch.all(subvp.sigma(t) < vp.sigma(t))
    ve = build_process(ProcessConfig(name="ve", schedule="geometric", T="continuous", sigma_min=0.01, sigma_max=50.0))
    assert torch.allclose(ve.sigma(t), 0.01 * 5000.0**t, rtol=1e-5)
    assert ve.time_of_log_snr(ve.log_snr(t)).sub(t).abs().max() < 1e-5


def test_discrete_process_interpolates_between_grid_times():
    process = build_process(ProcessConfig(T=10))
    grid = torch.tensor([0.3, 0.4])
    mid = torch.tensor([0.35])
    log_alpha = process.alpha(grid).log()
    assert process.alpha(mid).log().item() == pytest.approx(log_alpha.mean().item(), rel=1e-5)
    assert process.alpha(grid)[0].item() == pytest.approx(process.alphas[3].item(), rel=1e-6)


def test_continuous_limit_stands_in_only_where_it_matches_the_grid():
    """bpd_ode runs a discrete model on its schedule's continuous-time form when their log-SNRs agree on the
    grid (DDPM's T = 1000: the VP-SDE with beta from 0.1 to 20, Song et al. 2021 eq. 33), and keeps the
    interpolated discrete path where they do not (NCSN's 10 levels)."""
    import dataclasses

    from diffusion.factory import LIMIT_TOLERANCE, continuous_limit

    ddpm_cfg = ProcessConfig(name="vp", schedule="linear", T=1000)
    ddpm = build_process(ddpm_cfg)
    limit, deviation = continuous_limit(ddpm_cfg, ddpm)
    assert limit.T is None and limit.t_min == pytest.approx(1e-3) and deviation < LIMIT_TOLERANCE
    grid = torch.tensor([0.01, 0.3, 0.7, 0.99])
    assert torch.allclose(limit.log_snr(grid), ddpm.log_snr(grid), atol=LIMIT_TOLERANCE)
    ncsn_cfg = ProcessConfig(name="ve", schedule="geometric", T=10)
    ncsn = build_process(ncsn_cfg)
    same, deviation = continuous_limit(ncsn_cfg, ncsn)
    assert same is ncsn and deviation > 1
    continuous = build_process(dataclasses.replace(ddpm_cfg, T="continuous"))
    assert continuous_limit(ddpm_cfg, continuous) == (continuous, 0.0)
    learned_cfg = ProcessConfig(schedule="learned", T=50, learned_hidden=8)
    learned = build_process(learned_cfg)
    twin, deviation = continuous_limit(learned_cfg, learned)
    assert twin.T is None and twin.schedule is learned.schedule and deviation == 0.0
