"""What the model cache keys its entries by: the trained diffusion model (``training_spec`` / ``training_key``),
the latent-diffusion VAE (``vae_spec``) and the guidance classifier (``classifier_spec``). Each spec is plain
data: everything that determines the trained weights, so trials that share it share one training."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib.metadata import PackageNotFoundError, version

from diffusion.config import TrialConfig

# What determines the trained weights: these sections and the seed (plus the package version). The sample,
# eval and resources sections never do, nor do the train options that only decide what is recorded or how fast
# the same computation runs (train.compile).
TRAINING_SECTIONS = ("data", "process", "model", "loss", "train")
NOT_TRAINING = {"train": ("log_every", "checkpoint_every", "compile")}


def package_version() -> str:
    try:
        return version("diffusion-orchestrator")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def training_spec(cfg: TrialConfig) -> dict:
    """Everything that affects training, as plain data: the TRAINING_SECTIONS (less NOT_TRAINING), the seed
    and the package version; the precision when ``resources.amp`` chooses it (true: bfloat16 autocast,
    false: float32; ``auto``, the default, follows the device, as the device itself does not enter the key); and
    ``resources.workers`` when training is data-parallel."""
    spec = {}
    for name in TRAINING_SECTIONS:
        section = dataclasses.asdict(getattr(cfg, name))
        spec[name] = {k: v for k, v in section.items() if k not in NOT_TRAINING.get(name, ())}
    amp = getattr(getattr(cfg, "resources", None), "amp", "auto")
    if amp != "auto":
        spec["precision"] = "bfloat16 autocast" if amp else "float32"
    workers = getattr(getattr(cfg, "resources", None), "workers", 1)
    if workers > 1:  # the same steps up to rounding, with dropout masks drawn per worker: not the same weights
        spec["data_parallel_workers"] = workers
    return {**spec, "seed": cfg.seed, "version": package_version()}


def training_key(cfg: TrialConfig) -> str:
    """The training stage's identity: a hash of :func:`training_spec`. Trials with the same key train the
    same model, whatever their sampler, NFE or evaluation settings."""
    blob = json.dumps(training_spec(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def vae_spec(cfg: TrialConfig) -> dict:
    """What determines a trained VAE: the data, the latent options, the batch size, the seed."""
    keys = ("latent_channels", "latent_factor", "vae_channels", "vae_steps", "vae_kl_weight", "vae_lr")
    return {"data": dataclasses.asdict(cfg.data), "model": {k: getattr(cfg.model, k) for k in keys},
            "batch_size": cfg.train.batch_size, "seed": cfg.seed}


def classifier_spec(cfg: TrialConfig) -> dict:
    """What determines a trial's noise-conditional classifier (classifier guidance): the data, the process,
    ``sample.classifier_steps``, the seed and the package version. Its hash names it in the model cache."""
    return {"data": dataclasses.asdict(cfg.data), "process": dataclasses.asdict(cfg.process),
            "classifier_steps": cfg.sample.classifier_steps, "seed": cfg.seed, "version": package_version(),
            "kind": "noisy_classifier"}
