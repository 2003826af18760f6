"""Training: exact resume from a checkpoint, EMA, divergence detection, a short real run learns."""
import pytest
import torch

from diffusion.config import DataConfig, ModelConfig, TrainConfig, TrialConfig, ProcessConfig
from diffusion.data import load_dataset
from diffusion.losses import diffusion_loss
from diffusion.training import Trainer, TrainingDiverged


def small_config(**train) -> TrialConfig:
    return TrialConfig(
        data=DataConfig(name="digits"),
        process=ProcessConfig(T=100),
        model=ModelConfig(channels=8, channel_mult=[1, 2], groups=4),
        train=TrainConfig(batch_size=16, warmup=3, log_every=2, **train),
    )


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(name="digits"))


@pytest.mark.parametrize("t_sampling", ["uniform", "importance", "learned"])
def test_resume_continues_bit_for_bit(digits, tmp_path, t_sampling):
    """``learned``: a VDM schedule in continuous time, whose parameters and optimizer state resume too."""
    from diffusion.config import LossConfig

    cfg = small_config(steps=12, ema_decay=0.9)
    if t_sampling == "importance":  # T = 4: every step's history fills within the first steps
        cfg.process, cfg.loss = ProcessConfig(T=4), LossConfig(t_sampling="importance")
    if t_sampling == "learned":
        cfg.process = ProcessConfig(T="continuous", schedule="learned", learned_hidden=16)
        cfg.loss = LossConfig(weighting="elbo")
    straight = Trainer(cfg, digits, torch.device("cpu"))
    straight_losses = [r.loss for r in straight.train()]

    first = Trainer(cfg, digits, torch.device("cpu"))
    first.train(until=6)
    path = tmp_path / "ckpt.pt"
    first.save(str(path))
    torch.manual_seed(999)  # disturb the global RNG: the checkpoint must restore it
    resumed = Trainer(cfg, digits, torch.device("cpu"))
    resumed.load(str(path))
    assert resumed.step == 6
    resumed_losses = [r.loss for r in resumed.train()]
    assert resumed_losses == straight_losses[3:]
    if t_sampling == "importance":
        assert resumed.time_sampler.importance and not torch.allclose(
            resumed.time_sampler.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    for a, b in zip(straight.network.state_dict().values(), resumed.network.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    if t_sampling == "learned":
        initial = Trainer(cfg, digits, torch.device("cpu")).process.schedule.state_dict()
        for name, value in straight.process.schedule.state_dict().items():
            assert torch.equal(value, resumed.process.schedule.state_dict()[name])
            assert name == "b1" or not torch.equal(value, initial[name])  # the schedule did train


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_is_moving_average(digits, warmup):
    cfg = small_config(steps=3, ema_decay=0.5, ema_warmup=warmup)
    trainer = Trainer(cfg, digits, torch.device("cpu"))
    name, param = next(iter(trainer.network.named_parameters()))
    trainer.train(until=1)
    p1 = param.detach().clone()
    trainer.train(until=2)
    p2 = param.detach().clone()
    ema = dict(trainer.ema.module.named_parameters())[name]
    # AveragedModel copies the weights at the first update, then ema = d ema + (1 - d) p with
    # d = 0.5, or with warm-up d = min(0.5, (1 + 1) / (10 + 1)) = 2/11 at the second update
    d = 2 / 11 if warmup else 0.5
    assert torch.allclose(ema, d * p1 + (1 - d) * p2, atol=1e-7)


def test_divergence_raises(digits):
    cfg = small_config(steps=50, lr=1e30, grad_clip=0.0)
    trainer = Trainer(cfg, digits, torch.device("cpu"))
    with pytest.raises(TrainingDiverged) as info:
        trainer.train()
    assert info.value.step <= 50


def test_short_training_reduces_loss(digits):
    cfg = small_config(steps=60, lr=2e-3)
    history = Trainer(cfg, digits, torch.device("cpu")).train()
    first, last = history[0].loss, sum(r.loss for r in history[-5:]) / 5
    assert last < 0.7 * first


@pytest.mark.parametrize("parameterization", ["eps", "score", "x0", "v", "edm"])
@pytest.mark.parametrize("weighting", ["simple", "sigma2", "min_snr", "likelihood", "edm", "elbo"])
def test_every_parameterization_trains_with_every_weighting(parameterization, weighting):
    """Each combination trains on 2-D data in continuous time: finite losses that go down."""
    from diffusion.config import LossConfig

    cfg = TrialConfig(
        data=DataConfig(name="gaussian_mixture", n_points=500),
        process=ProcessConfig(T="continuous"),
        model=ModelConfig(parameterization=parameterization, hidden=32, depth=2),
        loss=LossConfig(weighting=weighting),
        train=TrainConfig(steps=150, batch_size=128, lr=3e-3, warmup=0, log_every=10),
    )
    dataset = load_dataset(cfg.data)
    trainer = Trainer(cfg, dataset, torch.device("cpu"))

    def held_out_loss() -> float:  # the same times and noise before and after training
        with torch.no_grad():
            return diffusion_loss(trainer.denoiser(), trainer.weighting, dataset.test.repeat(20, 1),
                                  torch.Generator().manual_seed(0), cfg.loss).item()

    before = held_out_loss()
    history = trainer.train()
    assert all(torch.isfinite(torch.tensor([r.loss for r in history])))
    assert held_out_loss() < before


def test_discrete_elbo_training_on_digits(digits):
    """The exact discrete bound (with the 17-level decoder of the digits) trains: it goes down."""
    from diffusion.config import LossConfig

    cfg = small_config(steps=40, lr=2e-3)
    cfg.loss = LossConfig(weighting="elbo")
    cfg.process = ProcessConfig(T=50)
    history = Trainer(cfg, digits, torch.device("cpu")).train()
    assert history[-1].loss < history[0].loss and all(r.loss == r.loss for r in history)


@pytest.mark.parametrize("objective", ["implicit", "sliced"])
def test_score_matching_objectives_train_a_noise_conditional_mlp(objective):
    from diffusion.config import LossConfig

    cfg = TrialConfig(
        data=DataConfig(name="gaussian_mixture", n_points=500),
        process=ProcessConfig(name="ve", schedule="geometric", T="continuous", sigma_min=0.05, sigma_max=4.0),
        model=ModelConfig(parameterization="score", hidden=32, depth=2),
        loss=LossConfig(weighting="sigma2", objective=objective),
        train=TrainConfig(steps=150, batch_size=128, lr=3e-3, warmup=0, log_every=10),
    )
    dataset = load_dataset(cfg.data)
    trainer = Trainer(cfg, dataset, torch.device("cpu"))

    def held_out_dsm() -> float:  # judged by the denoising loss, which the objectives also minimise
        with torch.no_grad():
            return diffusion_loss(trainer.denoiser(), trainer.weighting, dataset.test.repeat(20, 1),
                                  torch.Generator().manual_seed(0), LossConfig(weighting="sigma2")).item()

    before = held_out_dsm()
    trainer.train()
    assert held_out_dsm() < 0.8 * before


def test_score_matching_objective_rejects_images(digits):
    from diffusion.config import LossConfig
    from diffusion.errors import ConfigError

    cfg = small_config(steps=1)
    cfg.loss = LossConfig(weighting="sigma2", objective="implicit")
    with pytest.raises(ConfigError, match="loss.objective"):
        Trainer(cfg, digits, torch.device("cpu"))


@pytest.mark.parametrize("process,model,weighting", [
    (ProcessConfig(T=50), ModelConfig(parameterization="mean", hidden=32, depth=2), "elbo"),
    (ProcessConfig(T=50), ModelConfig(variance="learned_range", hidden=32, depth=2), "simple"),
    (ProcessConfig(T=50), ModelConfig(variance="learned_range", parameterization="v", hidden=32, depth=2), "elbo"),
    (ProcessConfig(T=50, schedule="learned", learned_hidden=32), ModelConfig(hidden=32, depth=2), "elbo"),
], ids=["mean-elbo", "learned_range-hybrid", "learned_range-elbo", "learned-schedule-discrete"])
def test_discrete_time_learned_parts_train(process, model, weighting):
    """The mean parameterization, the learned_range variance (hybrid loss or the bound) and the learned discrete
    schedule each train on 2-D data: the held-out loss falls, and ancestral sampling runs on the result."""
    from diffusion.config import LossConfig, SampleConfig

    cfg = TrialConfig(data=DataConfig(name="gaussian_mixture", n_points=500), process=process, model=model,
                      loss=LossConfig(weighting=weighting),
                      train=TrainConfig(steps=150, batch_size=128, lr=3e-3, warmup=0, log_every=10),
                      sample=SampleConfig(n=64, batch_size=64, steps=25))
    dataset = load_dataset(cfg.data)
    trainer = Trainer(cfg, dataset, torch.device("cpu"))

    def held_out_loss() -> float:
        with torch.no_grad():
            return diffusion_loss(trainer.denoiser(), trainer.weighting, dataset.test.repeat(20, 1),
                                  torch.Generator().manual_seed(0), cfg.loss, variance=model.variance).item()

    before = held_out_loss()
    trainer.train()
    assert held_out_loss() < before
    samples, nfe = trainer.sample(64, seed=0)
    assert nfe == 25 and torch.isfinite(samples).all()
