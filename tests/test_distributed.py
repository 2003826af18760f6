"""Data-parallel training (``diffusion.distributed``, ``Trainer.data_parallel``): two real processes on gloo, each
evaluating half of a global batch of 2B, follow one process's batch of 2B step for step, within rounding."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffusion.config import DataConfig, LossConfig, ModelConfig, ProcessConfig, TrainConfig, TrialConfig
from diffusion.data import load_dataset
from diffusion.distributed import shard_bounds
from diffusion.training import Trainer


def configs() -> dict[str, TrialConfig]:
    """The parts that depend on the whole batch: labels with their dropout, flips, the importance sampler's loss
    history, a learned schedule's gradient (outside DDP)."""
    def trial(**kw) -> TrialConfig:
        train = TrainConfig(batch_size=16, steps=8, warmup=2, log_every=1, ema_decay=0.9, grad_clip=1.0,
                            **kw.pop("train", {}))
        return TrialConfig(data=DataConfig(name="digits"),
                           model=ModelConfig(channels=8, channel_mult=[1, 2], groups=4, **kw.pop("model", {})),
                           train=train, **kw)

    return {
        "conditional": trial(process=ProcessConfig(T=100), model={"class_conditional": True},
                             train={"cond_dropout": 0.25, "hflip": True}),
        "importance": trial(process=ProcessConfig(T=4), loss=LossConfig(t_sampling="importance")),
        "learned": trial(process=ProcessConfig(T="continuous", schedule="learned", learned_hidden=16),
                         loss=LossConfig(weighting="elbo")),
    }


def outcome(trainer: Trainer, losses: list[float]) -> dict:
    """What training made, and the last step's gradients (averaged: Adam's normalised steps would hide an error
    in their scale)."""
    grads = [p.grad for p in trainer._parameters + trainer._family_parameters]
    return {"losses": losses, "network": trainer.network.state_dict(), "ema": trainer.ema.module.state_dict(),
            "family": trainer.family.state_dict(), "grads": grads}


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for name, cfg in configs().items():
        trainer = Trainer(cfg, load_dataset(cfg.data), torch.device("cpu"))
        trainer.data_parallel()
        assert trainer.world == world and trainer.rank == rank
        results[name] = outcome(trainer, [r.loss for r in trainer.train()])
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def close(a, b, what: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for key in a:
            close(a[key], b[key], f"{what}.{key}")
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5), \
            f"{what}: max difference {(a.double() - b.double()).abs().max():.3g}"
    elif isinstance(a, list) and a and isinstance(a[0], float):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6), f"{what}: {a} != {b}"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{what}[{i}]")
    else:
        assert a == b, f"{what}: {a} != {b}"


def test_two_processes_with_half_batches_each_follow_one_process_with_the_whole_batch(tmp_path):
    out = str(tmp_path / "two.pt")
    mp.start_processes(worker, args=(2, str(tmp_path / "rendezvous"), out), nprocs=2, start_method="spawn")
    two = torch.load(out, weights_only=True)
    torch.set_num_threads(1)
    for name, cfg in configs().items():
        single = Trainer(cfg, load_dataset(cfg.data), torch.device("cpu"))
        one = outcome(single, [r.loss for r in single.train()])
        close(one, two[name], name)
        # and the steps were real: the weights moved away from their initial values
        initial = Trainer(cfg, load_dataset(cfg.data), torch.device("cpu")).network.state_dict()
        assert any(not torch.allclose(initial[k], one["network"][k]) for k in initial), name


def test_the_batch_splits_into_equal_shards_or_is_refused():
    assert [shard_bounds(16, r, 4) for r in range(4)] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    with pytest.raises(ValueError, match="does not split into 3"):
        shard_bounds(16, 0, 3)


def test_one_process_is_not_wrapped():
    cfg = configs()["importance"]
    trainer = Trainer(cfg, load_dataset(cfg.data), torch.device("cpu"))
    trainer.data_parallel()  # no process group: nothing changes
    assert trainer.training_network is trainer.network and trainer.world == 1
