"""Training: exact resume from a checkpoint, EMA, divergence detection, a short real run learns; every model
family supplies its loss, samples and likelihood; the auxiliary networks' fit loop is a plain Adam loop."""
import dataclasses

import pytest
import torch

from diffusion.config import DataConfig, EvalConfig, ModelConfig, SampleConfig, TrainConfig, TrialConfig, ProcessConfig
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
                                  torch.Generator().manual_seed(0)).item()

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
                                  torch.Generator().manual_seed(0)).item()

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
                                  torch.Generator().manual_seed(0), variance=model.variance).item()

    before = held_out_loss()
    trainer.train()
    assert held_out_loss() < before
    samples, nfe = trainer.sample(64, seed=0)
    assert nfe == 25 and torch.isfinite(samples).all()


def test_fit_is_a_hand_written_adam_loop():
    """``fit.fit`` on a tiny regression equals the loop it replaces, bit for bit: the same batch draws, Adam,
    ``zero_grad(set_to_none=True)``, the schedule stepped after the optimizer; a module is trained in training
    mode and left in evaluation mode, bare parameters leave the modes alone."""
    from diffusion.fit import fit

    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1

    def run(by_fit: bool, module_target: bool):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        generator = torch.Generator().manual_seed(2)

        def loss():
            index = torch.randint(64, (16,), generator=generator)
            return (model(x[index]).squeeze(1) - y[index]).pow(2).mean()

        def cosine(optimizer):
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)

        if by_fit:
            seen = []
            target = model if module_target else model.parameters()
            losses = fit(target, loss, 20, 1e-2, schedule=cosine, on_step=lambda step, value: seen.append(step))
            assert seen == list(range(1, 21))
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            schedule = cosine(optimizer)
            losses = []
            for _ in range(20):
                value = loss()
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                schedule.step()
                losses.append(value.item())
        return model, losses

    by_hand, hand_losses = run(False, False)
    for module_target in (True, False):
        fitted, losses = run(True, module_target)
        assert losses == hand_losses and losses[-1] < losses[0]
        for a, b in zip(by_hand.state_dict().values(), fitted.state_dict().values()):
            assert torch.equal(a, b)
        assert fitted.training is not module_target  # a module ends in evaluation mode


def _family_configs():
    sample = SampleConfig(n=6, batch_size=4, steps=4)
    unet = ModelConfig(channels=8, channel_mult=[1, 2], groups=4, attention=False)
    train = TrainConfig(steps=2, batch_size=8, warmup=0, log_every=1)
    digits = DataConfig(name="digits")
    return {
        "gaussian": TrialConfig(data=DataConfig(name="moons", n_points=200), process=ProcessConfig(T=10),
                                model=ModelConfig(hidden=16, depth=2), train=train, sample=sample,
                                eval=EvalConfig(bpd_n=4, ode_rtol=1e-2, ode_atol=1e-2)),
        "blur": TrialConfig(data=digits, process=ProcessConfig(name="blur", T=10), model=unet, train=train,
                            sample=sample),
        "latent": TrialConfig(data=digits, process=ProcessConfig(T=10),
                              model=dataclasses.replace(unet, latent=True, vae_steps=2, vae_channels=8), train=train,
                              sample=sample),
        "naive": TrialConfig(data=digits, process=ProcessConfig(name="naive", T=8), model=unet, train=train,
                             sample=dataclasses.replace(sample, sampler="denoise_renoise")),
        "cold": TrialConfig(data=digits, process=ProcessConfig(name="cold", degradation="mask", T=8), model=unet,
                            train=train, sample=dataclasses.replace(sample, sampler="cold_improved")),
    }


@pytest.mark.parametrize("name", ["gaussian", "blur", "latent", "naive", "cold"])
def test_each_family_supplies_loss_samples_and_likelihood_or_its_note(digits, name):
    """build_trainer picks the family; each gives per-example losses, samples in batches (data-shaped after
    ``decode``: a latent model's codes decoded by its VAE), and bits/dim or the note saying why there are none.
    A restoration family has no Gaussian process at all."""
    from diffusion.families import BlurFamily, GaussianFamily, LatentFamily, RestorationFamily
    from diffusion.latent import LIKELIHOOD_NOTE, fit_vae, latent_dataset
    from diffusion.training import build_trainer

    cfg = _family_configs()[name]
    data = load_dataset(cfg.data) if cfg.data.name != "digits" else digits
    vae = fit_vae(data, torch.device("cpu"), seed=cfg.seed, channels=cfg.model.vae_channels, steps=cfg.model.vae_steps,
                  batch_size=cfg.train.batch_size)[0] if name == "latent" else None
    model_data = latent_dataset(data, vae) if vae is not None else data
    trainer = build_trainer(cfg, model_data, torch.device("cpu"), vae=vae)
    kind = {"gaussian": GaussianFamily, "blur": BlurFamily, "latent": LatentFamily}.get(name, RestorationFamily)
    assert type(trainer.family) is kind
    losses = trainer.batch_losses(trainer.train_data[:5], None)
    assert losses.shape == (5,) and torch.isfinite(losses).all()
    assert len(trainer.train()) == 2
    samples, nfe = trainer.sample(6, seed=0)
    assert samples.shape == (6, *model_data.shape) and torch.isfinite(samples).all() and nfe == 4
    assert trainer.decode(samples).shape == (6, *data.shape)
    if kind is RestorationFamily:
        assert not hasattr(trainer.family, "process") and trainer.step_size() == 2
    if trainer.likelihood_note is None:
        assert {"bpd_ode", "bpd_elbo"} <= set(trainer.heldout_likelihood().metrics)
    else:
        assert trainer.likelihood_note == LIKELIHOOD_NOTE or kind is not LatentFamily
        with pytest.raises(NotImplementedError, match="bits/dim|likelihood"):
            trainer.heldout_likelihood()


# --- the fast training step (benchmarks/throughput.py measures it) ---------------------------------------------
@pytest.mark.parametrize("warmup", [False, True])
def test_foreach_ema_equals_the_per_parameter_update_exactly(digits, warmup):
    """Trainer.update_ema (multi-tensor lerp over flat lists) gives bit for bit what AveragedModel's per-parameter
    update with ema_update does, from the first update (a copy) on; n_averaged counts the same."""
    from torch.optim.swa_utils import AveragedModel
    from diffusion.training import ema_update

    cfg = small_config(steps=4, ema_decay=0.9, ema_warmup=warmup)
    trainer = Trainer(cfg, digits, torch.device("cpu"))
    reference = AveragedModel(trainer.network, multi_avg_fn=ema_update(0.9, warmup))
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        with torch.no_grad():
            for param in trainer.network.parameters():
                param.copy_(torch.randn(param.shape, generator=generator))
        trainer.update_ema()
        reference.update_parameters(trainer.network)
    for ours, theirs in zip(trainer.ema.module.parameters(), reference.module.parameters()):
        assert torch.equal(ours, theirs)
    assert int(trainer.ema.n_averaged) == int(reference.n_averaged) == 4


def test_ema_count_survives_a_checkpoint(digits, tmp_path):
    """The host-side EMA update count is read back from the checkpoint (the warm-up decay depends on it)."""
    cfg = small_config(steps=3, ema_decay=0.9)
    trainer = Trainer(cfg, digits, torch.device("cpu"))
    trainer.train()
    trainer.save(str(tmp_path / "c.pt"))
    fresh = Trainer(cfg, digits, torch.device("cpu"))
    fresh.load(str(tmp_path / "c.pt"))
    assert fresh._ema_updates == 3


def test_divergence_is_found_at_the_log_point_with_its_step(digits):
    """Losses are read at log points only; the first non-finite one is reported with its own step, and nothing
    is logged from that window."""
    cfg = small_config(steps=8, lr=1e30, grad_clip=0.0)
    cfg.train.log_every = 4
    trainer = Trainer(cfg, digits, torch.device("cpu"))
    logged = []
    with pytest.raises(TrainingDiverged) as info:
        trainer.train(on_log=lambda step, loss: logged.append((step, loss)))
    assert all(step < info.value.step for step, _ in logged) and not torch.isfinite(torch.tensor(info.value.loss))
    # the same step as a run that reads every loss
    again = Trainer(cfg, digits, torch.device("cpu"))
    with pytest.raises(TrainingDiverged) as each:
        while True:
            again.train_step()
    assert each.value.step == info.value.step


def test_amp_true_runs_bf16_autocast_on_cpu_and_auto_does_not(digits):
    cfg = small_config(steps=2)
    dtypes = []
    for amp in ("auto", True, False):
        trainer = Trainer(cfg, digits, torch.device("cpu"), amp=amp)
        assert trainer.amp is (amp is True)
        handle = trainer.network.conv_in.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
        losses = [r.loss for r in trainer.train()]
        handle.remove()
        assert all(torch.isfinite(torch.tensor(losses)))
    assert dtypes == [torch.float32] * 2 + [torch.bfloat16] * 2 + [torch.float32] * 2


def test_amp_and_compile_values_are_checked():
    from diffusion.errors import ConfigError
    from diffusion.validation import validate
    from orchestrator.schema import ResourcesConfig, validate_resources

    for amp in ("yes", 1, None):
        with pytest.raises(ConfigError, match="resources.amp"):
            validate_resources(ResourcesConfig(amp=amp))
    for amp in ("auto", True, False):
        validate_resources(ResourcesConfig(amp=amp))
    cfg = small_config()
    cfg.train.compile = "yes"
    with pytest.raises(ConfigError, match="train.compile.*true or false"):
        validate(cfg)


def test_compile_is_not_part_of_the_training_key():
    """train.compile runs the same computation: trials that differ only in it share one trained model."""
    from orchestrator.keys import training_key

    eager, compiled = small_config(), small_config(compile=True)
    assert training_key(eager) == training_key(compiled)


def test_a_chosen_precision_is_part_of_the_training_key():
    """resources.amp true (bfloat16 autocast) and false (float32) train different weights: never one cache entry;
    auto (the default) keeps the keys of configs that never chose."""
    from orchestrator.keys import training_key
    from orchestrator.schema import SweepTrialConfig

    def with_amp(amp):
        cfg = SweepTrialConfig()
        cfg.resources.amp = amp
        return training_key(cfg)

    assert len({with_amp("auto"), with_amp(True), with_amp(False)}) == 3
    assert with_amp("auto") == training_key(SweepTrialConfig()) == training_key(TrialConfig())


def test_compiled_training_matches_eager(monkeypatch):
    """train.compile = true trains through torch.compile's wrapper: the same losses as eager within float tolerance,
    the plain module's weights change (checkpoints and the EMA see them). Dynamo captures the graphs and AOTAutograd
    builds the backward as in a real compile; the aot_eager backend runs them without inductor's C++ build, which
    would take a minute here (benchmarks/throughput.py compiles with inductor)."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    cfg = TrialConfig(data=DataConfig(name="moons", n_points=200), process=ProcessConfig(T=10),
                      model=ModelConfig(hidden=16, depth=2), train=TrainConfig(steps=4, batch_size=16, warmup=0, log_every=1))
    data = load_dataset(cfg.data)
    eager = Trainer(cfg, data, torch.device("cpu"))
    compiled = Trainer(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=True)), data,
                       torch.device("cpu"))
    assert compiled.training_network is not compiled.network and eager.training_network is eager.network
    eager_losses = [r.loss for r in eager.train()]
    compiled_losses = [r.loss for r in compiled.train()]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-6)
    for a, b in zip(eager.ema.module.parameters(), compiled.ema.module.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_hflip_flips_about_half_of_each_batch(digits):
    """train.hflip: each training image is mirrored left-right with probability 1/2 (Ho et al. 2020 on CIFAR-10),
    drawn from the trainer's generator (reproducible); without it the batch is the data's own rows."""
    from diffusion.errors import ConfigError
    from diffusion.validation import validate

    seen = []

    def capture(trainer):
        original = trainer.batch_losses

        def batch_losses(x0, labels):
            seen.append(x0.detach().clone())
            return original(x0, labels)
        trainer.batch_losses = batch_losses

    counts = []
    for hflip in (True, False):
        seen.clear()
        cfg = small_config(hflip=hflip, steps=1)
        cfg.train.batch_size = 256
        trainer = Trainer(cfg, digits, torch.device("cpu"))
        capture(trainer)
        trainer.train_step()
        rows = trainer.train_data.flatten(1)
        batch = seen[0]
        same = (batch.flatten(1)[:, None, :] == rows[None]).all(-1).any(-1)
        mirrored = (batch.flip(-1).flatten(1)[:, None, :] == rows[None]).all(-1).any(-1)
        symmetric = same & mirrored  # images equal to their own mirror image count as unflipped
        assert bool((same | mirrored).all())
        counts.append(int((mirrored & ~symmetric).sum()))
    assert 90 <= counts[0] <= 166 and counts[1] == 0  # Binomial(256, 1/2): 128 +- 4.7 sd
    with pytest.raises(ConfigError, match=r"train.hflip: invalid value True; accepted: false for 2-D points"):
        validate(dataclasses.replace(small_config(hflip=True), data=DataConfig(name="moons")))
