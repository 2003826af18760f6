"""Training: Adam, EMA of the weights, gradient clipping, exact resume from checkpoints.

A :class:`Trainer` owns every piece of state that training touches, including its random
generator, so that ``save`` then ``load`` into a fresh Trainer continues bit for bit.
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

from .config import TrialConfig, validate
from .data import Dataset
from .denoiser import Denoiser, network_denoiser
from .losses import WEIGHTINGS, TimeSampler, diffusion_loss
from .nets import build_network
from .parameterizations import PARAMETERIZATIONS
from .processes import build_process, continuous_limit
from .samplers import draw_samples
from .storage import save_atomic

CHECKPOINT_VERSION = 1


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""

    def __init__(self, step: int, loss: float):
        self.step, self.loss = step, loss
        super().__init__(f"loss is {loss} at step {step}: training diverged")


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from .errors import ConfigError

        raise ConfigError("resources.device", name, "auto or cpu (no CUDA device is visible)")
    return torch.device(name)


def ema_update(decay: float, warmup: bool):
    """The EMA step for AveragedModel: ema <- d ema + (1 - d) w with d = decay, or with warm-up
    d = min(decay, (1 + n) / (10 + n)) at the n-th update (the num_updates rule of TensorFlow's
    ExponentialMovingAverage), so that the average forgets the random initial weights quickly."""

    def update(ema_params, params, num_averaged):
        n = float(num_averaged)
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        for ema_param, param in zip(ema_params, params):
            ema_param.lerp_(param.detach(), 1 - d)

    return update


@dataclass
class StepRecord:
    step: int
    loss: float


class Trainer:
    """Trains the network of one trial config on one data set."""

    likelihood_note: Optional[str] = None  # why the model has no bits/dim (None: it has them)

    def __init__(self, cfg: TrialConfig, dataset: Dataset, device: Optional[torch.device] = None):
        validate(cfg)  # the same checks as `orchestrator validate`, for configs built in code
        self.cfg = cfg
        self.dataset = dataset
        self.device = device or select_device(cfg.resources.device)
        torch.manual_seed(cfg.seed)  # initial weights
        self._build_process()
        self.learned_schedule = self.process is not None and self.process.learned
        self.num_classes = dataset.num_classes if cfg.model.class_conditional else None
        if cfg.model.class_conditional and (dataset.train_labels is None or not dataset.num_classes):
            from .errors import ConfigError

            raise ConfigError("model.class_conditional", True, "false for a data set without labels",
                              detail=f"data set {dataset.name} has no labels")
        self.network = build_network(cfg.model, dataset.shape, self.num_classes).to(self.device)
        self.ema = AveragedModel(self.network, multi_avg_fn=ema_update(cfg.train.ema_decay, cfg.train.ema_warmup))
        groups = [{"params": list(self.network.parameters())}]
        if self.learned_schedule:  # the VDM schedule trains with the same optimizer
            self.process.schedule.to(self.device)
            groups.append({"params": list(self.process.parameters())})
        self.optimizer = torch.optim.Adam(groups, lr=cfg.train.lr)
        self.learned_variance = cfg.model.variance == "learned_range"
        warmup = cfg.train.warmup
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.time_sampler = TimeSampler(self.process, cfg.loss) if self.process is not None else None
        self.train_data = dataset.train.to(self.device)
        self.train_labels = dataset.train_labels.to(self.device) if self.num_classes else None
        self.step = 0
        self.amp = cfg.resources.amp and self.device.type == "cuda"

    def _build_process(self) -> None:
        """The forward process and how the network and the loss read it: a Gaussian process x_t = alpha x0 +
        sigma eps, a parameterization and a loss weighting (subclasses build other processes)."""
        self.process = build_process(self.cfg.process, tuple(self.dataset.shape))
        self.parameterization = PARAMETERIZATIONS.get(self.cfg.model.parameterization)
        self.weighting = WEIGHTINGS.get(self.cfg.loss.weighting)

    # --- denoisers ---------------------------------------------------------------------------
    def denoiser(self, labels: Optional[torch.Tensor] = None) -> Denoiser:
        return network_denoiser(self.network, self.parameterization, self.process, self.learned_variance, labels)

    def ema_denoiser(self, labels: Optional[torch.Tensor] = None, guidance_scale: float = 1.0) -> Denoiser:
        """The EMA model; for a class-conditional one, asked for ``labels`` (None: its unconditional
        model) with classifier-free guidance ``guidance_scale``."""
        return network_denoiser(self.ema.module, self.parameterization, self.process, self.learned_variance, labels,
                                guidance_scale)

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

    # --- training ----------------------------------------------------------------------------
    def batch_losses(self, x0: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-example losses [B] of one batch (one network evaluation each): ``diffusion_loss``."""
        return diffusion_loss(self.denoiser(labels), self.weighting, x0, self.generator, self.cfg.loss,
                              levels=self.dataset.levels, variance=self.cfg.model.variance,
                              time_sampler=self.time_sampler, reduction="none")

    def train_step(self) -> float:
        """One optimizer step on a random batch; returns the loss. Raises TrainingDiverged."""
        self.network.train()
        index = torch.randint(
            len(self.train_data), (self.cfg.train.batch_size,), generator=self.generator, device=self.device
        )
        x0 = self.train_data[index]
        labels = self.training_labels(index)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            losses = self.batch_losses(x0, labels)
        loss = losses.mean()
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(self.step + 1, value)
        self.optimizer.zero_grad(set_to_none=True)
        schedule_grads = None
        if self.learned_schedule and self.process.T is None:
            # Continuous time: with fixed end points the expected bound does not depend on the schedule's
            # shape, so the schedule minimizes the estimator's variance instead: its gradient is that of
            # E[L^2] (Kingma et al. 2021, sec. 5.2), the network's that of E[L].
            schedule_grads = torch.autograd.grad((losses**2).mean(), list(self.process.parameters()),
                                                 retain_graph=True)
        loss.backward()
        if schedule_grads is not None:
            for parameter, grad in zip(self.process.parameters(), schedule_grads):
                parameter.grad = grad
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.cfg.train.grad_clip)
            if self.learned_schedule:
                torch.nn.utils.clip_grad_norm_(self.process.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update_parameters(self.network)
        self.step += 1
        return value

    def train(
        self,
        until: Optional[int] = None,
        on_log: Optional[Callable[[int, float], None]] = None,
        on_checkpoint: Optional[Callable[[int], None]] = None,
    ) -> list[StepRecord]:
        """Train until step ``until`` (default: train.steps). ``on_log(step, mean_loss)`` is called every
        ``train.log_every`` steps with the mean loss since the last call; ``on_checkpoint(step)`` every
        ``train.checkpoint_every`` steps."""
        until = self.cfg.train.steps if until is None else until
        history, window = [], []
        while self.step < until:
            window.append(self.train_step())
            if self.step % self.cfg.train.log_every == 0 or self.step == until:
                record = StepRecord(self.step, float(np.mean(window)))
                history.append(record)
                window = []
                if on_log:
                    on_log(record.step, record.loss)
            every = self.cfg.train.checkpoint_every
            if on_checkpoint and every and self.step % every == 0:
                on_checkpoint(self.step)
        return history

    # --- sampling ----------------------------------------------------------------------------
    def sample_labels(self, n: int) -> Optional[torch.Tensor]:
        """The classes n samples are asked for (every class in turn) when sampling is conditional: a
        class-conditional model or classifier guidance; None otherwise."""
        if self.num_classes is None and self.cfg.sample.classifier_scale == 0:
            return None
        from .guidance import round_robin_labels

        return round_robin_labels(n, self.dataset.num_classes)

    def sample(self, n: int, seed: int, labels: Optional[torch.Tensor] = None,
               classifier: Optional[torch.nn.Module] = None) -> tuple[torch.Tensor, int]:
        """n samples from the EMA network; returns (samples on CPU, NFE per sample). ``labels [n]``: the
        class of each sample (default :meth:`sample_labels`); ``classifier``: the noise-conditional
        classifier of classifier guidance (``sample.classifier_scale`` > 0)."""
        self.ema.module.eval()
        generator = torch.Generator(device=self.device).manual_seed(seed)
        labels = self.sample_labels(n) if labels is None else labels
        scale = self.cfg.sample.classifier_scale
        if scale > 0 and classifier is None:
            raise ValueError("sample.classifier_scale > 0 needs the noise-conditional classifier")

        def denoiser_for(start: int, size: int) -> Denoiser:
            batch = None if labels is None else labels[start:start + size].to(self.device)
            model = self.ema_denoiser(batch if self.num_classes else None, self.cfg.sample.guidance_scale)
            if scale > 0:
                from .guidance import classifier_guided

                model = classifier_guided(model, classifier.eval(), batch, scale)
            return model

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return draw_samples(denoiser_for, self.cfg.sample, self.dataset.shape, n, generator, self.device,
                                variance=self.cfg.model.variance, process=self.process)

    def heldout_likelihood(self):
        """Bits/dim of the first ``eval.bpd_n`` test examples under the EMA model
        (``diffusion.likelihood.heldout_likelihood``), with a generator seeded from the trial seed."""
        from .likelihood import heldout_likelihood

        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 2)
        x = self.dataset.test[: self.cfg.eval.bpd_n].to(self.device)
        ode, path_tag = self.ode_denoiser()
        result = heldout_likelihood(self.ema_denoiser(), x, self.dataset.levels, self.cfg.eval, generator,
                                    variance=self.cfg.model.variance, batch_size=self.cfg.sample.batch_size,
                                    ode_denoiser=ode)
        if path_tag:
            result.tags["bpd_ode.path"] = path_tag
        return result

    def ode_denoiser(self) -> tuple[Denoiser, str]:
        """The EMA model (in eval mode) on the path its probability-flow ODE runs on, with a note of that
        path for discrete models ("" for continuous ones): a discrete model runs through the continuous limit
        of its schedule (``processes.continuous_limit``) unless its parameterization reads the discrete step
        (``mean``), which stays on the discrete process."""
        self.ema.module.eval()
        path, deviation = self.process, 0.0
        if not self.parameterization.needs_step:
            path, deviation = continuous_limit(self.cfg.process, self.process)
        ode = network_denoiser(self.ema.module, self.parameterization, path, self.learned_variance)
        if self.process.T is None:
            return ode, ""
        limit = "continuous limit of the schedule" if path is not self.process else "the discrete process"
        return ode, f"{limit} (max |log-SNR difference| of the limit on the grid: {deviation:.3f})"

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
            "time_sampler": self.time_sampler.state_dict() if self.time_sampler is not None else {},
            "schedule": self.process.schedule.state_dict() if self.learned_schedule else {},
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION}")
        self.step = int(state["step"])
        self.network.load_state_dict(state["network"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.time_sampler is not None:
            self.time_sampler.load_state_dict(state["time_sampler"])
        if self.learned_schedule:
            self.process.schedule.load_state_dict(state["schedule"])
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
        state = {"network": self.ema.module.state_dict(), "step": self.step}
        if self.learned_schedule:
            state["schedule"] = self.process.schedule.state_dict()
        save_atomic(state, path)

    def load_ema(self, path: str) -> None:
        """Load what :meth:`save_ema` wrote into the EMA network (and the learned schedule): a trained model
        to sample from and evaluate, without its optimizer state."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.ema.module.load_state_dict(state["network"])
        if self.learned_schedule:
            self.process.schedule.load_state_dict(state["schedule"])
        self.step = int(state["step"])


def _numpy_state_to_tensors(state) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached}


def _numpy_state_from_tensors(d: dict):
    return ("MT19937", d["keys"].numpy().astype(np.uint32), int(d["pos"]), int(d["has_gauss"]), float(d["cached"]))


# Processes that are not Gaussian: a network restores x0 from a degraded image (Bansal et al. 2022).
RESTORATION_PROCESSES = ("naive", "cold")


class RestorationTrainer(Trainer):
    """Naive and cold diffusion (Bansal et al. 2022, "Cold Diffusion"): a degradation D(x0, s), s = 0..T
    (``diffusion.degradations``), and a network R(x_s, s / T) that predicts x0, trained with the squared
    error of its prediction (``restoration_loss``) and sampled by ``denoise_renoise`` or ``cold_improved``
    from draws of the degradation's prior. ``sample.steps`` is the NFE budget, as for every sampler: the
    step K between visited levels is round(T / steps). Such a model defines no likelihood
    (:attr:`likelihood_note` says why), and has no class conditioning or guidance."""

    likelihood_note = ("naive and cold diffusion define no likelihood: their degradations are not Gaussian "
                       "(deterministic, or salt and pepper), so there is no variational bound or ODE to integrate")

    def _build_process(self) -> None:
        from .degradations import build_degradation

        process = self.cfg.process
        name = "naive" if process.name == "naive" else process.degradation
        self.degradation = build_degradation(name, int(process.T), tuple(self.dataset.shape),
                                             blur_sigma_max=process.blur_sigma_max, order_seed=self.cfg.seed)
        self.process = self.parameterization = self.weighting = None

    def restorer(self, network: torch.nn.Module):
        """``R(x_s, s) -> x0_hat`` for integer levels s [B]: the network sees the time s / T in [0, 1]."""
        T = self.degradation.T
        return lambda x_s, s: network(x_s, s.to(x_s.dtype) / T)

    def batch_losses(self, x0: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        from .degradations import restoration_loss

        return restoration_loss(self.restorer(self.network), self.degradation, x0, self.generator)

    def step_size(self) -> int:
        """K, the levels between two visited ones: round(T / sample.steps), at least 1 (every level without steps)."""
        T, steps = self.degradation.T, self.cfg.sample.steps
        return 1 if steps is None else max(1, round(T / steps))

    @property
    def prior_noise(self) -> float:
        """The std of the perturbation of x_T: ``sample.prior_noise``, else the degradation's default."""
        chosen = self.cfg.sample.prior_noise
        return self.degradation.prior_noise if chosen is None else float(chosen)

    def sample(self, n: int, seed: int, labels: Optional[torch.Tensor] = None,
               classifier: Optional[torch.nn.Module] = None) -> tuple[torch.Tensor, int]:
        from .degradations import COLD_SAMPLERS

        self.ema.module.eval()
        sampler = COLD_SAMPLERS.get(self.cfg.sample.sampler)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        restore = self.restorer(self.ema.module)
        batches, nfe = [], 0
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            for start in range(0, n, self.cfg.sample.batch_size):
                size = min(self.cfg.sample.batch_size, n - start)
                x_T = self.degradation.prior(size, self.train_data, generator)
                perturbation = None
                if self.prior_noise > 0:
                    perturbation = self.prior_noise * torch.randn(x_T.shape, generator=generator, device=x_T.device)
                x, nfe = sampler(restore, self.degradation, x_T, generator=generator, step=self.step_size(),
                                 perturbation=perturbation)
                batches.append(x.float().cpu())
        return torch.cat(batches), nfe

    def sample_labels(self, n: int) -> Optional[torch.Tensor]:
        return None

    def heldout_likelihood(self):
        raise NotImplementedError(self.likelihood_note)


class BlurTrainer(Trainer):
    """Blur diffusion (Lee et al. 2022, ``diffusion.blur``): a Gaussian process per DCT frequency. Training and
    sampling are the Gaussian ones on the DCT coefficients u of the images (the loss's squared errors are the
    same in either basis: the DCT is orthonormal); the network sees pixels (``blur.InBasis``)."""

    likelihood_note = ("bits/dim are not computed for blur diffusion: its model is Gaussian per DCT frequency, "
                       "but this tool's discretized decoder and probability-flow ODE solve are written for one "
                       "alpha and sigma per example")

    def denoiser(self, labels: Optional[torch.Tensor] = None) -> Denoiser:
        from .blur import InBasis

        return network_denoiser(InBasis(self.network, self.process), self.parameterization, self.process,
                                self.learned_variance, labels)

    def ema_denoiser(self, labels: Optional[torch.Tensor] = None, guidance_scale: float = 1.0) -> Denoiser:
        from .blur import InBasis

        return network_denoiser(InBasis(self.ema.module, self.process), self.parameterization, self.process,
                                self.learned_variance, labels, guidance_scale)

    def batch_losses(self, x0: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        return super().batch_losses(self.process.to_basis(x0), labels)

    def heldout_likelihood(self):
        raise NotImplementedError(self.likelihood_note)


def build_trainer(cfg: TrialConfig, dataset: Dataset, device: Optional[torch.device] = None) -> Trainer:
    """The trainer of a trial: :class:`RestorationTrainer` for naive and cold diffusion, :class:`BlurTrainer` for
    blur diffusion, :class:`Trainer` otherwise."""
    if cfg.process.name in RESTORATION_PROCESSES:
        return RestorationTrainer(cfg, dataset, device)
    return (BlurTrainer if cfg.process.name == "blur" else Trainer)(cfg, dataset, device)
