"""Blur diffusion (Lee et al. 2022): its per-frequency marginals against the forward chain run step by step in pixel
space, its reduction to the VP process without blur, exact sampling of a Gaussian data set through the generic
samplers, the configuration checks, and a small model trained and sampled end to end."""
import dataclasses
import math

import pytest
import torch

from diffusion.blur import BLUR_SCHEDULES, BlurProcess, blur_exponents
from diffusion.config import DataConfig, ModelConfig, ProcessConfig, SampleConfig, TrainConfig, TrialConfig
from diffusion.validation import validate
from diffusion.data import load_dataset
from diffusion.degradations import blur, dct_matrix
from diffusion.denoiser import Denoiser
from diffusion.errors import ConfigError
from diffusion.factory import build_process
from diffusion.factory import draw_samples, make_timesteps
from diffusion.families import BlurFamily
from diffusion.training import build_trainer

SHAPE = (1, 8, 8)


def blur_config(**options) -> ProcessConfig:
    return ProcessConfig(**{"name": "blur", "T": 50, "blur_sigma": 0.6, "blur_f_max": 1.0, **options})


@pytest.mark.parametrize("schedule", ["quartic", "log", "linear"])
def test_marginal_mean_is_the_forward_chain_of_blurs(schedule):
    """E[x_i | x0] of the closed form (alpha per frequency) against the chain of i forward steps in pixel space, each
    sqrt(1 - beta_j) times a Gaussian blur of std blur_sigma sqrt(f(j)) (D^f(j): the blur of degradations.blur);
    and the noise variance 1 - alpha_k^2 against the recursion v_i = a_i v_{i-1} + (1 - a_i) per frequency."""
    cfg = blur_config(blur_schedule=schedule)
    process = build_process(cfg, SHAPE)
    alphabar = build_process(dataclasses.replace(cfg, name="vp")).alphas.double() ** 2
    betas = 1 - alphabar[1:] / alphabar[:-1]
    i = torch.arange(1, cfg.T + 1, dtype=torch.float64)
    f = cfg.blur_f_max * {"quartic": (i / cfg.T) ** 4, "log": i.log() / math.log(cfg.T), "linear": i / cfg.T}[schedule]
    x0 = torch.rand((3, *SHAPE), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    mean = x0.clone()
    for step in range(1, cfg.T + 1):
        mean = (1 - betas[step - 1]).sqrt() * blur(mean, cfg.blur_sigma * f[step - 1].sqrt().item())
        if step in (1, 10, 37, cfg.T):
            t = torch.full((3,), step / cfg.T)
            closed = process.from_basis(process.alpha(t).double() * process.to_basis(x0))
            assert torch.allclose(closed, mean, atol=2e-6), (schedule, step)
    # variances: one step's factor a_j = (1 - beta_j) d^(2 f(j)) per frequency, from the DCT of the blur itself
    rows = dct_matrix(SHAPE[-1])
    d = torch.diagonal(rows @ blur(torch.eye(SHAPE[-1], dtype=torch.float64)[None, None], cfg.blur_sigma)[0, 0] @ rows.T)
    d2 = d[:, None] * d[None, :]  # separable: factor of frequency (k_h, k_w)
    variance = torch.zeros_like(d2)
    for step in range(1, cfg.T + 1):
        a = (1 - betas[step - 1]) * d2 ** (2 * f[step - 1])
        variance = a * variance + (1 - a)
    last = process.sigma(torch.ones(1)).double()[0, 0] ** 2
    assert torch.allclose(last, variance, atol=1e-6)
    assert torch.allclose(blur_exponents(cfg)[-1], f.sum())


def test_high_frequencies_lose_their_signal_first():
    process = build_process(blur_config(), SHAPE)
    alpha = process.alpha(torch.tensor([0.6]))[0, 0]
    assert alpha[0, 0] > alpha[0, 4] > alpha[4, 4] > alpha[7, 7]
    assert alpha[7, 7] < 0.2 * alpha[0, 0]
    # the DC coefficient (the image mean) is never blurred: it follows the VP schedule
    vp = build_process(dataclasses.replace(blur_config(), name="vp"))
    t = torch.linspace(0.02, 1, 50)
    assert torch.allclose(process.alpha(t)[:, 0, 0, 0], vp.alpha(t))
    # the transition of one step is a blur times sqrt(1 - beta), with the forward noise making up the variance
    s, t = torch.tensor([0.5]), torch.tensor([0.52])
    a_ts, var_ts = process.transition(s, t)
    assert torch.allclose(a_ts, (process.alpha(t) / process.alpha(s)).double(), rtol=1e-5)
    assert torch.allclose(var_ts, process.sigma(t).double() ** 2 - a_ts**2 * process.sigma(s).double() ** 2)
    assert (var_ts > 0).all()


def eps_fn_pixels(x, t):
    """Any smooth function of (x, t) standing in for a network in pixel space."""
    return torch.tanh(0.7 * x + 0.2 * x.roll(1, -1)) * (0.5 + t.reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("sampler, eta", [("ancestral", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_no_blur_is_the_vp_process_sample_for_sample(sampler, eta):
    """blur_sigma 0: the same samples as the VP process for the same seed and the same model (the model seen from
    the DCT basis, noise drawn in pixel space and rotated)."""
    cfg = blur_config(blur_sigma=0.0)
    blurred, vp = build_process(cfg, SHAPE), build_process(dataclasses.replace(cfg, name="vp"))
    options = SampleConfig(sampler=sampler, eta=eta, steps=20, batch_size=16)
    models = {
        "vp": Denoiser(eps_fn_pixels, vp),
        "blur": Denoiser(lambda u, t: blurred.to_basis(eps_fn_pixels(blurred.from_basis(u), t)), blurred),
    }
    samples = {name: draw_samples(model, options, SHAPE, 16, torch.Generator().manual_seed(3), "cpu")[0]
               for name, model in models.items()}
    assert torch.allclose(samples["blur"], samples["vp"], atol=1e-4)
    assert samples["vp"].std() > 0.1
    # with blur, the samples differ
    blurry = Denoiser(lambda u, t: models["blur"].eps_fn(u, t), build_process(blur_config(), SHAPE))
    other = draw_samples(blurry, options, SHAPE, 16, torch.Generator().manual_seed(3), "cpu")[0]
    assert (other - samples["vp"]).abs().max() > 0.05


class GaussianImages:
    """x0 ~ N(mu, C) for images [1, 4, 4], with the exact E[eps | u_t] of the per-frequency process in the DCT basis:
    u_t = A u0 + S eps (A, S diagonal) gives E[eps | u_t] = S (A C' A + S^2)^-1 (u_t - A mu'), C' = U^T C U."""

    shape = (1, 4, 4)

    def __init__(self, process: BlurProcess, seed=0):
        g = torch.Generator().manual_seed(seed)
        D = 16
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
        self.mean = 0.3 * torch.randn(D, generator=g, dtype=torch.float64)
        self.cov = q @ torch.diag(torch.linspace(0.02, 0.8, D, dtype=torch.float64)) @ q.T
        basis = torch.stack([process.to_basis(e.reshape(1, *self.shape)).flatten() for e in torch.eye(D, dtype=torch.float64)])
        self.basis = basis  # row j: the DCT of pixel basis vector j, so u = x @ basis
        self.mean_u, self.cov_u = self.mean @ basis, basis.T @ self.cov @ basis
        self.process = process

    def eps(self, u, t):
        a = self.process.alpha(t).double().flatten(1)
        s = self.process.sigma(t).double().flatten(1)
        flat = u.double().flatten(1)
        cov = a[:, :, None] * self.cov_u * a[:, None, :] + torch.diag_embed(s**2)
        solved = torch.linalg.solve(cov, (flat - a * self.mean_u)[..., None])[..., 0]
        return (s * solved).reshape(u.shape).to(u.dtype)


def test_exact_model_samples_the_data_through_the_generic_samplers(sampler="ddim"):
    """With the exact per-frequency denoiser, 200 steps of T = 1000 give the data's mean and covariance. Measured
    (3000 samples): largest covariance error 0.039 (ddim; ancestral 0.058), against 0.032 for the VP process
    (blur_sigma 0) at the same settings: Monte Carlo error (about 0.01 per entry) and the steps' bias. (Ancestral
    sampling is checked against the VP process sample for sample above.)"""
    process = build_process(blur_config(T=1000, blur_sigma=1.0), GaussianImages.shape)
    data = GaussianImages(process)
    denoiser = Denoiser(data.eps, process)
    options = SampleConfig(sampler=sampler, steps=200, batch_size=3000)
    x, nfe = draw_samples(denoiser, options, data.shape, 3000, torch.Generator().manual_seed(0), "cpu")
    assert nfe == 200
    flat = x.double().flatten(1)
    std = data.cov.diagonal().sqrt()
    # Monte Carlo: the standard error of each mean is std / sqrt(3000) = 0.018 std; 5 standard errors
    assert ((flat.mean(0) - data.mean).abs() / std).max() < 5 / math.sqrt(3000)
    assert (torch.cov(flat.T) - data.cov).abs().max() < 0.07
    # the same model read with one alpha and sigma for every frequency (the VP process's) does not
    vp = build_process(blur_config(T=1000, blur_sigma=0.0), data.shape)
    x, _ = draw_samples(Denoiser(data.eps, vp), options, data.shape, 3000, torch.Generator().manual_seed(0), "cpu")
    assert (torch.cov(x.double().flatten(1).T) - data.cov).abs().max() > 0.1  # measured: 0.12


def trial(**process) -> TrialConfig:
    return TrialConfig(
        data=DataConfig(name="digits"), process=blur_config(T=100, **process),
        model=ModelConfig(channels=16, channel_mult=[1], attention=False, groups=4),
        train=TrainConfig(steps=30, batch_size=32, log_every=10), sample=SampleConfig(n=8, batch_size=8, steps=10))


def test_config_accepts_blur_and_names_what_it_refuses():
    validate(trial())
    validate(dataclasses.replace(trial(), model=ModelConfig(parameterization="x0")))
    bad = [
        ("process.T", dataclasses.replace(trial(), process=blur_config(T="continuous"))),
        ("process.blur_schedule", dataclasses.replace(trial(), process=blur_config(blur_schedule="cubic"))),
        ("process.blur_sigma", dataclasses.replace(trial(), process=blur_config(blur_sigma=-1.0))),
        ("process.schedule", dataclasses.replace(trial(), process=blur_config(schedule="geometric"))),
        ("data.name", dataclasses.replace(trial(), data=DataConfig(name="moons"))),
        ("sample.sampler", dataclasses.replace(trial(), sample=SampleConfig(sampler="ode_heun"))),
        ("model.parameterization", dataclasses.replace(trial(), model=ModelConfig(parameterization="edm"))),
        ("loss.weighting", dataclasses.replace(trial(), loss=dataclasses.replace(trial().loss, weighting="elbo"))),
    ]
    for key, cfg in bad:
        with pytest.raises(ConfigError) as error:
            validate(cfg)
        assert error.value.key == key, (key, error.value)
    assert "log" in BLUR_SCHEDULES.names() and "quartic" in BLUR_SCHEDULES.names()


def test_trains_and_samples_digits():
    cfg = trial()
    dataset = load_dataset(cfg.data)
    trainer = build_trainer(cfg, dataset)
    assert isinstance(trainer.family, BlurFamily)
    history = trainer.train()
    assert all(math.isfinite(r.loss) for r in history) and history[-1].loss < history[0].loss
    samples, nfe = trainer.sample(8, seed=1)
    assert samples.shape == (8, *dataset.shape) and torch.isfinite(samples).all() and nfe == 10
    assert trainer.likelihood_note and "blur" in trainer.likelihood_note
    # the training loss is the pixel-space eps error: the DCT is orthonormal
    x = dataset.train[:4]
    assert torch.allclose(trainer.process.from_basis(trainer.process.to_basis(x)), x, atol=1e-5)
    assert torch.allclose(trainer.process.to_basis(x).pow(2).sum(), x.pow(2).sum(), rtol=1e-5)
    assert make_timesteps(trainer.process, cfg.sample).numel() == 10


def test_class_conditional_blur_model_with_classifier_free_guidance():
    """Conditioning and classifier-free guidance pass through the DCT basis: the guided eps_hat of the doubled batch
    is eps_u + s (eps_c - eps_u) of two separate calls, scale 0 is the null-label model; a conditional model with
    label dropout trains, and guided sampling costs two network evaluations per step."""
    cfg = dataclasses.replace(trial(), model=dataclasses.replace(trial().model, class_conditional=True),
                              train=dataclasses.replace(trial().train, cond_dropout=0.2),
                              sample=dataclasses.replace(trial().sample, guidance_scale=2.5))
    validate(cfg)
    dataset = load_dataset(cfg.data)
    trainer = build_trainer(cfg, dataset)
    history = trainer.train()
    assert all(math.isfinite(r.loss) for r in history)
    labels = torch.arange(6) % 10
    u = torch.randn(6, *dataset.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((6,), 40)
    with torch.no_grad():
        eps_c, eps_u = trainer.ema_denoiser(labels, 1.0).eps(u, t), trainer.ema_denoiser(None, 1.0).eps(u, t)
        guided = trainer.ema_denoiser(labels, 2.5)
        assert torch.allclose(guided.eps(u, t), eps_u + 2.5 * (eps_c - eps_u), atol=1e-5)
        assert torch.allclose(trainer.ema_denoiser(labels, 0.0).eps(u, t), eps_u, atol=1e-6)
        assert not torch.allclose(eps_c, eps_u, atol=1e-3)  # the labels reach the network
    samples, nfe = trainer.sample(10, seed=1)
    assert samples.shape == (10, *dataset.shape) and torch.isfinite(samples).all() and nfe == 20 and guided.cost == 2


def test_classifier_guidance_differentiates_through_the_dct():
    """Classifier guidance of blur diffusion: the classifier sees pixels, so the gradient in the DCT basis is the
    rotated pixel gradient, eps_guided = eps - s sigma_k(t) U^T grad_x log p(y | x) per frequency; reading the
    coefficients as pixels would give another direction. The noisy classifier trains on blurred, noised images."""
    from diffusion.guidance import classifier_guided, fit_noisy_classifier

    process = BlurProcess(blur_config(T=100), SHAPE)
    weights = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    classifier = lambda x, time: x.flatten(1) @ weights.T  # noqa: E731 (a linear classifier on pixels, time-blind)
    eps_model = lambda u, t: 0.1 * u  # noqa: E731
    denoiser = Denoiser(eps_model, process)
    u = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(2))
    t, labels, scale = torch.full((4,), 30), torch.tensor([0, 1, 2, 0]), 1.5
    guided = classifier_guided(denoiser, classifier, labels, scale, network_time=False).eps(u, t)
    x = process.from_basis(u)
    grad_x = weights[labels] - torch.softmax(x.flatten(1) @ weights.T, dim=1) @ weights  # d log softmax_y / dx
    expected = eps_model(u, t) - scale * process.sigma(t).reshape(4, *SHAPE) * process.to_basis(grad_x.reshape(x.shape))
    assert torch.allclose(guided, expected, atol=1e-5)
    assert not torch.allclose(process.to_basis(grad_x.reshape(x.shape)), grad_x.reshape(x.shape), atol=1e-2)

    cfg = dataclasses.replace(trial(), sample=dataclasses.replace(trial().sample, classifier_scale=2.0, classifier_steps=60))
    validate(cfg)
    dataset = load_dataset(cfg.data)
    trained, record = fit_noisy_classifier(dataset, build_process(cfg.process, dataset.shape), torch.device("cpu"),
                                           seed=cfg.seed, steps=cfg.sample.classifier_steps)
    assert record["accuracy_t0.1"] > 0.3 and math.isfinite(record["loss"])  # chance: 0.1
