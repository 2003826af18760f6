"""A trained model to sample from in a notebook: its config, EMA weights and data set in one object.

    model = load_trained(cfg, "ema.pt")        # a TrialConfig and the weights Trainer.save_ema wrote
    x = model.sample(16)                        # the config's sampler; model.sample(16, steps=50, sampler="ddim")
    model.image(x)                              # a PIL image of the grid, as the evaluation logs it
    model.network, model.cfg, model.data        # the torch module (EMA weights), the config, the data set

``model.sample(cfg.sample.n)`` draws what ``diffusion.evaluation.evaluate`` draws (seed ``cfg.seed + 1``, the
same labels, a latent model's codes decoded the same way), so a notebook sees the evaluation's samples again.
Where the config and the weights come from (an MLflow run, a model-cache entry) is the orchestrator's business
(``orchestrator.results.load_model``); nothing here reads MLflow or the cache's layout.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import torch

from .config import TrialConfig
from .data import Dataset, load_dataset
from .evaluation import _decode, sample_image
from .latent import latent_dataset
from .training import Trainer, build_trainer, select_device
from .validation import validate


class TrainedModel:
    """A trained model and what sampling from it needs. ``trainer``: the ``Trainer`` holding the EMA network;
    ``data``: the data set (pixels, also for a latent model); ``vae``: a latent model's VAE; ``classifier``:
    classifier guidance's noise-conditional classifier; ``source``: where the weights came from (shown in repr)."""

    def __init__(self, trainer: Trainer, data: Dataset, *, vae: Optional[torch.nn.Module] = None,
                 classifier: Optional[torch.nn.Module] = None, source: str = ""):
        self.trainer, self.data, self.vae, self.classifier, self.source = trainer, data, vae, classifier, source
        self.nfe: Optional[int] = None  # network evaluations per sample of the last call to sample

    cfg = property(lambda self: self.trainer.cfg, doc="the trial config (its sample section: the default sampler)")
    network = property(lambda self: self.trainer.ema.module, doc="the torch module with the EMA weights")
    device = property(lambda self: self.trainer.device)
    step = property(lambda self: self.trainer.step, doc="the training step the weights are from")

    def __repr__(self) -> str:
        s = self.cfg.sample
        return (f"TrainedModel({self.cfg.process.name} {self.cfg.model.parameterization} on {self.data.name}, step "
                f"{self.step}, sampler {s.sampler} steps {s.steps}, {self.source or 'weights given'})")

    def sample_config(self, **overrides: Any) -> TrialConfig:
        """The config with ``overrides`` of its sample section (``steps=50, sampler="ddim"``, any ``SampleConfig``
        field), validated: a ConfigError names a value that does not fit the model; TypeError for an unknown name."""
        names = {f.name for f in dataclasses.fields(self.cfg.sample)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"sample options {unknown} do not exist; accepted: {', '.join(sorted(names))}")
        cfg = dataclasses.replace(self.cfg, sample=dataclasses.replace(self.cfg.sample, **overrides))
        validate(cfg)
        return cfg

    def sample(self, n: Optional[int] = None, *, seed: Optional[int] = None, labels: Optional[torch.Tensor] = None,
               **overrides: Any) -> torch.Tensor:
        """``n`` samples (default ``sample.n``) as data (images in [-1, 1] or points, on the CPU; a latent model's
        codes decoded), from seed ``seed`` (default ``cfg.seed + 1``, the evaluation's), for the classes ``labels``
        (default: what the evaluation asks a conditional model for), with the config's sampler or ``overrides`` of
        its sample section (``steps=``, ``sampler=``, ``eta=``, ``guidance_scale=``, ...). ``self.nfe``: the
        network evaluations per sample."""
        cfg = self.sample_config(**{k: v for k, v in overrides.items() if v is not None}) if overrides else self.cfg
        n = cfg.sample.n if n is None else n
        if cfg.sample.classifier_scale and self.classifier is None:
            raise ValueError(f"sample.classifier_scale: {cfg.sample.classifier_scale} needs the noise-conditional "
                             "classifier (classifier=... when loading); accepted: 0 without it")
        saved = self.trainer.cfg
        self.trainer.cfg = cfg
        try:
            labels = self.trainer.sample_labels(n) if labels is None else labels
            samples, self.nfe = self.trainer.sample(n, seed=cfg.seed + 1 if seed is None else seed, labels=labels,
                                                    classifier=self.classifier if cfg.sample.classifier_scale else None)
            return _decode(self.trainer, cfg, self.vae, samples)
        finally:
            self.trainer.cfg = saved

    def image(self, samples: torch.Tensor):
        """Samples as the evaluation draws them (``samples.png``): a PIL image of images side by side, or of
        2-D points scattered."""
        return sample_image(samples, self.data.is_image)


def load_trained(cfg: TrialConfig, weights: str, *, data: Optional[Dataset] = None,
                 vae: Optional[torch.nn.Module] = None, classifier: Optional[torch.nn.Module] = None,
                 device: Union[str, torch.device, None] = None, amp="auto", source: str = "") -> TrainedModel:
    """The model of ``cfg`` with the EMA weights ``weights`` (a file :meth:`Trainer.save_ema` wrote, loaded with
    ``weights_only=True``), on ``device`` (default ``auto``: CUDA when visible); ``data``: its data set (default
    ``load_dataset(cfg.data)``); ``vae``: a latent model's VAE (required then); ``classifier``: classifier
    guidance's. ValueError naming ``vae`` for a latent model without one."""
    data = load_dataset(cfg.data) if data is None else data
    if cfg.model.latent and vae is None:
        raise ValueError("vae: None for a latent model (model.latent: true); accepted: its trained VAE")
    device = select_device("auto") if device is None or device == "auto" else torch.device(device)
    if vae is not None:
        vae = vae.to(device).eval()
    trainer = build_trainer(cfg, latent_dataset(data, vae) if cfg.model.latent else data, device, amp)
    trainer.load_ema(weights)
    if classifier is not None:
        classifier = classifier.to(device).eval()
    return TrainedModel(trainer, data, vae=vae, classifier=classifier, source=source)
