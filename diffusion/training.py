"""Training: Adam, EMA of the weights, gradient clipping, exact resume from checkpoints.

A :class:`Trainer` owns the network, its EMA, the optimizer and every piece of random state that training
touches, so that ``save`` then ``load`` into a fresh Trainer continues bit for bit. What depends on the model
family (the loss, sampling, the likelihood, the process or degradation) is its ``family``
(``diffusion.families``): Gaussian, blur, latent, or naive and cold restoration.
"""
from __future__ import annotations

import ast
import math
import random
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from .config import TrialConfig
from .data import Dataset
from .errors import ConfigError
from . import distributed
from .denoiser import Denoiser
from .families import Family, build_family
from .nets import build_network
from .storage import save_atomic
from .validation import validate

CHECKPOINT_VERSION = 1

# The Adam implementation of the Trainer: one fused kernel over all parameters instead of a Python loop over them
# (measured by benchmarks/throughput.py against per-tensor and foreach Adam, docs/BENCHMARKS.md).
ADAM_OPTIONS = {"fused": True}
# Image networks trained on CPU are made channels_last (Trainer.channels_last): faster in 4 of 5 interleaved runs on
# the loaded 2-core test machine (8x8: 1.15x, 1.13x, 0.89x; 32x32: 1.03x, 1.07x; docs/BENCHMARKS.md). Values, state
# dicts and checkpoints are the same; only the strides differ.
CHANNELS_LAST_ON_CPU = True


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""

    def __init__(self, step: int, loss: float):
        self.step, self.loss = step, loss
        super().__init__(f"loss is {loss} at step {step}: training diverged")


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU. On CUDA, float32 matrix products and convolutions may use TF32 on
    the GPUs that have it (Ampere and later: a 10-bit mantissa for the products, float32 accumulation)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("resources.device", name, "auto or cpu (no CUDA device is visible)")
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def amp_enabled(amp, device: torch.device) -> bool:
    """Whether training and sampling run under bfloat16 autocast: ``amp`` (``resources.amp``) ``auto`` on CUDA
    only, ``true`` on CUDA and CPU (bf16 needs no loss scaling; on this AVX2 CPU the demo's DDPM trains as fast as
    in float32, docs/BENCHMARKS.md), ``false`` never."""
    if not (amp == "auto" if isinstance(amp, str) else isinstance(amp, bool)):
        raise ConfigError("resources.amp", amp, "auto (bf16 autocast on CUDA only), true (also on CPU) or false")
    if amp == "auto":
        return device.type == "cuda"
    return bool(amp) and device.type in ("cuda", "cpu")


def ema_decay_at(decay: float, warmup: bool, n: int) -> float:
    """The EMA's decay at its n-th update (n = 0 is the copy of the first): ``decay``, or with warm-up
    min(decay, (1 + n) / (10 + n)) (:func:`ema_update`)."""
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


def ema_update(decay: float, warmup: bool):
    """The EMA step for AveragedModel: ema <- d ema + (1 - d) w with d = decay, or with warm-up
    d = min(decay, (1 + n) / (10 + n)) at the n-th update (the num_updates rule of TensorFlow's
    ExponentialMovingAverage), so that the average forgets the random initial weights quickly."""

    def update(ema_params, params, num_averaged):
        d = ema_decay_at(decay, warmup, float(num_averaged))
        for ema_param, param in zip(ema_params, params):
            ema_param.lerp_(param.detach(), 1 - d)

    return update


@dataclass
class StepRecord:
    step: int
    loss: float


class Trainer:
    """Trains the network of one trial config on one data set (for latent diffusion: the VAE's codes, with
    ``vae`` to decode samples); the model family is ``build_family``'s."""

    def __init__(self, cfg: TrialConfig, dataset: Dataset, device: Optional[torch.device] = None, amp="auto",
                 vae: Optional[torch.nn.Module] = None):
        validate(cfg)  # the same checks as `orchestrator validate`, for configs built in code
        self.dataset = dataset
        self.device = device or select_device()
        torch.manual_seed(cfg.seed)  # initial weights (a learned schedule's first, then the network's)
        self.family: Family = build_family(cfg, dataset, self.device, vae)
        self.num_classes = self.family.num_classes
        if cfg.model.class_conditional and (dataset.train_labels is None or not dataset.num_classes):
            raise ConfigError("model.class_conditional", True, "false for a data set without labels",
                              detail=f"data set {dataset.name} has no labels")
        self.network = build_network(cfg.model, dataset.shape, self.num_classes).to(self.device)
        # With CHANNELS_LAST_ON_CPU, image networks on CPU keep their convolution weights channels_last (NHWC).
        self.channels_last = CHANNELS_LAST_ON_CPU and self.device.type == "cpu" and len(dataset.shape) == 3
        if self.channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)
        self.ema = AveragedModel(self.network, multi_avg_fn=ema_update(cfg.train.ema_decay, cfg.train.ema_warmup))
        # Flat parameter lists, built once: the EMA and clipping update them with multi-tensor (foreach) ops
        # instead of walking the module tree every step.
        self._parameters = list(self.network.parameters())
        self._ema_parameters = list(self.ema.module.parameters())
        self._family_parameters = self.family.parameters()
        self._ema_updates = 0  # = ema.n_averaged, kept on the host (reading the buffer would synchronise)
        groups = [{"params": self._parameters}]
        if self._family_parameters:  # a learned schedule trains with the same optimizer
            groups.append({"params": self._family_parameters})
        self.optimizer = torch.optim.Adam(groups, lr=cfg.train.lr, **ADAM_OPTIONS)
        warmup = cfg.train.warmup
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.train_data = self.family.train_data
        self.train_labels = dataset.train_labels.to(self.device) if self.num_classes else None
        self.step = 0
        self.amp = amp_enabled(amp, self.device)  # bfloat16 autocast (resources.amp)
        # train.compile: the network the loss calls is torch.compile's wrapper (sharing the weights); checkpoints,
        # the EMA and sampling use the plain module
        # (static shapes: the batch never changes, and dynamic ones met an inductor bug with these U-Nets)
        self.training_network = torch.compile(self.network, dynamic=False) if cfg.train.compile else self.network
        self.rank, self.world = 0, 1  # this process's place in data-parallel training (data_parallel)

    # --- the family's, under the names callers use -------------------------------------------
    @property
    def cfg(self) -> TrialConfig:
        """The trial config (the family's: replacing it, e.g. its sample section, changes how the family samples)."""
        return self.family.cfg

    @cfg.setter
    def cfg(self, cfg: TrialConfig) -> None:
        self.family.cfg = cfg

    likelihood_note = property(lambda self: self.family.likelihood_note, doc="why there are no bits/dim, or None")
    learned_schedule = property(lambda self: self.family.learned_schedule)
    process = property(lambda self: self.family.process, doc="a Gaussian family's process")
    parameterization = property(lambda self: self.family.parameterization)
    weighting = property(lambda self: self.family.weighting)
    time_sampler = property(lambda self: self.family.time_sampler)
    degradation = property(lambda self: self.family.degradation, doc="naive and cold diffusion's degradation")
    prior_noise = property(lambda self: self.family.prior_noise, doc="naive and cold: std of x_T's perturbation")

    def step_size(self) -> int:
        """Naive and cold diffusion: the levels between two visited ones (``RestorationFamily.step_size``)."""
        return self.family.step_size()

    def restorer(self, network: torch.nn.Module):
        """Naive and cold diffusion: ``R(x_s, s) -> x0_hat`` (``RestorationFamily.restorer``)."""
        return self.family.restorer(network)

    def denoiser(self, labels: Optional[torch.Tensor] = None) -> Denoiser:
        """The training network as a Gaussian family's model of eps."""
        return self.family.denoiser(self.network, labels)

    def ema_denoiser(self, labels: Optional[torch.Tensor] = None, guidance_scale: float = 1.0) -> Denoiser:
        """The EMA model; for a class-conditional one, asked for ``labels`` (None: its unconditional
        model) with classifier-free guidance ``guidance_scale``."""
        return self.family.denoiser(self.ema.module, labels, guidance_scale)

    def ode_denoiser(self) -> tuple[Denoiser, str]:
        """The EMA model on the path its probability-flow ODE runs on, and a note of that path
        (``GaussianFamily.ode_denoiser``)."""
        return self.family.ode_denoiser(self.ema.module)

    # --- training ----------------------------------------------------------------------------
    def training_labels(self, index: torch.Tensor) -> Optional[torch.Tensor]:
        """The labels of a training batch of a class-conditional model, each replaced by the null label
        with probability ``train.cond_dropout`` (Ho & Salimans 2022, Algorithm 1); None otherwise."""
        if self.num_classes is None:
            return None
        labels = self.train_labels[index]
        if self.cfg.train.cond_dropout > 0:
            dropped = torch.rand(labels.shape, generator=self.generator, device=self.device) < self.cfg.train.cond_dropout
            labels = torch.where(dropped, torch.full_like(labels, self.num_classes), labels)
        return labels

    def batch_losses(self, x0: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-example losses [B] of one batch under the training network (the family's loss)."""
        return self.family.batch_losses(self.training_network, x0, labels, self.generator)

    def train_step(self) -> float:
        """One optimizer step on a random batch; returns the loss. Raises TrainingDiverged (after the step). With
        the Gaussian family this is the loop of Ho et al. 2020, Algorithm 1 (and Ho & Salimans 2022, Algorithm 1,
        with label dropout), plus Adam's warm-up, clipping and the EMA."""
        loss = self._step()
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(self.step, value)
        return value

    def _step(self) -> torch.Tensor:
        """:meth:`train_step` without reading the loss on the host: returns it as a detached 0-d tensor, so that
        a CUDA device is never waited for between log points."""
        self.network.train()
        index = torch.randint(
            len(self.train_data), (self.cfg.train.batch_size,), generator=self.generator, device=self.device
        )
        x0 = self.train_data[index]
        if self.cfg.train.hflip:  # a random left-right flip of each image (random horizontal flips, Ho et al. 2020)
            flip = torch.rand(len(x0), generator=self.generator, device=self.device) < 0.5
            x0 = torch.where(flip.view(-1, *[1] * (x0.dim() - 1)), x0.flip(-1), x0)
        labels = self.training_labels(index)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            losses = self.batch_losses(x0, labels)
        loss = losses.float().mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.family.backward(loss, losses)
        if self.world > 1 and self._family_parameters:  # a learned schedule: DDP averages the network's only
            distributed.average_gradients(self._family_parameters, self.world)
        clip = self.cfg.train.grad_clip
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self._parameters, clip, foreach=True)
            if self._family_parameters:
                torch.nn.utils.clip_grad_norm_(self._family_parameters, clip, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.update_ema()
        self.step += 1
        return loss.detach()

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- d ema + (1 - d) w over every parameter at once (AveragedModel's update with
        :func:`ema_update`'s decay, as multi-tensor ops on the flat lists; the first update copies the weights).
        In data-parallel training only rank 0 keeps the EMA (every rank holds the same weights)."""
        if self.rank:
            return
        n = self._ema_updates
        if n == 0:
            torch._foreach_copy_(self._ema_parameters, self._parameters)
        else:
            decay = ema_decay_at(self.cfg.train.ema_decay, self.cfg.train.ema_warmup, n)
            torch._foreach_lerp_(self._ema_parameters, self._parameters, 1 - decay)
        self.ema.n_averaged += 1
        self._ema_updates = n + 1

    def train(
        self,
        until: Optional[int] = None,
        on_log: Optional[Callable[[int, float], None]] = None,
        on_checkpoint: Optional[Callable[[int], None]] = None,
        on_eval: Optional[Callable[[int], None]] = None,
    ) -> list[StepRecord]:
        """Train until step ``until`` (default: train.steps). ``on_log(step, mean_loss)`` is called every
        ``train.log_every`` steps with the mean loss since the last call; ``on_checkpoint(step)`` every
        ``train.checkpoint_every`` steps; ``on_eval(step)`` every ``eval.every`` steps, after the checkpoint of
        that step (FID during training: ``evaluation.fid_during_training``)."""
        until = self.cfg.train.steps if until is None else until
        history, window = [], []
        every = self.cfg.train.checkpoint_every
        while self.step < until:
            window.append(self._step())
            log = self.step % self.cfg.train.log_every == 0 or self.step == until
            checkpoint = bool(on_checkpoint and every and self.step % every == 0)
            if log or checkpoint:  # the losses are read here only: one host synchronisation per log point
                values = self._check_finite(window)
                if log:
                    record = StepRecord(self.step, float(np.mean(values)))
                    history.append(record)
                    window = []
                    if on_log:
                        on_log(record.step, record.loss)
            if checkpoint:
                on_checkpoint(self.step)
            if on_eval and self.cfg.eval.every and self.step % self.cfg.eval.every == 0:
                on_eval(self.step)
        return history

    def _check_finite(self, window: list[torch.Tensor]) -> list[float]:
        """The losses of the last ``len(window)`` steps as floats; TrainingDiverged naming the first that is not
        finite (checked before anything is logged or checkpointed)."""
        values = torch.stack(window).tolist()
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise TrainingDiverged(self.step - len(values) + 1 + offset, value)
        return values

    def data_parallel(self) -> None:
        """Train as one process of the ``torch.distributed`` default group, when it has more than one: each process
        evaluates its shard of the same global batch of ``train.batch_size`` (``diffusion.distributed``) and the
        gradients are averaged, so that the steps are those of one process up to rounding. Call it on every process
        after loading a checkpoint (all load the same one); the weights are rank 0's from here on. Only rank 0
        keeps the EMA; dropout's random state is seeded per rank and step."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        distributed.shard_bounds(self.cfg.train.batch_size, self.rank, self.world)  # a batch that splits evenly
        self.training_network = distributed.ShardedNetwork(distributed.wrap(self.training_network, self.device),
                                                           self.rank, self.world)
        if self.rank:  # rank 0 keeps the single-process stream (its checkpoint holds it)
            torch.manual_seed(hash((self.cfg.seed, self.rank, self.step)) % 2**63)

    # --- sampling and likelihood of the EMA model --------------------------------------------
    def sample_labels(self, n: int) -> Optional[torch.Tensor]:
        """The classes n samples are asked for when sampling is conditional; None otherwise."""
        return self.family.sample_labels(n)

    def sample(self, n: int, seed: int, labels: Optional[torch.Tensor] = None,
               classifier: Optional[torch.nn.Module] = None,
               progress: Optional[Callable[[int, int], None]] = None) -> tuple[torch.Tensor, int]:
        """n samples from the EMA network; returns (samples on CPU, NFE per sample). ``labels [n]``: the
        class of each sample (default :meth:`sample_labels`); ``classifier``: the noise-conditional
        classifier of classifier guidance (``sample.classifier_scale`` > 0). A latent model's samples are
        codes: :meth:`decode` makes images of them. ``progress(done, total)``: told after every sampler step
        (it changes nothing drawn)."""
        self.ema.module.eval()
        generator = torch.Generator(device=self.device).manual_seed(seed)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.family.sample(self.ema.module, n, generator, labels, classifier, progress=progress)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples as data: a latent model's codes decoded by its VAE (given to the Trainer), others unchanged."""
        return self.family.decode(samples)

    def heldout_likelihood(self):
        """Bits/dim of the first ``eval.bpd_n`` test examples under the EMA model
        (``GaussianFamily.heldout_likelihood``); NotImplementedError(:attr:`likelihood_note`) without them."""
        return self.family.heldout_likelihood(self.ema.module)

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rng = {
            "generator": self.generator.get_state(),
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_to_tensors(np.random.get_state()),
            "python": torch.tensor(bytearray(repr(random.getstate()).encode())),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "network": self.network.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **self.family.state_dict(),  # time_sampler, schedule
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION}")
        self.step = int(state["step"])
        self.network.load_state_dict(state["network"])
        self.ema.load_state_dict(state["ema"])
        self._ema_updates = int(self.ema.n_averaged)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.family.load_state_dict(state)
        rng = state["rng"]
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        np.random.set_state(_numpy_state_from_tensors(rng["numpy"]))
        random.setstate(ast.literal_eval(bytes(rng["python"].tolist()).decode()))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def save(self, path: str) -> None:
        """Write a checkpoint atomically (a temporary file, then a rename)."""
        save_atomic(self.state_dict(), path)

    def load(self, path: str) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))

    def save_ema(self, path: str) -> None:
        """The EMA weights alone (and a learned schedule): what a user needs to sample from the trained model."""
        save_atomic({"network": self.ema.module.state_dict(), "step": self.step, **self.family.model_state()}, path)

    def load_ema(self, path: str) -> None:
        """Load what :meth:`save_ema` wrote into the EMA network (and the learned schedule): a trained model
        to sample from and evaluate, without its optimizer state."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.ema.module.load_state_dict(state["network"])
        self.family.load_model_state(state)
        self.step = int(state["step"])


def _numpy_state_to_tensors(state) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached}


def _numpy_state_from_tensors(d: dict):
    return ("MT19937", d["keys"].numpy().astype(np.uint32), int(d["pos"]), int(d["has_gauss"]), float(d["cached"]))


def build_trainer(cfg: TrialConfig, dataset: Dataset, device: Optional[torch.device] = None, amp="auto",
                  vae: Optional[torch.nn.Module] = None) -> Trainer:
    """The trainer of a trial (its family: ``families.build_family``); ``vae``: a latent model's, to decode samples."""
    return Trainer(cfg, dataset, device, amp, vae)
