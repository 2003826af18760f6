"""Inverse-problem solvers driven by the exact denoiser of Gaussian data, against closed forms.

For Gaussian data N(mu, C) and the exact denoiser, x0_hat(x_t) is affine in x_t, so every step of both
solvers is an affine map plus Gaussian noise, and the law of their output is Gaussian with a mean and
covariance computed here by a matrix recursion (:func:`solver_law`). The samples are checked against
that law (the implementation does what it says), and the law against the true posterior (what the method
achieves). Measured on DATA (dim 8, seed 0), half the coordinates hidden, 200 steps, in conditional
standard deviations of the hidden coordinates: the mean of ``replacement`` is off by 0.41, that of
``likelihood`` by 0.15 (0.15 at 1000 steps too: a bias of the method, not of the step count). Neither samples
the inpainting posterior of correlated data: replacement conditions the hidden entries on a noisy copy of
y, and the likelihood solver's variance r_t^2 I is Cov(x0 | x_t) only for C = I. Where the theory says a
solver is exact, its samples match the true posterior: the denoising projection on any Gaussian, the
likelihood solver on data with covariance I.
"""
import copy
import math

import pytest
import torch

from diffusion.analytic import GaussianData
from diffusion.config import ProcessConfig, SampleConfig
from diffusion.denoiser import Denoiser
from diffusion.errors import ConfigError
from diffusion.inverse import (INVERSE_SOLVERS, Denoising, Inpainting, conjugate_gradients, make_mask, psnr,
                               restoration_grid, ssim)
from diffusion.factory import build_process
from diffusion.processes import expand
from diffusion.factory import make_timesteps

DIM, N = 8, 4000
PROCESS = build_process(ProcessConfig(name="vp", T=1000))
DATA = GaussianData.random(DIM, seed=0)
IDENTITY = GaussianData.random(DIM, seed=0, min_var=1.0, max_var=1.0)  # covariance I, mean as DATA's
OBSERVED = make_mask("half", (DIM,))
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of steps on [4000, 8] tensors: intra-op threads only spin, and on a busy 2-core machine they
    made this module 5x slower (50 s against 10 s). One thread here, the previous count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


Z_MAX = 4.5  # max over <= 36 means or covariance entries of |N(0, 1)|: exceeded with probability < 3e-4


def solve(name, data, measurement, y, steps=None, n=N, seed=1):
    timesteps = make_timesteps(PROCESS, SampleConfig(steps=steps))
    x, nfe = INVERSE_SOLVERS.get(name)(data.denoiser(PROCESS), measurement, y.expand(n, DIM).clone(), timesteps,
                                       generator=torch.Generator().manual_seed(seed))
    return x.double(), nfe


def measure(data, measurement, seed=7):
    x0 = data.sample(1, torch.Generator().manual_seed(seed))
    return measurement.observe(x0, torch.Generator().manual_seed(seed + 1))[0]


def z_max(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> float:
    """The largest |sample mean - mean| in Monte Carlo standard errors."""
    return ((x.mean(0) - mean) / (cov.diag() / x.shape[0]).sqrt()).abs().max().item()


def cov_z_max(x: torch.Tensor, cov: torch.Tensor) -> float:
    """The largest |sample covariance - cov| in Monte Carlo standard errors, Var(S_ij) = (C_ij^2 + C_ii C_jj) / n
    for Gaussian samples."""
    se = ((cov**2 + torch.outer(cov.diag(), cov.diag())) / x.shape[0]).sqrt()
    return ((torch.cov(x.T) - cov) / se).abs().max().item()


def conditional(data, observed, y):
    """x0_h | x0_o = y_o: N(mu_h + C_ho C_oo^-1 (y_o - mu_o), C_hh - C_ho C_oo^-1 C_oh)."""
    o, h, C = observed, ~observed, data.cov
    gain = C[h][:, o] @ torch.linalg.inv(C[o][:, o])
    return data.mean[h] + gain @ (y[o].double() - data.mean[o]), C[h][:, h] - gain @ C[o][:, h]


def coefficients(t: float) -> tuple[float, float]:
    t64 = torch.tensor([t], dtype=torch.float64)
    return PROCESS.alpha(t64).item(), PROCESS.sigma(t64).item()


def solver_law(data, observed, y, timesteps, solver):
    """Mean and covariance of an inpainting solver's output for Gaussian data. x0_hat = b + J x with
    J = alpha C (alpha^2 C + sigma^2 I)^-1; the likelihood solver adds (sigma^2 / (alpha V)) J P (y - x0_hat)
    (V = r_t^2, P the observed projection); a step is x_s = c_t x_t + c_0 x0_est + sqrt(v) z; replacement
    then sets the observed block to alpha_s y + sigma_s z (y at s = 0)."""
    eye, P = torch.eye(DIM, dtype=torch.float64), torch.diag(observed.double())
    y, mu, C = y.double(), data.mean, data.cov
    mean, cov = torch.zeros(DIM, dtype=torch.float64), coefficients(1.0)[1] ** 2 * eye
    times = timesteps.tolist() + [0.0]
    for t, s in zip(times[:-1], times[1:]):
        alpha, sigma = coefficients(t)
        J = alpha * C @ torch.linalg.inv(alpha**2 * C + sigma**2 * eye)
        b, M = mu - alpha * J @ mu, J
        if solver == "likelihood":
            k = sigma**2 / alpha / (sigma**2 / (alpha**2 + sigma**2))
            b, M = b + k * J @ P @ (y - b), M - k * J @ P @ J
        if s == 0:
            mean, cov = b + M @ mean, M @ cov @ M.T
        else:
            c_t, c_0, v = (c.item() for c in PROCESS.posterior_coefficients(torch.tensor([s]), torch.tensor([t])))
            step = c_t * eye + c_0 * M
            mean, cov = step @ mean + c_0 * b, step @ cov @ step.T + v * eye
        if solver == "replacement":
            alpha_s, sigma_s = coefficients(s) if s > 0 else (1.0, 0.0)
            mean = (eye - P) @ mean + alpha_s * P @ y
            cov = (eye - P) @ cov @ (eye - P) + sigma_s**2 * P
    return mean, cov


# measured bias of each solver's exact law: |mean - conditional mean| / conditional std, max over coordinates
INPAINTING_BIAS = {"replacement": (0.35, 0.45), "likelihood": (0.10, 0.20)}  # measured 0.410, 0.154


@pytest.mark.parametrize("solver", ["replacement", "likelihood"])
def test_inpainting_samples_follow_the_solver_law_and_its_measured_bias(solver):
    measurement = Inpainting(OBSERVED)
    y = measure(DATA, measurement)
    x, nfe = solve(solver, DATA, measurement, y, steps=200)
    mean, cov = solver_law(DATA, OBSERVED, y, make_timesteps(PROCESS, SampleConfig(steps=200)), solver)
    h = ~OBSERVED
    assert nfe == 200
    assert z_max(x[:, h], mean[h], cov[h][:, h]) < Z_MAX
    assert cov_z_max(x[:, h], cov[h][:, h]) < Z_MAX
    true_mean, true_cov = conditional(DATA, OBSERVED, y)
    bias = ((mean[h] - true_mean) / true_cov.diag().sqrt()).abs().max().item()
    low, high = INPAINTING_BIAS[solver]
    assert low < bias < high, bias
    if solver == "replacement":
        assert torch.equal(x[:, OBSERVED].float(), y[OBSERVED].expand(N, -1))


def test_likelihood_solver_is_exact_when_the_posterior_covariance_is_isotropic():
    """For N(mu, I), Cov(x0 | x_t) = r_t^2 I: the likelihood solver samples the exact posterior."""
    inpainting = Inpainting(OBSERVED)
    y = measure(IDENTITY, inpainting)
    x, _ = solve("likelihood", IDENTITY, inpainting, y)
    assert (x[:, OBSERVED] - y[OBSERVED]).abs().max() < 1e-5
    h, eye = ~OBSERVED, torch.eye(DIM // 2, dtype=torch.float64)
    assert z_max(x[:, h], IDENTITY.mean[h], eye) < Z_MAX
    assert cov_z_max(x[:, h], eye) < Z_MAX

    denoising = Denoising(0.5)
    y = measure(IDENTITY, denoising)
    x, _ = solve("likelihood", IDENTITY, denoising, y)
    mean, cov = IDENTITY.mean + (y.double() - IDENTITY.mean) / 1.25, torch.eye(DIM, dtype=torch.float64) * 0.25 / 1.25
    assert z_max(x, mean, cov) < Z_MAX
    assert cov_z_max(x, cov) < Z_MAX


def test_denoising_projection_samples_the_exact_posterior():
    """Started at t* (sigma / alpha = sigma_y) from alpha(t*) y, the reverse process samples p(x0 | y):
    mean mu + C (C + sigma_y^2 I)^-1 (y - mu), covariance C - C (C + sigma_y^2 I)^-1 C."""
    sigma_y = 0.5
    measurement = Denoising(sigma_y)
    y = measure(DATA, measurement)
    x, nfe = solve("replacement", DATA, measurement, y)
    t_star = measurement.start_time(PROCESS)
    alpha, sigma = coefficients(t_star)
    assert sigma / alpha == pytest.approx(sigma_y, rel=1e-4)
    assert nfe == 1 + int((make_timesteps(PROCESS, SampleConfig()) < t_star).sum())  # 146 of 1000
    gain = DATA.cov @ torch.linalg.inv(DATA.cov + sigma_y**2 * torch.eye(DIM, dtype=torch.float64))
    mean, cov = DATA.mean + gain @ (y.double() - DATA.mean), DATA.cov - gain @ DATA.cov
    assert z_max(x, mean, cov) < Z_MAX
    assert cov_z_max(x, cov) < Z_MAX


def test_tweedie_inpainting_recovers_the_conditional_gaussian_mean():
    """With Tweedie's covariance the conditional score is exact for Gaussian data: the inpainted samples have the
    conditional Gaussian's mean (measured: 0.008 conditional std, 0.5 standard errors) and covariance (3.5 standard
    errors at 200 steps: the steps' bias, 2.5 at 1000), and the observed entries are y."""
    measurement = Inpainting(OBSERVED)
    y = measure(DATA, measurement)
    x, nfe = solve("tweedie", DATA, measurement, y, steps=200)
    assert nfe == 200 * 12  # forward pass, 10 CG products, the final product
    h = ~OBSERVED
    mean, cov = conditional(DATA, OBSERVED, y)
    assert z_max(x[:, h], mean, cov) < Z_MAX
    assert ((x[:, h].mean(0) - mean) / cov.diag().sqrt()).abs().max() < 0.05  # replacement 0.41, likelihood 0.15
    assert cov_z_max(x[:, h], cov) < 6
    assert (x[:, OBSERVED] - y[OBSERVED]).abs().max() < 1e-5


def test_tweedie_denoising_samples_the_exact_posterior():
    """Measured at 1000 steps: mean within 2.1, covariance within 3.0 standard errors (5.0 at 200 steps)."""
    measurement = Denoising(0.5)
    y = measure(DATA, measurement)
    x, _ = solve("tweedie", DATA, measurement, y, n=2000)
    gain = DATA.cov @ torch.linalg.inv(DATA.cov + 0.25 * torch.eye(DIM, dtype=torch.float64))
    mean, cov = DATA.mean + gain @ (y.double() - DATA.mean), DATA.cov - gain @ DATA.cov
    assert z_max(x, mean, cov) < Z_MAX
    assert cov_z_max(x, cov) < Z_MAX


def test_conjugate_gradients_solves_a_batch_of_spd_systems():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    spd = m @ m.transpose(1, 2) + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(3, 6, generator=g, dtype=torch.float64)
    w = conjugate_gradients(lambda v: (spd @ v[..., None])[..., 0], b, iterations=6)
    assert torch.allclose(w, torch.linalg.solve(spd, b), atol=1e-8)
    partial = conjugate_gradients(lambda v: (spd @ v[..., None])[..., 0], b, iterations=2)
    assert not torch.allclose(partial, w, atol=1e-3)
    # an indefinite operator (a network's Jacobian need not be positive): the example that meets negative curvature
    # keeps its last iterate, finite; the others are solved
    indefinite = spd.clone()
    indefinite[1] = -spd[1]
    w = conjugate_gradients(lambda v: (indefinite @ v[..., None])[..., 0], b, iterations=6)
    assert torch.isfinite(w).all() and torch.equal(w[1], torch.zeros(6, dtype=torch.float64))
    assert torch.allclose(w[[0, 2]], torch.linalg.solve(spd[[0, 2]], b[[0, 2]]), atol=1e-8)


@pytest.mark.parametrize("solver", ["replacement", "likelihood", "tweedie"])
def test_solvers_on_images_keep_the_observed_pixels_and_count_calls(solver):
    mask = make_mask("centre", (3, 8, 8))
    measurement = Inpainting(mask)
    truth = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = measurement.observe(truth)

    def standard_normal_eps(x_t, t):  # the exact E[eps | x_t] for data N(0, I)
        alpha, sigma = expand(PROCESS.alpha(t), x_t), expand(PROCESS.sigma(t), x_t)
        return sigma * x_t / (alpha**2 + sigma**2)

    denoiser = Denoiser(standard_normal_eps, PROCESS, cost=2)
    timesteps = make_timesteps(PROCESS, SampleConfig(steps=20))
    x, nfe = INVERSE_SOLVERS.get(solver)(denoiser, measurement, y, timesteps, generator=torch.Generator().manual_seed(1))
    assert x.shape == truth.shape and nfe == 40 * (12 if solver == "tweedie" else 1)
    if solver == "replacement":
        assert torch.equal(x[:, mask], truth[:, mask])
    else:  # the last step's x0_hat + (sigma^2 / (alpha r^2)) J (y - x0_hat) is y where J = alpha / (alpha^2 + sigma^2)
        assert torch.allclose(x[:, mask], truth[:, mask], atol=1e-5)


def test_measurements():
    x0 = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    mask = make_mask("half", (3, 4, 4))
    assert torch.equal(Inpainting(mask).observe(x0), torch.where(mask, x0, torch.zeros(())))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(Denoising(0.3).observe(x0, torch.Generator().manual_seed(5)), x0 + 0.3 * noise)
    with pytest.raises(ConfigError):
        Denoising(0.0)


def test_solver_registry_and_refusals():
    assert INVERSE_SOLVERS.names() == ["likelihood", "replacement", "tweedie"]
    with pytest.raises(ConfigError, match="eval.inverse_solver"):
        INVERSE_SOLVERS.get("gibbs")
    per_dimension = copy.copy(PROCESS)
    per_dimension.per_dimension = True  # alpha, sigma per data dimension (a blur process): masks do not apply
    with pytest.raises(ConfigError, match="process.name"):
        INVERSE_SOLVERS.get("likelihood")(DATA.denoiser(per_dimension), Denoising(0.5), torch.zeros(2, DIM),
                                          make_timesteps(PROCESS, SampleConfig(steps=5)), generator=torch.Generator())
    from diffusion.inverse import solve_heldout

    images, timesteps = torch.zeros(2, 1, 4, 4), make_timesteps(PROCESS, SampleConfig(steps=5))
    with pytest.raises(ValueError, match="stage must be one of inpaint, denoise, got 'deblur'"):
        solve_heldout("deblur", DATA.denoiser(PROCESS), images, timesteps, torch.Generator())
    with pytest.raises(ValueError, match="solver must be one of likelihood, replacement, tweedie, got 'dps'"):
        solve_heldout("inpaint", DATA.denoiser(PROCESS), images, timesteps, torch.Generator(), solver="dps")


# --- masks ------------------------------------------------------------------------------------------
def test_masks_hide_what_they_claim():
    centre = make_mask("centre", (3, 8, 8))
    expected = torch.ones(3, 8, 8, dtype=torch.bool)
    expected[:, 2:6, 2:6] = False
    assert torch.equal(centre, expected)
    assert torch.equal(make_mask("centre", (8,)), torch.tensor([1, 1, 0, 0, 0, 0, 1, 1], dtype=torch.bool))

    half = make_mask("half", (2, 4, 6))
    assert half[..., :3].all() and not half[..., 3:].any()
    assert torch.equal(make_mask("half", (8,)), torch.arange(8) < 4)

    fraction, positions = 0.3, 64 * 64
    random = make_mask("random", (3, 64, 64), torch.Generator().manual_seed(0), fraction=fraction)
    assert torch.equal(random[0], random[1]) and torch.equal(random[0], random[2])  # per pixel position
    hidden = (~random[0]).float().mean().item()
    assert abs(hidden - fraction) < 4 * math.sqrt(fraction * (1 - fraction) / positions)
    again = make_mask("random", (3, 64, 64), torch.Generator().manual_seed(0), fraction=fraction)
    assert torch.equal(random, again)


def test_unknown_mask_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="eval.inverse_mask") as error:
        make_mask("stripes", (3, 8, 8))
    assert error.value.value == "stripes" and error.value.accepted == "centre, random or half"


# --- metrics ----------------------------------------------------------------------------------------
def test_psnr_closed_form():
    ref = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    signs = torch.where(torch.arange(64).reshape(1, 1, 8, 8) % 2 == 0, 1.0, -1.0)
    x = ref + torch.tensor([0.1, 0.2, 0.0]).reshape(3, 1, 1, 1) * signs
    expected = torch.tensor([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.04), math.inf], dtype=torch.float64)
    assert torch.allclose(psnr(x, ref), expected, atol=1e-4)
    assert psnr(x, ref, data_range=1.0)[0].item() == pytest.approx(10 * math.log10(1 / 0.01), abs=1e-4)


@pytest.mark.parametrize("side,window", [(16, 11), (8, 7)])
def test_ssim_identity_and_luminance_of_a_constant_shift(side, window):
    """ssim(x, x) = 1; against x + c the variances and covariance agree, so SSIM is the mean over window
    positions of the luminance term (2 m (m + c) + C1) / (m^2 + (m + c)^2 + C1), m the local Gaussian mean."""
    x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.6 - 0.8
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-12)
    c, c1 = 0.15, (0.01 * 2.0) ** 2
    g = torch.tensor([math.exp(-((i - (window - 1) / 2) ** 2) / (2 * 1.5**2)) for i in range(window)], dtype=torch.float64)
    w = torch.outer(g, g) / g.sum() ** 2
    terms = []
    for i in range(side - window + 1):
        for j in range(side - window + 1):
            m = (x[:, :, i:i + window, j:j + window] * w).sum((-1, -2))  # [B, C]
            terms.append((2 * m * (m + c) + c1) / (m**2 + (m + c) ** 2 + c1))
    expected = torch.stack(terms, -1).mean((1, 2))
    assert torch.allclose(ssim(x + c, x), expected, atol=1e-10)
    assert torch.allclose(ssim(x, x + c), expected, atol=1e-10)
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noisier = x + 0.6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert (ssim(noisier, x) < ssim(noisy, x)).all() and (ssim(noisy, x) < 1).all()


def test_restoration_grid_rows():
    images = [torch.full((5, 1, 8, 8), v) for v in (-1.0, 0.0, 1.0)]
    grid = restoration_grid(*images, nrow=4)
    assert grid.shape == (3, 3 * 9 + 1, 4 * 9 + 1)
    assert grid[:, 1:9, 1:9].eq(0.0).all() and grid[:, 10:18, 1:9].eq(0.5).all() and grid[:, 19:27, 1:9].eq(1.0).all()


def test_config_checks_of_the_inverse_stages():
    import dataclasses

    from diffusion.config import DataConfig, EvalConfig, ModelConfig, TrialConfig
    from diffusion.validation import validate

    def trial(**changes):
        cfg = TrialConfig(eval=EvalConfig(inverse=["inpaint", "denoise"]))
        for section, values in changes.items():
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})
        return cfg

    validate(trial())
    validate(trial(eval={"inverse_solver": "tweedie", "inverse_mask": "random"}))
    for key, changes in [
        ("eval.inverse", {"eval": {"inverse": ["deblur"]}}),
        ("eval.inverse", {"eval": {"inverse": ["inpaint", "inpaint"]}}),
        ("eval.inverse", {"process": {"name": "blur"}}),
        ("eval.inverse", {"data": {"name": "moons"}, "model": {"arch": "mlp"}}),
        ("eval.inverse", {"model": {"class_conditional": True}}),
        ("eval.inverse_solver", {"eval": {"inverse_solver": "dps"}}),
        ("eval.inverse_mask", {"eval": {"inverse_mask": "square"}}),
        ("eval.inverse_sigma_y", {"eval": {"inverse_sigma_y": 0.0}}),
        ("eval.inverse_cg_iterations", {"eval": {"inverse_cg_iterations": 0}}),
    ]:
        with pytest.raises(ConfigError) as error:
            validate(trial(**changes))
        assert error.value.key == key, (changes, error.value)
    validate(trial(eval={"inverse": []}, process={"name": "blur"}))  # no stages: nothing to check
