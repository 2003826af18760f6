"""Samplers driven by the exact score of a Gaussian data set reproduce its mean and covariance."""
import math

import pytest
import torch

from diffusion.analytic import GaussianData
from diffusion.config import ProcessConfig, SampleConfig
from diffusion.processes import build_process
from diffusion.samplers import SAMPLERS, draw_samples

DIM, N = 16, 5_000
DATA = GaussianData.random(DIM, seed=0)


def moment_errors(x: torch.Tensor) -> tuple[float, float]:
    """(||mean - mu||, ||cov - C||_F / ||C||_F) of samples x [N, D]."""
    x = x.double()
    mean_err = (x.mean(0) - DATA.mean).norm().item()
    cov_err = ((torch.cov(x.T) - DATA.cov).norm() / DATA.cov.norm()).item()
    return mean_err, cov_err


def sampling_floor() -> tuple[float, float]:
    """The same errors for N exact draws: the Monte Carlo floor no sampler can beat."""
    return moment_errors(DATA.sample(N, torch.Generator().manual_seed(123)))


def run(process_cfg, sample_cfg, variance="beta_tilde", seed=1):
    denoiser = DATA.denoiser(build_process(process_cfg))
    return draw_samples(denoiser, sample_cfg, (DIM,), N, torch.Generator().manual_seed(seed), "cpu", variance)


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_ancestral_reproduces_gaussian(variance):
    x, nfe = run(ProcessConfig(name="vp", schedule="linear", T=1000),
                 SampleConfig(sampler="ancestral", batch_size=N), variance)
    assert nfe == 1000
    mean_err, cov_err = moment_errors(x)
    floor_mean, floor_cov = sampling_floor()
    assert mean_err < 3 * floor_mean + 0.01
    assert cov_err < 2 * floor_cov


def test_ancestral_on_ve_process_reproduces_gaussian():
    x, _ = run(ProcessConfig(name="ve", schedule="geometric", T=200, sigma_min=0.01, sigma_max=10.0),
               SampleConfig(sampler="ancestral", batch_size=N))
    mean_err, cov_err = moment_errors(x)
    floor_mean, floor_cov = sampling_floor()
    assert mean_err < 3 * floor_mean + 0.01
    assert cov_err < 2 * floor_cov


def test_annealed_langevin_reproduces_gaussian_and_improves_with_steps():
    errors = []
    for steps in (5, 100):
        x, nfe = run(ProcessConfig(name="ve", schedule="geometric", T=10, sigma_min=0.01, sigma_max=10.0),
                     SampleConfig(sampler="annealed_langevin", batch_size=N, steps_per_level=steps, step_size=2e-5))
        assert nfe == 10 * steps + 1
        errors.append(moment_errors(x))
    floor_mean, floor_cov = sampling_floor()
    (_, cov_coarse), (mean_fine, cov_fine) = errors
    assert cov_fine < cov_coarse
    assert mean_err_ok(mean_fine, floor_mean)
    assert cov_fine < 3 * floor_cov


def mean_err_ok(err, floor):
    return err < 3 * floor + 0.02


def test_final_denoising_step_removes_noise_variance():
    """Without the Tweedie step the samples keep about sigma_min^2 extra variance per dimension."""
    cfg = ProcessConfig(name="ve", schedule="geometric", T=10, sigma_min=0.3, sigma_max=10.0)
    with_denoise, _ = run(cfg, SampleConfig(sampler="annealed_langevin", batch_size=N, step_size=0.01, steps_per_level=20))
    without, _ = run(cfg, SampleConfig(sampler="annealed_langevin", batch_size=N, step_size=0.01, steps_per_level=20, denoise=False))
    extra = (torch.cov(without.double().T).trace() - torch.cov(with_denoise.double().T).trace()) / DIM
    assert extra.item() > 0.5 * 0.3**2


def test_sampler_is_deterministic_given_generator():
    cfg = ProcessConfig(T=50)
    a, _ = run(cfg, SampleConfig(sampler="ancestral", batch_size=N), seed=5)
    b, _ = run(cfg, SampleConfig(sampler="ancestral", batch_size=N), seed=5)
    assert torch.equal(a, b)


def test_unknown_sampler_lists_names():
    with pytest.raises(Exception, match="ancestral, annealed_langevin"):
        SAMPLERS.get("foo")
