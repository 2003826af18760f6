"""What a trial measures on a trained model: ``evaluate(model, data, cfg) -> Report``.

The evaluation protocol of the zoo, in one place: draw ``sample.n`` samples from the EMA model (seed
``cfg.seed + 1``; a latent model's codes decoded by its VAE), check they are finite, draw the sample grid, and
measure what ``cfg.eval`` asks for: FID and KID with their floors (``diffusion.metrics.compute_fid``), the
per-class metrics of a conditional model on labelled images, bits/dim of held-out data
(``Trainer.heldout_likelihood``) or the reason there are none (tag ``bpd.skipped``), and the inverse-problem
stages (``diffusion.inverse.solve_heldout``, seeds ``cfg.seed + 10 + index``).

The result is a :class:`Report` of plain values (metrics, tags, PIL images and JSON-able dicts, each image
and dict named by the artifact file it becomes), which the orchestrator records in MLflow and a notebook can
read directly::

    report = evaluate(trainer, dataset, trainer.cfg)
    report.metrics["fid"], report.images["samples.png"]

A new metric is a few lines here. Things worth keeping between evaluations are the caller's: the VAE of a
latent model, the guidance classifier, and the held-out likelihood (``likelihood``: a memo around its
computation). Without them, the classifier is trained here and the likelihood computed here.
"""
from __future__ import annotations

import contextlib
import io
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch

from .guidance import fit_noisy_classifier
from .inverse import restoration_grid, solve_heldout
from .latent import LIKELIHOOD_NOTE
from .errors import ConfigError
from .metrics import (available_examples, compute_fid, conditional_metrics, extractor_refusal, missing_fid_files,
                      reference_refusal, statistics_split)
from .metrics.downloads import inception_dir
from .factory import make_timesteps
from .registry import options_for
from .validation import during_training_config

if TYPE_CHECKING:
    from .config import TrialConfig
    from .data import Dataset

SAMPLES_IMAGE = "samples.png"  # the sample grid's artifact file
ELBO_FILE = "elbo_terms.json"  # the discrete bound's per-step terms
CONDITIONAL_NO_DROPOUT = ("class-conditional model without an unconditional half (train.cond_dropout 0): its "
                          "bits/dim of unlabelled data is not defined")

Likelihood = Callable[[Callable[[], dict]], dict]  # likelihood(compute) -> compute()'s dict, perhaps memoized
# progress(phase, done, total): the evaluation is at ``done`` of ``total`` steps of ``phase``, one of PHASES
Progress = Callable[[str, int, int], None]
# the phases of an evaluation, in order: the guidance classifier trained here, sampling (``done`` counts sampler
# steps over every batch), FID and KID, bits/dim, and each inverse-problem stage by its name (eval.inverse)
PHASES = ("classifier", "sample", "fid", "bpd", "inpaint", "denoise")


@dataclass
class Report:
    """What an evaluation measured: ``metrics`` (name -> number), ``tags`` (name -> text), ``images`` (artifact
    file name -> PIL image: ``samples.png``, ``<stage>.png``), ``files`` (artifact file name -> JSON-able dict:
    ``elbo_terms.json``), all at training step ``step``."""

    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    images: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict] = field(default_factory=dict)
    step: int = 0


def evaluate(model, data: Dataset, cfg: TrialConfig, *, vae: Optional[torch.nn.Module] = None,
             classifier: Optional[torch.nn.Module] = None, likelihood: Optional[Likelihood] = None,
             report: Optional[Report] = None, progress: Optional[Progress] = None) -> Report:
    """Measure the trained ``model`` (a ``diffusion.training.Trainer`` with its EMA weights; ``cfg`` its
    config) on the data set ``data`` (pixels, for a latent model too) as ``cfg.eval`` says.

    ``vae``: a latent model's VAE (``diffusion.latent``) to decode its samples with; None: ``model.decode`` (a
    trainer that holds its VAE), if the model has one. ``classifier``: the
    noise-conditional classifier of classifier guidance (``sample.classifier_scale`` > 0); None: it is trained
    here (``guidance.fit_noisy_classifier``). ``likelihood(compute)``: returns ``compute()``'s dict ({"metrics",
    "tags", "elbo_curve"}), or a stored copy of it (the orchestrator's model cache); None: ``compute()``.
    ``report``: filled in as things are measured (default: a new one), so that a caller holds what was
    measured before an error; returned. ``progress(phase, done, total)``: told as each phase (``PHASES``) starts
    (``done`` 0) and after every sampler step; it is only told, so the report is the same with it or without."""
    report = report if report is not None else Report()
    report.step = model.step
    progress = progress or (lambda phase, done, total: None)
    labels = model.sample_labels(cfg.sample.n)
    if cfg.sample.classifier_scale and classifier is None:
        progress("classifier", 0, 1)
        classifier = fit_noisy_classifier(data, model.process, model.device, seed=cfg.seed,
                                          steps=cfg.sample.classifier_steps)[0]
    progress("sample", 0, 1)
    samples = _draw(model, cfg, labels, classifier if cfg.sample.classifier_scale else None, vae, report,
                    lambda done, total: progress("sample", done, total))
    finite = torch.isfinite(samples).all().item()
    report.tags["samples_finite"] = str(bool(finite))
    if cfg.sample.grid:
        shown = samples[: cfg.sample.grid] if data.is_image else samples  # 2-D: every point
        report.images[SAMPLES_IMAGE] = sample_image(shown, data.is_image)
    if cfg.eval.fid:
        if not finite:
            raise RuntimeError("samples contain NaN or infinite values: FID cannot be computed")
        progress("fid", 0, 1)
        _sample_quality(samples, labels, data, cfg, model.device, report)
    if cfg.eval.bpd:
        progress("bpd", 0, 1)
        _bits_per_dim(model, cfg, likelihood, report)
    if cfg.eval.inverse:
        _inverse_problems(model, data, cfg, report, progress)
    return report


def _draw(model, cfg: TrialConfig, labels, classifier, vae, report: Report,
          progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """``sample.n`` samples (decoded to images for a latent model), with ``sample_seconds`` and ``sample_nfe``."""
    started = time.perf_counter()
    samples, nfe = model.sample(cfg.sample.n, seed=cfg.seed + 1, labels=labels, classifier=classifier,
                                progress=progress)
    samples = _decode(model, cfg, vae, samples)
    report.metrics.update({"sample_seconds": time.perf_counter() - started, "sample_nfe": float(nfe)})
    return samples


@contextlib.contextmanager
def preserved_random_state():
    """Run a block without touching the global random state of torch (CPU and CUDA), numpy and Python: a
    measurement taken during training leaves the training's random draws (dropout) as they were."""
    python, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)


def fid_during_training(model, data: Dataset, cfg: TrialConfig, vae: Optional[torch.nn.Module] = None) -> dict:
    """FID and KID of the EMA model now (``eval.every``): ``eval.every_n`` samples drawn by ``eval.every_sampler`` in
    ``eval.every_steps`` steps (``validation.during_training_config``), measured against the final FID's reference
    features, without standard errors. Returns {"fid", "kid" (with ``eval.kid``), "every_seconds"}; samples that
    are not finite give an infinite FID. Training's random state is left as it was (``preserved_random_state``)."""
    quick = during_training_config(cfg)
    started = time.perf_counter()
    saved = model.cfg
    with preserved_random_state():
        model.cfg = quick  # the family samples as its config's sample section says
        try:
            labels = model.sample_labels(quick.sample.n)
            samples = _decode(model, quick, vae, model.sample(quick.sample.n, seed=cfg.seed + 2, labels=labels)[0])
            if not torch.isfinite(samples).all():
                return {"fid": math.inf, "every_seconds": time.perf_counter() - started}
            options = options_for(compute_fid, quick.eval, renames={"n": "fid_n"}, device=model.device)
            result = compute_fid(samples, data, **{**options, "stderr": False, "fid_inf": False})
        finally:
            model.cfg = saved
    metrics = {"fid": result.fid, "every_seconds": time.perf_counter() - started}
    if result.kid is not None:
        metrics["kid"] = result.kid
    return metrics


def _decode(model, cfg: TrialConfig, vae, samples: torch.Tensor) -> torch.Tensor:
    """Samples as data: latent codes decoded to images (measured in pixel space), by ``vae`` or the model's own."""
    if vae is not None:
        with torch.no_grad():
            return torch.cat([vae.decode_codes(z.to(model.device)).cpu() for z in samples.split(cfg.sample.batch_size)])
    if hasattr(model, "decode"):
        return model.decode(samples)
    if cfg.model.latent:
        raise ValueError("model.latent: the samples are latent codes, evaluate needs the VAE (vae=...)")
    return samples


def check_fid(data: Dataset, cfg: TrialConfig) -> None:
    """What FID on ``data`` needs besides the samples, as ConfigErrors naming the key: ``eval.extractor`` able to
    serve the data set, ``eval.reference`` (published statistics: inception features of images of their size),
    and clean-fid's files on disk unless ``eval.download`` (a missing file named with the exact path to place it
    at and its URL). The orchestrator's preflight runs it before a sweep starts; ``evaluate`` again."""
    refusal = extractor_refusal(cfg.eval.extractor, data)
    if refusal is not None:
        raise ConfigError("eval.extractor", *refusal)
    refused = reference_refusal(cfg.eval.reference, data, cfg.eval.extractor)
    if refused is not None:
        raise ConfigError(refused[0], *refused[1])
    missing = missing_fid_files(data, **options_for(missing_fid_files, cfg.eval))
    if missing:
        where = inception_dir(cfg.eval.cache_dir)
        raise ConfigError("eval.download", cfg.eval.download,
                          f"true (to fetch {'it' if len(missing) == 1 else 'them'} into {where} on first use)",
                          detail="; ".join(item.message() for item in missing) + f"; with eval.extractor "
                          f"{cfg.eval.extractor} and eval.reference {cfg.eval.reference}")


def _check_fid(samples: torch.Tensor, data: Dataset, cfg: TrialConfig) -> None:
    """``eval.fid_n``, ``eval.extractor``, ``eval.reference`` and ``eval.download`` against these samples and this
    data set, as ConfigErrors naming the key (validation cannot decide them: they depend on the split sizes, the
    image shape and clean-fid's files on disk)."""
    split = statistics_split(cfg.eval.reference, cfg.eval.reference_split)
    available = available_examples(len(samples), data, split)
    n = cfg.eval.fid_n if cfg.eval.fid_n is not None else available
    if n > available or n < 2:
        raise ConfigError("eval.fid_n", cfg.eval.fid_n, f"an integer in [2, {available}] or null",
                          detail=f"{len(samples)} samples, {len(data.test)} test and {len(data.train)} train examples")
    check_fid(data, cfg)


def _sample_quality(samples: torch.Tensor, labels, data: Dataset, cfg: TrialConfig, device, report: Report) -> None:
    """FID and KID with their floors and tags; for conditional samples of labelled images, the class metrics."""
    _check_fid(samples, data, cfg)
    result = compute_fid(samples, data, **options_for(compute_fid, cfg.eval, renames={"n": "fid_n"}, device=device))
    report.metrics.update({"fid": result.fid, "fid_reference": result.fid_reference})
    if result.kid is not None:
        report.metrics.update({"kid": result.kid, "kid_reference": result.kid_reference})
    if result.fid_stderr is not None:
        report.metrics.update({"fid_stderr": result.fid_stderr, "fid_reference_stderr": result.fid_reference_stderr})
    if result.kid_stderr is not None:
        report.metrics.update({"kid_stderr": result.kid_stderr, "kid_reference_stderr": result.kid_reference_stderr})
    fits = {"samples": (result.fid_inf, "fid_inf"), "reference": (result.fid_inf_reference, "fid_inf_reference")}
    fits = {side: fit for side, fit in fits.items() if fit[0] is not None}
    report.metrics.update({metric: fit.fid_inf for fit, metric in fits.values()})
    if fits:
        report.files["fid_inf.json"] = {side: fit.as_dict() for side, (fit, _) in fits.items()}
    report.tags.update({k: str(v) for k, v in result.tags.items()})
    if labels is not None and data.is_image:
        class_metrics, tags = conditional_metrics(samples, labels, data, **options_for(conditional_metrics, cfg.eval,
                                                                                      device=device))
        report.metrics.update(class_metrics)
        report.tags.update(tags)


def likelihood_skipped(model, cfg: TrialConfig) -> Optional[str]:
    """Why the model has no bits/dim of held-out data (the tag ``bpd.skipped``), or None when it has them."""
    if model.likelihood_note:
        return model.likelihood_note
    if cfg.model.latent:
        return LIKELIHOOD_NOTE
    if cfg.model.class_conditional and cfg.train.cond_dropout == 0:
        return CONDITIONAL_NO_DROPOUT
    return None


def _bits_per_dim(model, cfg: TrialConfig, likelihood: Optional[Likelihood], report: Report) -> None:
    """Bits/dim of held-out data (``bpd_seconds``: its computing time), with ``elbo_terms.json`` for a discrete
    process; or the tag ``bpd.skipped`` saying why there are none."""
    skipped = likelihood_skipped(model, cfg)
    if skipped is not None:
        report.tags["bpd.skipped"] = skipped
        return

    def compute() -> dict:
        started = time.perf_counter()
        result = model.heldout_likelihood()
        return {"metrics": {**result.metrics, "bpd_seconds": time.perf_counter() - started},
                "tags": dict(result.tags), "elbo_curve": result.elbo_curve}

    stored = compute() if likelihood is None else likelihood(compute)
    report.metrics.update(stored["metrics"])
    report.tags.update({k: str(v) for k, v in stored["tags"].items()})
    if stored["elbo_curve"] is not None:
        report.files[ELBO_FILE] = stored["elbo_curve"]


def _inverse_problems(model, data: Dataset, cfg: TrialConfig, report: Report, progress: Progress) -> None:
    """The ``eval.inverse`` stages on the first ``eval.inverse_n`` test images with the EMA model: per stage its
    metrics (``diffusion.inverse.solve_heldout``, plus ``<stage>_seconds``), a grid ``<stage>.png`` of observed /
    restored / true images, and tags naming the solver and the measurement (added once every stage is done)."""
    device = model.device
    images = data.test[: cfg.eval.inverse_n].to(device)
    timesteps = make_timesteps(model.process, cfg.sample, device)
    tags = {}
    for index, stage in enumerate(cfg.eval.inverse):
        progress(stage, 0, 1)
        generator = torch.Generator(device=device).manual_seed(cfg.seed + 10 + index)
        started = time.perf_counter()
        result = solve_heldout(stage, model.ema_denoiser(), images, timesteps, generator,
                               **options_for(solve_heldout, cfg.eval, renames={
                                   name: f"inverse_{name}"
                                   for name in ("solver", "mask", "fraction", "sigma_y", "guidance", "cg_iterations")}))
        report.metrics.update({**result["metrics"], f"{stage}_seconds": time.perf_counter() - started})
        measurement = f"mask {cfg.eval.inverse_mask}" if stage == "inpaint" else f"sigma_y {cfg.eval.inverse_sigma_y}"
        tags[f"{stage}.solver"], tags[f"{stage}.measurement"] = cfg.eval.inverse_solver, measurement
        tags[f"{stage}.images"] = str(len(images))
        grid = restoration_grid(result["observed"], result["restored"], images, nrow=min(16, len(images)))
        report.images[f"{stage}.png"] = grid_image(grid)
    report.tags.update(tags)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def sample_image(samples: torch.Tensor, is_image: bool):
    """The sample grid as a PIL image: images in [-1, 1] side by side (about square), or 2-D points scattered."""
    if not is_image:
        return scatter_image(samples)
    from torchvision.utils import make_grid

    nrow = max(1, int(math.sqrt(len(samples))))
    grid = make_grid(samples.clamp(-1, 1), nrow=nrow, padding=1, normalize=True, value_range=(-1, 1), pad_value=0.5)
    return grid_image(grid)


def grid_image(grid: torch.Tensor):
    """An image grid [3, H, W] in [0, 1] as a PIL image, enlarged 4x (8x8 digits are otherwise too small to see)."""
    from PIL import Image

    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(array).resize((array.shape[1] * 4, array.shape[0] * 4), Image.NEAREST)


def scatter_image(points: torch.Tensor):
    """2-D points [N, 2] as a 400 x 400 scatter plot (a PIL image). Drawn on a bare ``Figure`` (the Agg canvas,
    pixel for pixel what pyplot draws): pyplot's backend, e.g. a notebook's, is left alone."""
    from matplotlib.figure import Figure
    from PIL import Image

    figure = Figure(figsize=(4, 4), dpi=100)
    axes = figure.subplots()
    axes.scatter(points[:, 0].numpy(), points[:, 1].numpy(), s=2)
    axes.set_aspect("equal")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
