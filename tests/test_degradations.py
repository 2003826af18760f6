"""Naive and cold diffusion: the degradations against what they claim and independent computations, the samplers
with an exact restorer, and a small trained model end to end."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from diffusion.config import DataConfig, ModelConfig, ProcessConfig, SampleConfig, TrainConfig, TrialConfig
from diffusion.validation import validate
from diffusion.data import load_dataset
from diffusion.degradations import COLD_SAMPLERS, DEGRADATIONS, MASK_VALUE, blur, build_degradation
from diffusion.errors import ConfigError
from diffusion.families import RestorationFamily
from diffusion.training import build_trainer

SHAPE = (1, 8, 8)
P = 64


def images(n=6, seed=0):
    """Images with no pixel at exactly -1, 0 or +1, so corrupted pixels can be counted exactly."""
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8 + 1e-3


@pytest.mark.parametrize("name", DEGRADATIONS.names())
def test_level_zero_is_the_identity(name):
    x = images()
    assert torch.equal(build_degradation(name, 16, SHAPE)(x, 0, torch.Generator().manual_seed(0)), x)


@pytest.mark.parametrize("T", [64, 10])
def test_naive_corrupts_round_s_p_over_t_nested_pixels(T):
    naive = build_degradation("naive", T, SHAPE)
    x = images()
    state = naive.draw(len(x), torch.Generator().manual_seed(1), x.device)
    previous = torch.zeros(len(x), *SHAPE, dtype=torch.bool)
    for s in range(T + 1):
        out = naive(x, s, state=state)
        changed = out != x
        assert (changed.flatten(1).sum(1) == round(s * P / T)).all()
        assert set(out[changed].unique().tolist()) <= {-1.0, 1.0}
        assert (previous <= changed).all()  # only as-yet uncorrupted pixels are added
        previous = changed
    # different examples, different pixels; a fresh draw differs too
    assert not torch.equal(state["ranks"][0], state["ranks"][1])
    assert not torch.equal(naive(x, T // 2, torch.Generator().manual_seed(2)), naive(x, T // 2, state=state))


def test_mask_hides_in_one_fixed_order_and_everything_at_t():
    mask = build_degradation("mask", 16, SHAPE, order_seed=3)
    x = images()
    hidden = [mask(x, s) == MASK_VALUE for s in range(17)]
    assert all((h.flatten(1).sum(1) == round(s * P / 16)).all() for s, h in enumerate(hidden))
    assert all(torch.equal(h[0], h[1]) for h in hidden)  # the same pixels for every image
    assert hidden[-1].all()


def test_blur_equals_scipy_and_flattens_at_t():
    """The DCT-diagonal blur against scipy's Gaussian filter with reflecting boundaries (a sampled kernel: equal up
    to its aliasing, exp(-pi^2 std^2 / 2) at the highest frequency), an orthonormal DCT, the mean kept, and a flat image at a large width."""
    from diffusion.degradations import dct_matrix

    x = images(3)
    basis = dct_matrix(8)
    assert torch.allclose(basis @ basis.T, torch.eye(8, dtype=torch.float64), atol=1e-12)
    for std in (1.5, 2.5):  # wide enough that the sampled kernel's aliasing is below 1e-4
        theirs = ndimage.gaussian_filter(x.numpy().astype(np.float64), sigma=(0, 0, std, std), mode="reflect", truncate=6)
        assert np.abs(blur(x, std).numpy() - theirs).max() < 2e-3
    flat = build_degradation("blur", 10, SHAPE, blur_sigma_max=20.0)(x, 10)
    assert flat.flatten(1).std(1).max() < 1e-4
    assert torch.allclose(flat.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(blur(x, 1.0).mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=1e-5)


def test_pixelate_is_block_averaging_and_the_mean_at_t():
    pixelate = build_degradation("pixelate", 7, SHAPE)
    x = images(2)
    sizes = [pixelate.size(s) for s in range(8)]
    assert sizes[0] == (8, 8) and sizes[-1] == (1, 1) and all(a >= b for a, b in zip(sizes, sizes[1:]))
    # where the size divides 8, the result is the reshape-mean over blocks
    level = next(s for s, size in enumerate(sizes) if size == (4, 4))
    blocks = x.reshape(2, 1, 4, 2, 4, 2).mean(dim=(3, 5))
    assert torch.allclose(pixelate(x, level), blocks.repeat_interleave(2, 2).repeat_interleave(2, 3), atol=1e-6)
    assert torch.allclose(pixelate(x, 7), x.mean(dim=(2, 3), keepdim=True).expand_as(x), atol=1e-6)


@pytest.mark.parametrize("name", ["mask", "blur", "pixelate"])
@pytest.mark.parametrize("sampler", COLD_SAMPLERS.names())
@pytest.mark.parametrize("step", [1, 3])
@pytest.mark.parametrize("perturbed", [False, True])
def test_samplers_with_the_exact_restorer_return_x0(name, sampler, step, perturbed):
    """Also with a perturbation of x_T: Algorithm 1 forgets it, Algorithm 2 carries it to the end and removes it."""
    degradation = build_degradation(name, 10, SHAPE, blur_sigma_max=3.0)
    x0 = images(4)
    x_T = degradation(x0, 10)
    perturbation = 0.1 * torch.randn(x_T.shape, generator=torch.Generator().manual_seed(3)) if perturbed else None
    out, nfe = COLD_SAMPLERS.get(sampler)(lambda x, s: x0, degradation, x_T, generator=torch.Generator(), step=step,
                                          perturbation=perturbation)
    assert nfe == math.ceil(10 / step)
    assert torch.allclose(out, x0, atol=1e-5)


def test_algorithm_2_cancels_a_constant_restorer_error_that_algorithm_1_keeps():
    """For a degradation linear in x0 (blur), Algorithm 2 is exact for a restorer that is off by a fixed image
    whose degradation does not change with the level (a constant offset), while Algorithm 1 returns the error."""
    degradation = build_degradation("blur", 8, SHAPE, blur_sigma_max=3.0)
    x0 = images(4)
    offset = 0.3
    restore = lambda x, s: x0 + offset
    x_T = degradation(x0, 8)
    improved, _ = COLD_SAMPLERS.get("cold_improved")(restore, degradation, x_T, generator=torch.Generator())
    naive, _ = COLD_SAMPLERS.get("denoise_renoise")(restore, degradation, x_T, generator=torch.Generator())
    assert torch.allclose(improved, x0, atol=1e-5)
    assert torch.allclose(naive, x0 + offset, atol=1e-5)


@pytest.mark.parametrize("name", DEGRADATIONS.names())
def test_priors_are_diverse_and_shaped(name):
    """The generation start with the degradation's default perturbation differs from sample to sample (for the
    mask, whose prior is the one empty image, only through the perturbation)."""
    reference = images(50)
    degradation = build_degradation(name, 10, SHAPE)
    generator = torch.Generator().manual_seed(0)
    x_T = degradation.prior(8, reference, generator)
    assert x_T.shape == (8, *SHAPE) and torch.isfinite(x_T).all()
    assert (name == "mask") == torch.equal(x_T[0], x_T[1])
    x_T = x_T + degradation.prior_noise * torch.randn(x_T.shape, generator=generator)
    assert not torch.allclose(x_T[0], x_T[1])


def test_validation_of_naive_and_cold_trials():
    cfg = TrialConfig(process=ProcessConfig(name="cold", degradation="blur", T=10),
                      sample=SampleConfig(sampler="cold_improved"))
    validate(cfg)
    bad = [(dataclasses.replace(cfg, sample=SampleConfig(sampler="ancestral")), "sample.sampler"),
           (dataclasses.replace(cfg, process=ProcessConfig(name="cold", degradation="smudge", T=10)), "process.degradation"),
           (dataclasses.replace(cfg, process=ProcessConfig(name="naive", T="continuous")), "process.T"),
           (dataclasses.replace(cfg, data=DataConfig(name="moons")), "data.name"),
           (dataclasses.replace(cfg, model=ModelConfig(parameterization="v")), "model.parameterization"),
           (dataclasses.replace(cfg, sample=SampleConfig(sampler="cold_improved", steps=11)), "sample.steps"),
           (dataclasses.replace(cfg, sample=SampleConfig(sampler="cold_improved", prior_noise=-0.1)), "sample.prior_noise"),
           (TrialConfig(sample=SampleConfig(prior_noise=0.1)), "sample.prior_noise")]
    for config, key in bad:
        with pytest.raises(ConfigError) as error:
            validate(config)
        assert error.value.key == key, (key, str(error.value))
    with pytest.raises(ConfigError) as error:  # a Gaussian process refuses the cold samplers
        validate(TrialConfig(sample=SampleConfig(sampler="cold_improved")))
    assert error.value.key == "sample.sampler"


@pytest.mark.parametrize("name", ["naive", "blur"])
def test_a_small_restorer_trains_and_samples(name):
    """A tiny U-Net on the digits: the restoration loss falls, training resumes bit for bit from a checkpoint,
    and both samplers give finite images at the NFE the budget asks for."""
    process = ProcessConfig(name="naive", T=16) if name == "naive" else ProcessConfig(name="cold", degradation=name, T=16)
    cfg = TrialConfig(data=DataConfig(name="digits"), process=process,
                      model=ModelConfig(arch="unet", channels=16, channel_mult=[1, 2], groups=4, attention=False),
                      train=TrainConfig(steps=150, batch_size=64, lr=2e-3, warmup=10, log_every=50, checkpoint_every=0),
                      sample=SampleConfig(sampler="denoise_renoise", n=8, batch_size=8, steps=4))
    dataset = load_dataset(cfg.data)
    trainer = build_trainer(cfg, dataset, torch.device("cpu"))
    assert isinstance(trainer.family, RestorationFamily) and trainer.likelihood_note
    history = trainer.train()
    assert history[-1].loss < 0.8 * history[0].loss
    for sampler in COLD_SAMPLERS.names():
        trainer.cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, sampler=sampler))
        x, nfe = trainer.sample(8, seed=1)
        assert x.shape == (8, *dataset.shape) and torch.isfinite(x).all() and nfe == 4
        told = []  # told after each of the 4 visited levels; the same samples
        again, _ = trainer.sample(8, seed=1, progress=lambda done, total: told.append((done, total)))
        assert told == [(1, 4), (2, 4), (3, 4), (4, 4)] and torch.equal(again, x)
