"""Samplers driven by the exact score of a Gaussian data set reproduce its mean and covariance, with
an error that shrinks as the step budget grows; closed-form checks of single steps and spacings."""
import dataclasses
import functools
import inspect
import math

import pytest
import torch

from diffusion.analytic import GaussianData
from diffusion.config import ModelConfig, ProcessConfig, SampleConfig
from diffusion.factory import build_process
from diffusion.samplers import SAMPLERS, SPACINGS
from diffusion.factory import draw_samples, make_timesteps

DIM, N = 16, 4_000
DATA = GaussianData.random(DIM, seed=0)
PROCESSES = {
    "vp": ProcessConfig(name="vp", schedule="linear", T="continuous"),
    "ve": ProcessConfig(name="ve", schedule="geometric", T="continuous", sigma_min=0.01, sigma_max=20.0),
    "subvp": ProcessConfig(name="subvp", schedule="linear", T="continuous"),
    "vp1000": ProcessConfig(name="vp", schedule="linear", T=1000),
}
# per sampler: options that suit it (the probability-flow multistep and Heun solvers want steps dense
# near the data, Karras et al. 2022 sec. 3; the corrector's snr is the one Song et al. use for small data)
OPTIONS = {"dpm_solver_2m": {"spacing": "karras"}, "ode_heun": {"spacing": "karras"}, "pc": {"snr": 0.02},
           "ode_rk45": {"rtol": 1e-4, "atol": 1e-4}}


def moment_errors(x: torch.Tensor) -> tuple[float, float]:
    """(||mean - mu||, ||cov - C||_F / ||C||_F) of samples x [N, D]."""
    x = x.double()
    return (x.mean(0) - DATA.mean).norm().item(), ((torch.cov(x.T) - DATA.cov).norm() / DATA.cov.norm()).item()


FLOOR_MEAN, FLOOR_COV = moment_errors(DATA.sample(N, torch.Generator().manual_seed(123)))


def run(process_name, sampler, steps, seed=1, **options):
    denoiser = DATA.denoiser(build_process(PROCESSES[process_name]))
    config = SampleConfig(sampler=sampler, steps=steps, batch_size=N, **{**OPTIONS.get(sampler, {}), **options})
    return draw_samples(denoiser, config, (DIM,), N, torch.Generator().manual_seed(seed), "cpu", "beta_tilde")


SAMPLER_NAMES = [s for s in SAMPLERS.names() if s != "annealed_langevin"]


@pytest.mark.parametrize("process_name", ["vp", "ve"])
@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_sampler_reproduces_gaussian_and_improves_with_steps(sampler, process_name):
    if sampler == "ode_rk45":  # adaptive: the budget is the tolerance
        coarse, _ = run(process_name, sampler, 10, rtol=1e-1, atol=1e-1)
        fine, nfe = run(process_name, sampler, 10, rtol=1e-4, atol=1e-4)
    else:
        coarse, _ = run(process_name, sampler, 10)
        fine, nfe = run(process_name, sampler, 100)
        expected = {"ode_heun": 199, "pc": 200}.get(sampler, 100)
        assert nfe == expected
    coarse_mean, coarse_cov = moment_errors(coarse)
    mean_err, cov_err = moment_errors(fine)
    assert cov_err < coarse_cov or coarse_cov < 1.2 * FLOOR_COV
    assert mean_err < 3 * FLOOR_MEAN + 0.02
    assert cov_err < 2 * FLOOR_COV + 0.02


@pytest.mark.parametrize("sampler", ["ancestral", "euler_maruyama", "ode_heun", "dpm_solver_2m"])
def test_samplers_on_discrete_and_subvp_processes(sampler):
    for process_name in ("vp1000", "subvp"):
        x, _ = run(process_name, sampler, 200)
        mean_err, cov_err = moment_errors(x)
        assert mean_err < 3 * FLOOR_MEAN + 0.02 and cov_err < 2 * FLOOR_COV + 0.02, process_name


def test_samplers_run_from_plain_numbers():
    """No config anywhere, as from a notebook: processes from their schedules' numbers, times from a spacing, and
    three samplers called with their keyword options (pc with its paper's defaults) reproduce the Gaussian as
    through draw_samples above."""
    from diffusion.processes import continuous_process, vp_process
    from diffusion.schedules import geometric_sigma, linear_betas
    from diffusion.samplers import ddim, karras_spacing, ode_heun, predictor_corrector, uniform_spacing

    discrete = vp_process(linear_betas(1000))
    ve = continuous_process("ve", functools.partial(geometric_sigma, sigma_min=0.01, sigma_max=20.0))
    generator = torch.Generator().manual_seed(1)
    runs = [(ddim, discrete, uniform_spacing(discrete, 100), {"eta": 0.5}, 100),
            (ode_heun, ve, karras_spacing(ve, 100, rho=7.0), {"churn": 1.0}, 199),
            (predictor_corrector, ve, uniform_spacing(ve, 100), {}, 200)]
    for sampler, process, times, options, expected_nfe in runs:
        x_T = process.prior_sample((N, DIM), generator, "cpu")
        x, nfe = sampler(DATA.denoiser(process), x_T, times.float(), generator=generator, **options)
        mean_err, cov_err = moment_errors(x)
        assert nfe == expected_nfe, sampler.__name__
        assert mean_err < 3 * FLOOR_MEAN + 0.02, (sampler.__name__, mean_err)
        assert cov_err < 2 * FLOOR_COV + 0.02, (sampler.__name__, cov_err)


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_has_the_one_signature(name):
    """sampler(denoiser, x_T, timesteps, *, generator, callback=None, <its own options>): every own option keyword-only
    with a default, the default SampleConfig's value of the key of the same name (draw_samples reads it from there),
    or for ancestral's variance ModelConfig's (draw_samples gets model.variance)."""
    P = inspect.Parameter
    parameters = list(inspect.signature(SAMPLERS.get(name)).parameters.values())
    head = [(p.name, p.kind, p.default) for p in parameters[:5]]
    assert head == [("denoiser", P.POSITIONAL_OR_KEYWORD, P.empty), ("x_T", P.POSITIONAL_OR_KEYWORD, P.empty),
                    ("timesteps", P.POSITIONAL_OR_KEYWORD, P.empty), ("generator", P.KEYWORD_ONLY, P.empty),
                    ("callback", P.KEYWORD_ONLY, None)]
    defaults = {field.name: field.default for field in dataclasses.fields(SampleConfig)}
    for option in parameters[5:]:
        assert option.kind is P.KEYWORD_ONLY and option.default is not P.empty, option
        if (name, option.name) == ("ancestral", "variance"):
            assert option.default == ModelConfig().variance
        else:
            assert option.name in defaults and option.default == defaults[option.name], option


@pytest.mark.parametrize("name", SPACINGS.names())
def test_every_spacing_takes_numbers(name):
    """spacing(process, steps, <its own options>): each option with the default SampleConfig's value of its key."""
    parameters = list(inspect.signature(SPACINGS.get(name)).parameters.values())
    assert [p.name for p in parameters[:2]] == ["process", "steps"]
    defaults = {field.name: field.default for field in dataclasses.fields(SampleConfig)}
    assert all(p.default is not inspect.Parameter.empty and p.default == defaults.get(p.name) for p in parameters[2:])


def test_ddim_with_eta_one_is_ancestral_with_beta_tilde():
    """DDIM eq. 16 at eta = 1 has the posterior variance and the posterior mean, and draws noise at
    the same steps: with the same generator the two samplers agree draw for draw."""
    a, _ = run("vp1000", "ancestral", 50)
    b, _ = run("vp1000", "ddim", 50, eta=1.0)
    assert torch.allclose(a, b, atol=1e-4)


def test_one_ddim_step_is_the_closed_form_update():
    process = build_process(PROCESSES["vp1000"])
    denoiser = DATA.denoiser(process)
    x_t = torch.randn(8, DIM, generator=torch.Generator().manual_seed(0))
    t, s = 0.6, 0.3
    alpha_t, sigma_t = process.alpha(torch.tensor([t])).item(), process.sigma(torch.tensor([t])).item()
    alpha_s, sigma_s = process.alpha(torch.tensor([s])).item(), process.sigma(torch.tensor([s])).item()
    eps = denoiser.eps(x_t, torch.full((8,), t))
    expected = alpha_s * (x_t - sigma_t * eps) / alpha_t + sigma_s * eps  # Song et al. 2021 (DDIM), eq. 12
    captured = []
    SAMPLERS.get("ddim")(denoiser, x_t, torch.tensor([t, s]), generator=torch.Generator(), eta=0.0,
                         callback=lambda k, tt, x: captured.append(x))
    assert torch.allclose(captured[0], expected, atol=1e-5)


def test_annealed_langevin_reproduces_gaussian_and_improves_with_steps():
    cfg = ProcessConfig(name="ve", schedule="geometric", T=10, sigma_min=0.01, sigma_max=10.0)
    denoiser = DATA.denoiser(build_process(cfg))
    errors = []
    for steps in (5, 100):
        options = SampleConfig(sampler="annealed_langevin", batch_size=N, steps_per_level=steps, step_size=2e-5)
        x, nfe = draw_samples(denoiser, options, (DIM,), N, torch.Generator().manual_seed(1), "cpu")
        assert nfe == 10 * steps + 1
        errors.append(moment_errors(x))
    (_, cov_coarse), (mean_fine, cov_fine) = errors
    assert cov_fine < cov_coarse
    assert mean_fine < 3 * FLOOR_MEAN + 0.02 and cov_fine < 3 * FLOOR_COV


def test_final_denoising_step_removes_noise_variance():
    """Without the Tweedie step the samples keep about sigma_min^2 extra variance per dimension."""
    denoiser = DATA.denoiser(build_process(ProcessConfig(name="ve", schedule="geometric", T=10, sigma_min=0.3)))
    out = {}
    for denoise in (True, False):
        options = SampleConfig(sampler="annealed_langevin", batch_size=N, step_size=0.01, steps_per_level=20,
                               denoise=denoise)
        out[denoise], _ = draw_samples(denoiser, options, (DIM,), N, torch.Generator().manual_seed(1), "cpu")
    extra = (torch.cov(out[False].double().T).trace() - torch.cov(out[True].double().T).trace()) / DIM
    assert extra.item() > 0.5 * 0.3**2


def test_sde_coefficients_match_closed_forms():
    """VP-SDE: f = -beta(t)/2, g^2 = beta(t) with beta(t) = 0.1 + 19.9 t (Song et al. 2021, eq. 11);
    VE-SDE: f = 0, g^2 = d sigma^2 / dt = 2 sigma^2 log(sigma_max / sigma_min) (eq. 9); discrete vp:
    f ~ log(alpha_i / alpha_{i-1}) T, g^2 ~ T beta_i for large T."""
    t = torch.tensor([0.1, 0.5, 0.9])
    f, g2 = build_process(PROCESSES["vp"]).sde(t)
    beta = 0.1 + 19.9 * t
    assert torch.allclose(f, -beta / 2, rtol=1e-5) and torch.allclose(g2, beta, rtol=1e-5)
    ve = build_process(PROCESSES["ve"])
    f, g2 = ve.sde(t)
    assert torch.all(f == 0)
    assert torch.allclose(g2, 2 * ve.sigma(t) ** 2 * math.log(20.0 / 0.01), rtol=1e-4)
    discrete = build_process(PROCESSES["vp1000"])
    f, g2 = discrete.sde(torch.tensor([0.5]))
    _, beta_500 = discrete.transition(torch.tensor([0.499]), torch.tensor([0.5]))
    assert g2.item() == pytest.approx(1000 * beta_500.item(), rel=0.01)


def test_spacings():
    discrete = build_process(ProcessConfig(T=1000))
    as_index = lambda spacing, steps, **kw: (make_timesteps(discrete, SampleConfig(steps=steps, spacing=spacing, **kw))  # noqa: E731
                                             * 1000).round().long().tolist()
    assert as_index("uniform", 1000) == list(range(1000, 0, -1))
    assert as_index("uniform", 5) == [1000, 750, 500, 251, 1] or as_index("uniform", 5) == [1000, 750, 500, 250, 1]
    assert as_index("leading", 4) == [751, 501, 251, 1]  # DDIM / diffusers "leading", offset 1
    assert as_index("trailing", 4) == [1000, 750, 500, 250]
    quadratic = as_index("quadratic", 10)
    assert quadratic[0] == 1000 and quadratic[-1] == 1 and all(a > b for a, b in zip(quadratic, quadratic[1:]))
    gaps = [a - b for a, b in zip(quadratic, quadratic[1:])]
    assert gaps == sorted(gaps, reverse=True)  # dense near the data
    # karras: sigma~ = sigma / alpha follows (s_max^(1/7) + i/(K-1) (s_min^(1/7) - s_max^(1/7)))^7
    continuous = build_process(PROCESSES["ve"])
    times = make_timesteps(continuous, SampleConfig(steps=6, spacing="karras"))
    sigmas = continuous.sigma(times).double()
    i = torch.arange(6, dtype=torch.float64) / 5
    expected = (20.0 ** (1 / 7) + i * (continuous.sigma(torch.tensor([1e-3])).item() ** (1 / 7) - 20.0 ** (1 / 7))) ** 7
    assert torch.allclose(sigmas, expected, rtol=1e-4)
    assert set(SPACINGS.names()) == {"uniform", "leading", "trailing", "quadratic", "karras"}


def test_quadratic_spacing_is_its_docstring_and_ends_at_the_prior():
    """The times quadratic_spacing visits are the formulas its docstring displays, evaluated as written: quadratic in
    the step index from the smallest time up to t = 1 (DDIM's released code would stop at 0.8 T), in discrete and
    in continuous time."""
    import re

    doc = SPACINGS.get("quadratic").__doc__
    formula = {kind: re.search(rf"^\s*{kind}: t_j = (.+)$", doc, re.MULTILINE) for kind in ("continuous", "discrete")}
    assert all(formula.values()), "the docstring displays 'continuous: t_j = ...' and 'discrete: t_j = ...'"
    for kind, process, K in (("discrete", build_process(ProcessConfig(T=1000)), 10),
                             ("discrete", build_process(ProcessConfig(T=50)), 7),
                             ("continuous", build_process(PROCESSES["vp"]), 12)):
        j = torch.arange(K, dtype=torch.float64)
        names = {"j": j, "K": K, "T": process.T, "t_min": process.t_min, "round": torch.round}
        documented = torch.unique(eval(formula[kind].group(1), {}, names).float()).flip(0)
        visited = make_timesteps(process, SampleConfig(steps=K, spacing="quadratic"))
        assert torch.equal(visited, documented), (kind, process.T)
        assert visited[0] == 1 and visited[-1] == pytest.approx(process.t_min)


def _corrected(snr: float, n: int, t: float = 0.01, steps: int = 100):
    """Exact samples of q_t (vp, t = 0.01), then ``steps`` corrector steps of the pc sampler at t. Run as pc over the
    single time t: the corrector's steps, then the Tweedie step, whose one evaluation sees the corrector's output.
    Returns (q_t's variances along the data's eigenvectors, std / exact std along them, the corrector's step size
    e = 2 a (r mean ||z|| / mean ||score||)^2 on its output, a = alpha_t^2 for the step to 0)."""
    from diffusion.denoiser import Denoiser

    process = build_process(PROCESSES["vp"])
    exact = DATA.denoiser(process)
    generator = torch.Generator().manual_seed(0)
    tt = torch.full((n,), t)
    x_t = process.marginal(DATA.sample(n, generator), tt, torch.randn(n, DIM, generator=generator))
    alpha, sigma = process.alpha(tt[:1]).item(), process.sigma(tt[:1]).item()
    variances = alpha**2 * DATA.eigvals + sigma**2
    seen = {"calls": 0}

    def spy(x, time):  # the exact denoiser, keeping its last input
        seen.update(calls=seen["calls"] + 1, last=x)
        return exact.eps_fn(x, time)

    SAMPLERS.get("pc")(Denoiser(spy, process), x_t, torch.tensor([t]), generator=generator, snr=snr,
                       corrector_steps=steps)
    assert seen["calls"] == steps + 1
    x = seen["last"]
    std = ((x.double() - alpha * DATA.mean) @ DATA.eigvecs).std(0)
    noise = torch.randn(n, DIM, generator=torch.Generator().manual_seed(1))
    step = 2 * alpha**2 * (snr * noise.norm(dim=1).mean() / exact.score(x, tt).norm(dim=1).mean()).item() ** 2
    return variances, std / variances.sqrt(), step


def test_langevin_corrector_keeps_exact_marginal():
    """From exact q_t samples of the 16-D Gaussian (vp, t = 0.01: variances 0.052 to 1.0), 100 corrector steps at
    snr 0.02 keep every direction's std within 5% (Monte Carlo: 0.5% per direction with 20_000 samples; Langevin's
    discretization bias here is 0.1%). Measured: at most 1.3% off (the exact samples are up to 1.1% off); a step
    computed per example from its own norms widened the narrowest direction 1.18x."""
    variances, ratio, _ = _corrected(0.02, 20_000)
    assert (ratio - 1).abs().max() < 0.05, ratio


def test_langevin_corrector_at_default_snr_is_off_only_by_the_discretization():
    """At the default snr 0.16 no 5% bound can hold on this Gaussian for an unadjusted Langevin step of this size:
    with a step e shared by the batch, x <- (1 - e / v) x + sqrt(2 e) z along a direction of variance v, keeps that
    direction at v / (1 - e / (2 v)), a std 7.3% too wide on the narrowest direction (e = 0.0137). What is left to
    test is that this bias is all there is: every direction's std ratio is that prediction within 2.5% (Monte Carlo:
    0.5% per direction). Measured: 1.066 on the narrowest (predicted 1.073), at most 1.2% from the prediction; a
    step computed per example from its own norms widened the narrowest direction 1.49x."""
    variances, ratio, step = _corrected(0.16, 20_000)
    predicted = (1 / (1 - step / (2 * variances))).sqrt()
    assert (ratio - predicted).abs().max() < 0.025, (ratio, predicted)
    assert predicted.max() > 1.05  # the discretization's own bias, beyond 5%


@pytest.mark.parametrize("process_name", ["vp", "ve"])
def test_pc_error_falls_with_steps_to_the_monte_carlo_floor(process_name):
    """The pc sampler at the default snr 0.16: its covariance error falls as the steps grow and reaches the Monte
    Carlo floor of exact samples (0.065). Measured (seed 1): vp 0.43, 0.10, 0.056; ve 1.43, 0.153, 0.063 at 10, 30,
    100 steps. A step computed per example from its own norms stalled at 0.165 (vp) and 0.21 (ve), and on vp grew
    again by 300 steps (0.20)."""
    errors = [moment_errors(run(process_name, "pc", steps, snr=0.16)[0])[1] for steps in (10, 30, 100)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 1.25 * FLOOR_COV, (errors, FLOOR_COV)


def test_sampler_is_deterministic_given_generator():
    a, _ = run("vp", "euler_maruyama", 20, seed=5)
    b, _ = run("vp", "euler_maruyama", 20, seed=5)
    assert torch.equal(a, b)


def test_unknown_sampler_lists_names():
    with pytest.raises(Exception, match="ancestral, annealed_langevin, ddim"):
        SAMPLERS.get("foo")


@pytest.mark.parametrize("name", ["eps", "score", "x0", "v", "edm", "mean"])
def test_one_ddim_step_per_parameterization(name):
    """A network that predicts in parameterization `name` (here: the exact Gaussian answer written in it)
    takes the DDIM step x_s = alpha_s x0_hat + sigma_s eps_hat computed by hand from its raw output."""
    from diffusion.denoiser import network_denoiser
    from diffusion.parameterizations import PARAMETERIZATIONS

    process = build_process(PROCESSES["vp1000" if name == "mean" else "vp"])
    p = PARAMETERIZATIONS.get(name)

    oracle = DATA.oracle_network(process, p)
    x_t = torch.randn(8, DIM, generator=torch.Generator().manual_seed(3))
    t, s = 0.7, 0.4
    a_t, s_t = process.alpha(torch.tensor([t])).item(), process.sigma(torch.tensor([t])).item()
    a_s, s_s = process.alpha(torch.tensor([s])).item(), process.sigma(torch.tensor([s])).item()
    out = oracle(p.input_scale(torch.tensor(a_t), torch.tensor(s_t)) * x_t, torch.full((8,), t))
    # the raw output read by hand in each parameterization's own terms
    by_hand = {
        "eps": lambda: out,
        "score": lambda: -s_t * out,
        "x0": lambda: (x_t - a_t * out) / s_t,
        "v": lambda: (a_t * out + s_t * x_t) / (a_t**2 + s_t**2),
        "edm": lambda: (x_t - a_t * (0.25 / ((s_t / a_t) ** 2 + 0.25) * x_t / a_t
                                     + (s_t / a_t) * 0.5 / ((s_t / a_t) ** 2 + 0.25) ** 0.5 * out)) / s_t,
    }
    if name == "mean":  # mu~ = c_t x_t + c_0 x0 for the step from t back to t - 1/T (Ho et al. 2020, eq. 7)
        a_p, s_p = process.alphas[699].item(), process.sigmas[699].item()
        a_ts, var_ts = a_t / a_p, s_t**2 - (a_t / a_p) ** 2 * s_p**2
        c_t, c_0 = a_ts * s_p**2 / s_t**2, a_p * var_ts / s_t**2
        by_hand["mean"] = lambda: (x_t - a_t * (out - c_t * x_t) / c_0) / s_t
    eps = by_hand[name]()
    expected = a_s * (x_t - s_t * eps) / a_t + s_s * eps
    captured = []
    SAMPLERS.get("ddim")(network_denoiser(oracle, p, process), x_t, torch.tensor([t, s]),
                         generator=torch.Generator(), eta=0.0, callback=lambda k, tt, x: captured.append(x))
    assert torch.allclose(captured[0], expected, atol=1e-4)
