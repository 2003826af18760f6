"""Validation of a trial config: every value checked against the registry that serves it, and the
combinations that make no mathematical sense refused with the reason (``ConfigError``).

This module sits above the registries (processes, parameterizations, losses, samplers, networks, data sets,
degradations, extractors, inverse solvers), which check their own options where they can (``process_families.validate``,
``nets.validate``); :func:`validate` runs all of them on a TrialConfig, and ties the sections together.
"""
from __future__ import annotations

import dataclasses
import math

from . import blur  # noqa: F401  (registers process.name blur, so process_families.validate knows it)
from . import (data, degradations, elbo, likelihood, losses, metrics, nets, parameterizations, process_families, samplers,
               score_matching)
from .config import INT_BOUNDS, TrialConfig, show_bound
from .errors import ConfigError
from .inverse import INVERSE_SOLVERS, MASKS, STAGES


def _get(cfg: TrialConfig, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _check_bounds(cfg: TrialConfig) -> None:
    """Every integer option within INT_BOUNDS (None, 'continuous' and wrong types are left to the specific checks)."""
    for key, (low, high) in INT_BOUNDS.items():
        value = _get(cfg, key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int) and not isinstance(item, bool) and not low <= item <= high:
                each = "each element " if isinstance(value, list) else ""
                also = " or 'continuous'" if key == "process.T" else ""
                raise ConfigError(key, value, f"{each}an integer >= {show_bound(low)} and <= {show_bound(high)}{also}",
                                  detail="the bounds of the option table")


def _check_finite(value, key: str) -> None:
    """No infinite or NaN number anywhere in the config (dataclass fields, lists, dicts), naming its dotted key."""
    if dataclasses.is_dataclass(value):
        for item in dataclasses.fields(value):
            _check_finite(getattr(value, item.name), f"{key}.{item.name}" if key else item.name)
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_finite(item, f"{key}.{name}")
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_finite(item, key)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, value, "a finite number", detail="inf and nan are refused everywhere")


def _check(cond: bool, key: str, value, accepted: str) -> None:
    if not cond:
        raise ConfigError(key, value, accepted)


# Processes that are not Gaussian (Bansal et al. 2022): a network restores x0 from a degraded image.
RESTORATION_PROCESSES = ("naive", "cold")


def _validate_restoration(cfg: TrialConfig, point_sets: tuple[str, ...]) -> TrialConfig:
    """Naive and cold diffusion: images, an integer T, an x0-predicting network trained with the squared error,
    and their own samplers; the Gaussian-only options keep their defaults (a different value would be ignored)."""
    process = cfg.process
    what = f"process.name {process.name}"
    _check(cfg.data.name not in point_sets, "data.name", cfg.data.name, f"an image data set with {what} (degradations act on pixels)")
    _check(isinstance(process.T, int) and not isinstance(process.T, bool) and process.T >= 1, "process.T", process.T,
           f"an integer >= 1 (the number of degradation levels) with {what}")
    if process.name == "cold":
        degradations.DEGRADATIONS.get(process.degradation)
        _check(process.degradation != "naive", "process.degradation", process.degradation,
               "mask, blur or pixelate (salt and pepper is process.name naive)")
    _check(process.blur_sigma_max > 0, "process.blur_sigma_max", process.blur_sigma_max, "a positive number")
    defaults, gaussian_only = TrialConfig(), [
        ("model.parameterization", cfg.model.parameterization), ("model.variance", cfg.model.variance),
        ("loss.weighting", cfg.loss.weighting), ("loss.t_sampling", cfg.loss.t_sampling),
        ("loss.objective", cfg.loss.objective), ("model.class_conditional", cfg.model.class_conditional),
        ("model.latent", cfg.model.latent),
        ("sample.guidance_scale", cfg.sample.guidance_scale), ("sample.classifier_scale", cfg.sample.classifier_scale)]
    for key, value in gaussian_only:
        section, name = key.split(".")
        default = getattr(getattr(defaults, section), name)
        _check(value == default, key, value, f"{default!r} with {what}",)
    if cfg.sample.sampler not in degradations.COLD_SAMPLERS.names():
        raise ConfigError("sample.sampler", cfg.sample.sampler, f"{', '.join(degradations.COLD_SAMPLERS.names())} with {what}",
                          detail="the Gaussian samplers need eps, alpha and sigma; a degradation has none")
    _check(cfg.sample.prior_noise is None or cfg.sample.prior_noise >= 0, "sample.prior_noise", cfg.sample.prior_noise,
           "a number >= 0 or null (the degradation's default)")
    if cfg.sample.steps is not None:
        _check(1 <= cfg.sample.steps <= process.T, "sample.steps", cfg.sample.steps, f"an integer in [1, process.T = {process.T}] or null")
    nets.validate(cfg.model)
    _validate_train(cfg)
    _check(cfg.train.cond_dropout == 0, "train.cond_dropout", cfg.train.cond_dropout, f"0 with {what}")
    for key in ("n", "batch_size"):
        _check(getattr(cfg.sample, key) >= 1, f"sample.{key}", getattr(cfg.sample, key), "an integer >= 1")
    _validate_common(cfg)
    return cfg


def _validate_blur(cfg: TrialConfig, point_sets: tuple[str, ...]) -> None:
    """Blur diffusion is Gaussian per DCT frequency: the samplers, parameterizations and losses whose formulas are
    elementwise in alpha and sigma carry over; those that read one alpha and sigma per example do not (yet)."""
    what = "process.name blur"
    _check(cfg.data.name not in point_sets, "data.name", cfg.data.name, f"an image data set with {what} (it blurs images)")
    for key, value, accepted in (
        ("model.parameterization", cfg.model.parameterization, ("eps", "x0", "v", "score")),
        ("model.variance", cfg.model.variance, ("beta_tilde", "beta")),
        ("loss.weighting", cfg.loss.weighting, ("simple",)),
        ("loss.t_sampling", cfg.loss.t_sampling, ("uniform",)),
        ("loss.objective", cfg.loss.objective, ("denoising",)),
        ("sample.sampler", cfg.sample.sampler, ("ancestral", "ddim")),
        ("sample.spacing", cfg.sample.spacing, ("uniform", "leading", "trailing", "quadratic")),
    ):
        _check(value in accepted, key, value, f"{' or '.join(str(a) for a in dict.fromkeys(accepted))} with {what}")


def _validate_latent(cfg: TrialConfig, point_sets: tuple[str, ...]) -> None:
    model = cfg.model
    if not model.latent:
        return
    _check(cfg.data.name not in point_sets, "model.latent", True, "false for 2-D data (the VAE is convolutional)")
    _check(cfg.process.name in ("vp", "ve", "subvp"), "model.latent", True,
           f"false with process.name {cfg.process.name} (latent diffusion runs a Gaussian process: vp, ve or subvp)")
    _check(cfg.loss.objective == "denoising", "loss.objective", cfg.loss.objective, "denoising with model.latent")
    _check(model.latent_factor in (1, 2, 4), "model.latent_factor", model.latent_factor, "1, 2 or 4")
    for key in ("latent_channels", "vae_channels", "vae_steps"):
        _check(getattr(model, key) >= 1, f"model.{key}", getattr(model, key), "an integer >= 1")
    _check(model.vae_kl_weight >= 0, "model.vae_kl_weight", model.vae_kl_weight, "a number >= 0")
    _check(model.vae_lr > 0, "model.vae_lr", model.vae_lr, "a positive number")
    _check(cfg.sample.classifier_scale == 0, "sample.classifier_scale", cfg.sample.classifier_scale,
           "0 with model.latent (the guidance classifier is trained on images, not codes; classifier-free guidance works)")


def _validate_inverse(cfg: TrialConfig, point_sets: tuple[str, ...]) -> None:
    """Inverse-problem stages: an unconditional Gaussian model with one alpha and sigma per time, on images."""
    if not cfg.eval.inverse:
        return
    for stage in cfg.eval.inverse:
        _check(stage in STAGES, "eval.inverse", stage, f"a list of {', '.join(STAGES)}")
    _check(len(set(cfg.eval.inverse)) == len(cfg.eval.inverse), "eval.inverse", list(cfg.eval.inverse), "each stage at most once")
    why = "inverse problems are solved with an unconditional Gaussian model's score"
    _check(cfg.process.name in ("vp", "ve", "subvp"), "eval.inverse", list(cfg.eval.inverse),
           f"[] with process.name {cfg.process.name} ({why}, one alpha and sigma per time)")
    _check(not cfg.model.class_conditional, "eval.inverse", list(cfg.eval.inverse), f"[] with model.class_conditional ({why})")
    _check(not cfg.model.latent, "eval.inverse", list(cfg.eval.inverse), "[] with model.latent (masks and noise act on pixels, not codes)")
    _check(cfg.data.name not in point_sets, "eval.inverse", list(cfg.eval.inverse), "[] for 2-D data (PSNR and SSIM are for images)")
    INVERSE_SOLVERS.get(cfg.eval.inverse_solver)
    _check(cfg.eval.inverse_mask in MASKS, "eval.inverse_mask", cfg.eval.inverse_mask, ", ".join(MASKS))
    _check(0 < cfg.eval.inverse_fraction < 1, "eval.inverse_fraction", cfg.eval.inverse_fraction, "a number in (0, 1)")
    _check(cfg.eval.inverse_sigma_y > 0, "eval.inverse_sigma_y", cfg.eval.inverse_sigma_y, "a positive number")
    _check(cfg.eval.inverse_n >= 1, "eval.inverse_n", cfg.eval.inverse_n, "an integer >= 1")
    _check(cfg.eval.inverse_guidance >= 0, "eval.inverse_guidance", cfg.eval.inverse_guidance, "a number >= 0")
    _check(cfg.eval.inverse_cg_iterations >= 1, "eval.inverse_cg_iterations", cfg.eval.inverse_cg_iterations, "an integer >= 1")


def _validate_common(cfg: TrialConfig) -> None:
    """The eval section, the same for every kind of process."""
    _validate_inverse(cfg, data.POINT_SETS)
    metrics.EXTRACTORS.get(cfg.eval.extractor)
    for key in ("bpd_n", "hutchinson_probes", "dequant_draws"):
        _check(getattr(cfg.eval, key) >= 1, f"eval.{key}", getattr(cfg.eval, key), "an integer >= 1")
    _check(cfg.eval.ode_rtol > 0, "eval.ode_rtol", cfg.eval.ode_rtol, "a positive number")
    _check(cfg.eval.ode_atol > 0, "eval.ode_atol", cfg.eval.ode_atol, "a positive number")
    _check(cfg.eval.ode_max_nfe >= 10, "eval.ode_max_nfe", cfg.eval.ode_max_nfe, "an integer >= 10")
    likelihood.DIVERGENCES.get(cfg.eval.divergence)
    likelihood.PROBES.get(cfg.eval.probe)
    _check(cfg.eval.classifier_steps >= 1, "eval.classifier_steps", cfg.eval.classifier_steps, "an integer >= 1")
    _check(cfg.eval.reference_split in ("train", "test"), "eval.reference_split", cfg.eval.reference_split, "train or test")
    published = metrics.REFERENCES.get(cfg.eval.reference)
    if published is not None:  # the data set's image shape is checked once it is loaded (evaluation.check_fid)
        _check(cfg.eval.extractor == "inception", "eval.extractor", cfg.eval.extractor,
               f"inception with eval.reference {cfg.eval.reference} (clean-fid's published Inception statistics)")
        _check(cfg.data.name not in data.POINT_SETS, "eval.reference", cfg.eval.reference,
               "split for 2-D data (published statistics are of images)")
    if cfg.eval.fid_n is not None:
        _check(cfg.eval.fid_n >= 2, "eval.fid_n", cfg.eval.fid_n, "an integer >= 2 or null")


def _check_conditioning(cfg: TrialConfig, labelled: tuple[str, ...]) -> None:
    """Class conditioning and guidance: labels must exist, and guidance needs the model it extrapolates from."""
    sample = cfg.sample
    conditional = cfg.model.class_conditional
    if conditional or sample.classifier_scale > 0:
        key, value = ("model.class_conditional", True) if conditional else ("sample.classifier_scale", sample.classifier_scale)
        _check(cfg.data.name in labelled, "data.name", cfg.data.name,
               f"a labelled data set ({', '.join(labelled)}) with {key} = {value}")
    if conditional:
        _check(cfg.loss.objective == "denoising", "loss.objective", cfg.loss.objective,
               "denoising with model.class_conditional (the score-matching objectives are unconditional)")
    if cfg.train.hflip:
        _check(cfg.data.name not in data.POINT_SETS and not cfg.model.latent, "train.hflip", True,
               "false for 2-D points and for latent diffusion (whose codes are not images)")
    _check(0.0 <= cfg.train.cond_dropout < 1.0, "train.cond_dropout", cfg.train.cond_dropout, "a number in [0, 1)")
    if cfg.train.cond_dropout > 0:
        _check(conditional, "train.cond_dropout", cfg.train.cond_dropout,
               "0 unless model.class_conditional is true (label dropout trains a conditional model's unconditional half)")
    _check(sample.guidance_scale >= 0, "sample.guidance_scale", sample.guidance_scale, "a number >= 0")
    if sample.guidance_scale != 1.0:
        if not conditional:
            raise ConfigError("sample.guidance_scale", sample.guidance_scale,
                              "1 (no guidance) unless model.class_conditional is true",
                              detail="classifier-free guidance mixes a class-conditional model's two predictions")
        if cfg.train.cond_dropout == 0:
            raise ConfigError("sample.guidance_scale", sample.guidance_scale, "1 when train.cond_dropout is 0",
                              detail="the unconditional prediction is only trained with label dropout (train.cond_dropout > 0)")
    _check(sample.classifier_scale >= 0, "sample.classifier_scale", sample.classifier_scale, "a number >= 0")
    _check(sample.classifier_steps >= 1, "sample.classifier_steps", sample.classifier_steps, "an integer >= 1")


def _validate_train(cfg: TrialConfig) -> None:
    """The train section, the same for every kind of process."""
    for key in ("steps", "batch_size", "log_every"):
        _check(getattr(cfg.train, key) >= 1, f"train.{key}", getattr(cfg.train, key), "an integer >= 1")
    _check(cfg.train.lr > 0, "train.lr", cfg.train.lr, "a positive number")
    _check(0.0 <= cfg.train.ema_decay < 1.0, "train.ema_decay", cfg.train.ema_decay, "a number in [0, 1)")
    _check(cfg.train.grad_clip >= 0, "train.grad_clip", cfg.train.grad_clip, "a number >= 0 (0 disables)")
    _check(cfg.train.checkpoint_every >= 0, "train.checkpoint_every", cfg.train.checkpoint_every, "an integer >= 0")
    _check(cfg.train.warmup >= 0, "train.warmup", cfg.train.warmup, "an integer >= 0")
    _check(isinstance(cfg.train.compile, bool), "train.compile", cfg.train.compile, "true or false")


def _validate_model(cfg: TrialConfig) -> None:
    """What the network predicts and its reverse variance, given the process's time (discrete or continuous)."""
    parameterization = parameterizations.PARAMETERIZATIONS.get(cfg.model.parameterization)
    continuous = cfg.process.T == "continuous"
    if parameterization.needs_step and continuous:
        raise ConfigError("model.parameterization", cfg.model.parameterization, "eps, score, x0, v or edm in continuous time",
                          detail="mean predicts the posterior mean of one step back, t - 1/T, which needs an integer process.T")
    elbo.REVERSE_VARIANCES.get(cfg.model.variance)
    if cfg.model.variance == "learned_range" and continuous:
        raise ConfigError("model.variance", "learned_range", "beta or beta_tilde in continuous time",
                          detail="learned_range interpolates between the beta and beta-tilde of one discrete step")
    nets.validate(cfg.model)


def _validate_loss(cfg: TrialConfig) -> None:
    losses.WEIGHTINGS.get(cfg.loss.weighting)
    _check(cfg.loss.min_snr_gamma > 0, "loss.min_snr_gamma", cfg.loss.min_snr_gamma, "a positive number")
    losses.T_SAMPLINGS.get(cfg.loss.t_sampling)
    _check(cfg.loss.importance_bins >= 1, "loss.importance_bins", cfg.loss.importance_bins, "an integer >= 1")
    _check(cfg.loss.hybrid_lambda >= 0, "loss.hybrid_lambda", cfg.loss.hybrid_lambda, "a number >= 0")
    if cfg.process.schedule == "learned":
        _check(cfg.loss.weighting == "elbo", "loss.weighting", cfg.loss.weighting,
               "elbo with process.schedule learned (the VDM schedule is trained by the variational bound)")


def _validate_score_matching(cfg: TrialConfig) -> None:
    """Implicit and sliced score matching: sigma^2-weighted, on 2-D data, with an MLP and no bound."""
    if cfg.loss.objective == "denoising":
        return
    score_matching.OBJECTIVES.get(cfg.loss.objective)
    score_matching.PROJECTIONS.get(cfg.loss.projection)
    _check(cfg.loss.weighting == "sigma2", "loss.weighting", cfg.loss.weighting,
           f"sigma2 with loss.objective {cfg.loss.objective} (score matching is weighted by lambda = sigma^2)")
    _check(cfg.model.arch in ("auto", "mlp"), "model.arch", cfg.model.arch,
           f"mlp (or auto) with loss.objective {cfg.loss.objective}: it is for low-dimensional data")
    _check(cfg.loss.n_projections >= 1, "loss.n_projections", cfg.loss.n_projections, "an integer >= 1")
    _check(cfg.data.name in data.POINT_SETS, "data.name", cfg.data.name,
           f"a 2-D set ({', '.join(data.POINT_SETS)}) with loss.objective {cfg.loss.objective}: exact Jacobian "
           "traces and projections are for low-dimensional data")
    for key, value, accepted in (("process.schedule", cfg.process.schedule, "a fixed schedule"),
                                 ("model.variance", cfg.model.variance, "beta or beta_tilde")):
        _check(value not in ("learned", "learned_range"), key, value,
               f"{accepted} with loss.objective {cfg.loss.objective} (score matching has no variational bound)")


def _validate_sample(cfg: TrialConfig) -> None:
    """The sample section of a Gaussian process: the sampler, its NFE budget and time spacing, and its options."""
    samplers.SAMPLERS.get(cfg.sample.sampler)
    for key in ("n", "batch_size", "steps_per_level"):
        _check(getattr(cfg.sample, key) >= 1, f"sample.{key}", getattr(cfg.sample, key), "an integer >= 1")
    _check(cfg.sample.step_size > 0, "sample.step_size", cfg.sample.step_size, "a positive number")
    if cfg.sample.steps is not None:
        _check(cfg.sample.steps >= 1, "sample.steps", cfg.sample.steps, "an integer >= 1 or null")
        if isinstance(cfg.process.T, int):
            _check(cfg.sample.steps <= cfg.process.T, "sample.steps", cfg.sample.steps,
                   f"an integer <= process.T = {cfg.process.T}")
    samplers.SPACINGS.get(cfg.sample.spacing)
    if cfg.process.T == "continuous":
        _check(cfg.sample.spacing not in ("leading", "trailing"), "sample.spacing", cfg.sample.spacing,
               "uniform, quadratic or karras in continuous time (leading and trailing pick discrete steps)")
    _check(0.0 <= cfg.sample.eta <= 1.0, "sample.eta", cfg.sample.eta, "a number in [0, 1]")
    _check(cfg.sample.churn >= 0, "sample.churn", cfg.sample.churn, "a number >= 0")
    _check(cfg.sample.prior_noise is None, "sample.prior_noise", cfg.sample.prior_noise,
           "null with a Gaussian process (it perturbs the start of naive and cold generation)")
    _check(cfg.sample.snr > 0, "sample.snr", cfg.sample.snr, "a positive number")
    _check(cfg.sample.corrector_steps >= 0, "sample.corrector_steps", cfg.sample.corrector_steps, "an integer >= 0")
    _check(cfg.sample.rtol > 0 and cfg.sample.atol > 0, "sample.rtol", cfg.sample.rtol, "positive tolerances")
    _check(cfg.sample.rho > 0, "sample.rho", cfg.sample.rho, "a positive number")
    _check(cfg.sample.grid >= 0, "sample.grid", cfg.sample.grid, "an integer >= 0")


# eval.every's sampling options and the sample section's keys they stand for (during_training_config)
EVERY_KEYS = {"sample.sampler": "eval.every_sampler", "sample.steps": "eval.every_steps", "sample.n": "eval.every_n"}


def during_training_config(cfg: TrialConfig) -> TrialConfig:
    """The config FID during training (``eval.every``) samples and measures with: the sample section with
    ``eval.every_sampler``, ``eval.every_steps`` and ``eval.every_n`` (no image grid), FID and KID on all of those
    samples (no standard errors, no FID-infinity, no bits/dim or inverse problems)."""
    ev = cfg.eval
    steps = ev.every_steps
    if steps is None:
        steps = min(50, cfg.process.T) if isinstance(cfg.process.T, int) else 50
    sample = dataclasses.replace(cfg.sample, sampler=ev.every_sampler, steps=steps, n=ev.every_n, grid=0,
                                 classifier_scale=0.0)
    evaluation = dataclasses.replace(ev, every=0, fid=True, fid_n=None, bpd=False, inverse=[])
    return dataclasses.replace(cfg, sample=sample, eval=evaluation)


def _validate_every(cfg: TrialConfig) -> None:
    """``eval.every``: needs FID; its sampling options pass the checks of the sample section they replace, and an
    error names the eval key."""
    if cfg.eval.every == 0:
        return
    _check(cfg.eval.fid, "eval.every", cfg.eval.every, "0 while eval.fid is false (FID during training is FID)")
    try:
        validate(during_training_config(cfg))
    except ConfigError as error:
        if error.key not in EVERY_KEYS:
            raise
        raise ConfigError(EVERY_KEYS[error.key], error.value, error.accepted, error.detail) from None


def validate(cfg: TrialConfig) -> TrialConfig:
    """Check every value of a trial config; raise ConfigError naming the first bad one."""
    _validate_every(cfg)
    _check_finite(cfg, "")
    _check_bounds(cfg)
    data.DATASETS.get(cfg.data.name)
    _check(0.0 < cfg.data.test_fraction < 1.0, "data.test_fraction", cfg.data.test_fraction, "a number in (0, 1)")
    _check(cfg.data.n_points >= 10, "data.n_points", cfg.data.n_points, "an integer >= 10")
    if cfg.process.name in RESTORATION_PROCESSES:
        return _validate_restoration(cfg, data.POINT_SETS)
    process_families.validate(cfg.process)
    if cfg.process.name == "blur":
        _validate_blur(cfg, data.POINT_SETS)
    _validate_model(cfg)
    _validate_loss(cfg)
    _check_conditioning(cfg, data.LABELLED_SETS)
    _validate_latent(cfg, data.POINT_SETS)
    _validate_score_matching(cfg)
    _validate_train(cfg)
    _validate_sample(cfg)
    _validate_common(cfg)
    return cfg
