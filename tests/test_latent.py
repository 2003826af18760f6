"""Latent diffusion: the VAE against independent computations of its KL and reconstruction, its codes, the
configuration checks, and a latent DDPM trained, sampled and decoded end to end."""
import dataclasses
import math

import pytest
import torch

from diffusion.config import DataConfig, EvalConfig, ModelConfig, ProcessConfig, SampleConfig, TrainConfig, TrialConfig
from diffusion.validation import validate
from diffusion.data import Dataset, load_dataset
from diffusion.errors import ConfigError
from diffusion.latent import build_vae, evaluate_vae, fit_vae, latent_dataset
from diffusion.training import build_trainer


def trial(**model) -> TrialConfig:
    return TrialConfig(
        data=DataConfig(name="digits"), process=ProcessConfig(T=50),
        model=ModelConfig(**{"channels": 16, "channel_mult": [1, 2], "attention": False, "groups": 4, "latent": True,
                             "vae_steps": 300, **model}),
        train=TrainConfig(steps=40, batch_size=64, log_every=10), sample=SampleConfig(n=16, batch_size=16, steps=10))


@pytest.fixture(scope="module")
def fitted():
    cfg = trial()
    dataset = load_dataset(cfg.data)
    vae, record = fit_vae(dataset, torch.device("cpu"), seed=cfg.seed, steps=cfg.model.vae_steps,
                          batch_size=cfg.train.batch_size)
    return cfg, dataset, vae, record


def test_vae_reconstructs_and_its_kl_is_the_closed_form(fitted):
    cfg, dataset, vae, record = fitted
    x = dataset.test[:256]
    # after 300 steps the posterior mean reconstructs far better than the data's mean image does
    baseline = (x - dataset.train.mean(0)).pow(2).mean().item()
    assert record["vae_recon_mse"] < 0.3 * baseline
    assert record["vae_recon_psnr"] == pytest.approx(evaluate_vae(vae, dataset.test)["vae_recon_psnr"], rel=1e-5)
    # KL(q(z | x) || N(0, I)) against torch.distributions
    with torch.no_grad():
        mean, log_var = vae.posterior(x)
        _, _, kl = vae.loss(x, cfg.model.vae_kl_weight, torch.Generator().manual_seed(0))
    q = torch.distributions.Normal(mean, (0.5 * log_var).exp())
    reference = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(kl, reference, rtol=1e-4, atol=1e-4)
    assert record["vae_kl_per_dim"] == pytest.approx(record["vae_kl"] / 32, rel=1e-6)


def test_codes_have_unit_scale_and_decode_back(fitted):
    _, dataset, vae, record = fitted
    codes = latent_dataset(dataset, vae)
    assert codes.shape == (2, 4, 4) == tuple(record["latent_shape"]) and codes.levels is None
    assert codes.train.std().item() == pytest.approx(1.0, rel=1e-4)
    assert torch.equal(codes.train_labels, dataset.train_labels)
    with torch.no_grad():
        x = dataset.test[:8]
        direct = vae.decode(vae.posterior(x)[0])
        assert torch.allclose(vae.decode_codes(vae.encode(x)), direct, atol=1e-5)


def test_latent_ddpm_trains_samples_and_decodes(fitted):
    cfg, dataset, vae, _ = fitted
    trainer = build_trainer(cfg, latent_dataset(dataset, vae))
    history = trainer.train()
    assert all(math.isfinite(r.loss) for r in history)
    codes, nfe = trainer.sample(16, seed=1)
    assert codes.shape == (16, 2, 4, 4) and nfe == 10
    with torch.no_grad():
        images = vae.decode_codes(codes)
    assert images.shape == (16, *dataset.shape) and images.abs().max() <= 1


def test_config_checks():
    validate(trial())
    for key, cfg in [
        ("model.latent", dataclasses.replace(trial(), data=DataConfig(name="moons"))),
        ("model.latent", dataclasses.replace(trial(), process=ProcessConfig(name="blur", T=50))),
        ("model.latent", dataclasses.replace(trial(), process=ProcessConfig(name="cold", T=8), sample=SampleConfig(sampler="cold_improved"))),
        ("model.latent_factor", trial(latent_factor=3)),
        ("model.vae_steps", trial(vae_steps=0)),
        ("sample.classifier_scale", dataclasses.replace(trial(), sample=SampleConfig(classifier_scale=1.0))),
        ("eval.inverse", dataclasses.replace(trial(), eval=EvalConfig(inverse=["inpaint"]))),
    ]:
        with pytest.raises(ConfigError) as error:
            validate(cfg)
        assert error.value.key == key, (key, error.value)
    with pytest.raises(ValueError, match="latent_factor: invalid value 4"):
        build_vae((1, 6, 6), latent_factor=4)
    # the image size is known once the data set is loaded: the orchestrator's VAE stage names the config key
    from orchestrator.stages import vae_stage

    six = torch.zeros(2, 1, 6, 6)
    with pytest.raises(ConfigError, match="model.latent_factor") as error:
        vae_stage(trial(latent_factor=4), Dataset("six", six, six), None, None, "run", torch.device("cpu"))
    assert error.value.key == "model.latent_factor"
