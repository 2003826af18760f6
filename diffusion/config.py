"""Trial configuration: plain dataclasses, one per section.

`diffusion` knows nothing about YAML; the orchestrator turns these dataclasses into OmegaConf
structured configs, which check key names and types. Value checks that need the registries
(sampler names, schedules, ...) live in :func:`validate`, which raises :class:`ConfigError`.
Every field's comment is its documentation: the README's option table is generated from it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from .errors import ConfigError


@dataclass
class DataConfig:
    name: str = "digits"  # data set: digits, swiss_roll, moons, gaussian_mixture, mnist, fashion_mnist, cifar10, image_folder
    root: str = "data"  # where torchvision data sets and image_folder images live
    download: bool = False  # let torchvision download mnist/fashion_mnist/cifar10 into root
    image_size: int = 32  # image_folder only: images are resized to image_size x image_size
    n_points: int = 8000  # 2-D sets: number of points (train + test)
    test_fraction: float = 0.2  # share held out as the test split (digits and 2-D sets)
    split_seed: int = 0  # seed of the fixed train/test split


@dataclass
class ProcessConfig:
    name: str = "vp"  # vp (DDPM, VP-SDE), ve (NCSN, VE-SDE), subvp (sub-VP SDE, continuous only), blur (Lee et al. 2022: VP per DCT frequency, coarse to fine; integer T), naive (salt-and-pepper pixels), cold (Bansal et al. 2022: process.degradation)
    schedule: str = "linear"  # vp/subvp: linear, cosine, sigmoid, scaled_linear; ve: geometric; vp: learned (VDM, trained with loss.weighting elbo)
    T: Any = 1000  # number of discrete steps (ve: noise levels L), or continuous
    t_min: float = 1e-3  # continuous time: smallest t trained and sampled (discrete: 1/T)
    beta_start: float = 1e-4  # linear, scaled_linear: beta_1 at T=1000 (scaled by 1000/T for other T)
    beta_end: float = 0.02  # linear, scaled_linear: beta_T at T=1000 (scaled by 1000/T for other T)
    beta_min: float = 0.1  # continuous linear (VP-SDE): beta(0)
    beta_max: float = 20.0  # continuous linear (VP-SDE): beta(1)
    cosine_s: float = 0.008  # cosine: offset s (Nichol & Dhariwal 2021)
    sigmoid_start: float = -3.0  # sigmoid: start of the sigmoid's input range (Jabri et al. 2022)
    sigmoid_end: float = 3.0  # sigmoid: end of the sigmoid's input range
    sigmoid_tau: float = 1.0  # sigmoid: temperature
    max_beta: float = 0.999  # discrete cosine/sigmoid (and linear with T < 20): betas are clipped at this value
    sigma_min: float = 0.01  # geometric: smallest noise level
    sigma_max: float = 10.0  # geometric: largest noise level
    log_snr_max: float = 13.3  # learned: fixed log-SNR at t = 0 (Kingma et al. 2021: gamma_min = -13.3)
    log_snr_min: float = -5.0  # learned: fixed log-SNR at t = 1 (Kingma et al. 2021: gamma_max = 5)
    learned_hidden: int = 1024  # learned: width of the monotone log-SNR network
    degradation: str = "mask"  # cold: mask (pixels hidden in a fixed random order), blur (Gaussian blur of growing width) or pixelate (downsampling)
    blur_sigma_max: float = 4.0  # cold blur: width (std, pixels) of the blur at level T
    blur_sigma: float = 0.4  # blur (Lee et al. 2022): width (std, pixels) of the base blur D whose power D^(2 f(i)) each step applies per frequency (0: the VP process)
    blur_schedule: str = "quartic"  # blur: shape of the per-step blur exponent f(i) = blur_f_max g(i): quartic (i/T)^4, log log(i)/log(T), linear i/T
    blur_f_max: float = 0.14  # blur: f(T), the last step's exponent (Lee et al.: 0.14 quartic, 0.6 log)


@dataclass
class ModelConfig:
    parameterization: str = "eps"  # what the network predicts: eps, score, x0, v (Salimans & Ho 2022), mean (posterior mean of one step, integer T) or edm (Karras et al. 2022 preconditioning)
    variance: str = "beta_tilde"  # reverse variance (ancestral sampling, the bound): beta, beta_tilde, or learned_range (Nichol & Dhariwal 2021; discrete T, trained with the hybrid loss)
    arch: str = "auto"  # unet, mlp, or auto (unet for images, mlp for 2-D points)
    channels: int = 32  # unet: base channel count
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])  # unet: channels per resolution
    num_res_blocks: int = 1  # unet: ResNet blocks per resolution
    attention: bool = True  # unet: self-attention at the lowest resolution
    groups: int = 8  # unet: GroupNorm groups
    dropout: float = 0.0  # unet: dropout inside ResNet blocks
    hidden: int = 256  # mlp: hidden width
    depth: int = 4  # mlp: hidden layers
    class_conditional: bool = False  # a class-conditional network (label embedding added to the time embedding), on labelled data sets
    latent: bool = False  # latent diffusion (Rombach et al. 2022): a convolutional VAE is trained first (cached) and the process runs on its codes; samples are decoded
    latent_channels: int = 2  # latent: channels c of the code [c, H/f, W/f]
    latent_factor: int = 2  # latent: downsampling factor f of the code (1, 2 or 4; must divide the image size)
    vae_channels: int = 32  # latent: VAE convolution width
    vae_steps: int = 2000  # latent: VAE training steps (batch train.batch_size)
    vae_kl_weight: float = 1e-3  # latent: weight of the KL term per latent dimension against the reconstruction MSE per pixel (beta-VAE)
    vae_lr: float = 1e-3  # latent: VAE Adam learning rate


@dataclass
class LossConfig:
    weighting: str = "simple"  # elbo (the variational bound), simple (Ho et al. eps-MSE), sigma2 (Song & Ermon eq. 6), min_snr (Hang et al. 2023), likelihood (g^2, Song et al. 2021), edm (Karras et al. 2022)
    min_snr_gamma: float = 5.0  # min_snr: gamma
    t_sampling: str = "uniform"  # uniform, or importance: t drawn in proportion to sqrt(E[L_t^2]) (Nichol & Dhariwal 2021)
    hybrid_lambda: float = 0.001  # learned_range: weight of the bound in the hybrid loss L + lambda L_vlb (Nichol & Dhariwal 2021)
    importance_bins: int = 100  # importance in continuous time: number of equal time bins
    objective: str = "denoising"  # denoising (Vincent 2011), implicit (Hyvarinen 2005, exact Jacobian trace) or sliced (Song et al. 2019); the last two on noised 2-D data, weighted by sigma^2
    n_projections: int = 1  # sliced: random projections per example
    projection: str = "gaussian"  # sliced: gaussian or rademacher projections


@dataclass
class TrainConfig:
    steps: int = 3000  # optimizer steps
    batch_size: int = 128  # examples per step
    lr: float = 2e-4  # Adam learning rate
    warmup: int = 100  # linear learning-rate warm-up steps
    ema_decay: float = 0.999  # decay of the exponential moving average of the weights
    ema_warmup: bool = True  # use decay min(ema_decay, (1 + n) / (10 + n)) at update n, so early weights fade fast
    grad_clip: float = 1.0  # clip the gradient norm at this value (0 disables)
    log_every: int = 50  # record train_loss every this many steps
    checkpoint_every: int = 1000  # save a resumable checkpoint every this many steps (0: only at the end)
    cond_dropout: float = 0.0  # class_conditional: probability that a training label is replaced by the null label, training the unconditional model classifier-free guidance needs (Ho & Salimans 2022 use 0.1-0.2)


@dataclass
class SampleConfig:
    sampler: str = "ancestral"  # ancestral, ddim, annealed_langevin, euler_maruyama, reverse_diffusion, pc, ode_euler, ode_heun, ode_rk45, dpm_solver_2m; naive and cold processes: denoise_renoise, cold_improved (Bansal et al. 2022, Algorithms 1 and 2)
    n: int = 1000  # samples drawn per trial
    batch_size: int = 500  # samples drawn per network call
    steps: Optional[int] = None  # time steps visited, the NFE budget (default: every step of a discrete process; 100 in continuous time)
    spacing: str = "uniform"  # which times: uniform, leading, trailing (discrete only), quadratic (in the step index, from t_min up to t = 1; DDIM's code stops at 0.8 T), karras
    rho: float = 7.0  # karras spacing: exponent rho (Karras et al. 2022, eq. 5)
    eta: float = 0.0  # ddim: 0 deterministic, 1 ancestral (Song, Meng & Ermon 2021, eq. 16)
    churn: float = 0.0  # ode_heun: S_churn of Karras et al. 2022, Algorithm 2 (0: deterministic Algorithm 1)
    snr: float = 0.16  # pc: signal-to-noise ratio r of the Langevin corrector (Song et al. 2021, Algorithm 5)
    corrector_steps: int = 1  # pc: Langevin corrector steps per time step
    rtol: float = 1e-5  # ode_rk45: relative tolerance
    atol: float = 1e-5  # ode_rk45: absolute tolerance
    steps_per_level: int = 100  # annealed_langevin: Langevin steps per noise level
    step_size: float = 2e-5  # annealed_langevin: eps; level i uses eps * sigma_i^2 / sigma_min^2
    denoise: bool = True  # annealed_langevin: final Tweedie denoising step x + sigma_min^2 * score
    grid: int = 64  # samples shown in the logged image grid
    guidance_scale: float = 1.0  # class_conditional: classifier-free guidance s, eps_u + s (eps_c - eps_u) (Ho & Salimans 2022, eq. 6 with s = 1 + w): 0 unconditional, 1 conditional, > 1 guided (needs train.cond_dropout > 0 unless 1)
    classifier_scale: float = 0.0  # classifier guidance (Dhariwal & Nichol 2021): scale of grad log p(y | x_t) added to the score, from a noise-conditional classifier trained once per data set, process and seed (0: off)
    classifier_steps: int = 2000  # classifier guidance: training steps of the noise-conditional classifier
    prior_noise: Optional[float] = None  # naive and cold: std of the Gaussian perturbation of the generation start x_T that breaks a deterministic degradation's symmetry, subtracted again by cold_improved (Bansal et al. 2022, sec. 5.2; default: 0.5 for mask, 0.01 for blur and pixelate, 0 for naive)


@dataclass
class EvalConfig:
    fid: bool = True  # compute FID (and fid_reference)
    extractor: str = "auto"  # FID features: auto, classifier (offline CNN), inception (clean-fid), raw (2-D coordinates)
    reference_split: str = "train"  # FID is measured against this split's statistics
    fid_n: Optional[int] = None  # samples used for FID (default: min(sample.n, test split size))
    kid: bool = True  # also compute KID (clean-fid's unbiased polynomial-kernel MMD on the same features), with kid_reference
    bpd: bool = True  # bits/dim of held-out data: bpd_ode (probability-flow ODE) and, for an integer process.T, bpd_elbo
    bpd_n: int = 128  # held-out (test split) examples in the bits/dim estimates
    ode_rtol: float = 1e-5  # bpd_ode: relative tolerance of the adaptive RK45 solve
    ode_atol: float = 1e-5  # bpd_ode: absolute tolerance
    ode_max_nfe: int = 5000  # bpd_ode: give up (tag bpd_ode.error) after this many solver evaluations per solve (NCSN's 10-level path needs ~1900 at 1e-5)
    divergence: str = "hutchinson"  # bpd_ode: hutchinson (unbiased, probes fixed per solve) or exact (D backward passes; low-dimensional data)
    hutchinson_probes: int = 1  # bpd_ode: probe vectors per example
    probe: str = "rademacher"  # bpd_ode: rademacher or gaussian probes
    dequant_draws: int = 1  # bpd_ode on discrete-valued images: uniform dequantization draws per example
    classifier_steps: int = 1500  # training steps of the classifier feature extractor
    inverse: list[str] = field(default_factory=list)  # inverse-problem stages on held-out images: inpaint (eval.inverse_mask), denoise (eval.inverse_sigma_y); each logs <stage>_psnr, <stage>_ssim and a grid of observed / restored / true images
    inverse_solver: str = "replacement"  # replacement (Song et al. 2021 imputation; denoise: the exact projection), likelihood (score + grad log p(y | x_t), PiGDM variance) or tweedie (Tweedie covariance by conjugate gradients, Boys et al. 2023)
    inverse_mask: str = "centre"  # inpaint: centre (the centre square of half the side hidden), random (eval.inverse_fraction of the pixels), half (the right half)
    inverse_fraction: float = 0.5  # inpaint with random mask: share of pixels hidden
    inverse_sigma_y: float = 0.2  # denoise: std of the Gaussian noise added to held-out images in [-1, 1]
    inverse_n: int = 64  # held-out (test split) images restored per stage
    inverse_guidance: float = 1.0  # likelihood, tweedie: scale of the measurement's likelihood gradient
    inverse_cg_iterations: int = 10  # tweedie: conjugate-gradient steps (vector-Jacobian products) per time step
    cache_dir: str = "~/.cache/diffusion-orchestrator"  # where trained feature extractors and reference-split features are kept


@dataclass
class ResourcesConfig:
    cpu: float = 1.0  # CPUs reserved per trial
    gpu: float = 0.0  # GPUs reserved per trial (fractions share a GPU)
    device: str = "auto"  # auto (cuda when present, else cpu), cpu or cuda
    amp: bool = True  # bfloat16/float16 autocast on CUDA (ignored on CPU)
    custom: Dict[str, float] = field(default_factory=dict)  # Ray custom resources per trial, e.g. {node_a: 1} to pin trials to nodes started with --resources
    max_failures: int = 2  # retries of a trial whose worker failed (killed, out of memory, node lost); training resumes from its last checkpoint


@dataclass
class TrialConfig:
    data: DataConfig = field(default_factory=DataConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    seed: int = 0  # seed of training, sampling and evaluation


# The least and most value of every integer option (of each element of a list), checked by validate and shown in
# the option table. Generous, but finite: a slip (process.T: 10000000000) is refused at once instead of running for
# days or out of memory. Seeds are below 2**63 (torch takes seeds below 2**64; trials add small offsets).
INT_BOUNDS: Dict[str, tuple[int, int]] = {
    "data.image_size": (1, 4096),
    "data.n_points": (10, 10_000_000),
    "data.split_seed": (0, 2**63 - 1),
    "process.T": (1, 100_000),
    "process.learned_hidden": (1, 65_536),
    "model.channels": (1, 4096),
    "model.channel_mult": (1, 64),
    "model.num_res_blocks": (1, 64),
    "model.groups": (1, 4096),
    "model.hidden": (1, 65_536),
    "model.depth": (1, 256),
    "model.latent_channels": (1, 4096),
    "model.vae_channels": (1, 4096),
    "model.vae_steps": (1, 10_000_000),
    "loss.importance_bins": (1, 100_000),
    "loss.n_projections": (1, 1024),
    "train.steps": (1, 10_000_000),
    "train.batch_size": (1, 65_536),
    "train.warmup": (0, 10_000_000),
    "train.log_every": (1, 10_000_000),
    "train.checkpoint_every": (0, 10_000_000),
    "sample.n": (1, 1_000_000),
    "sample.batch_size": (1, 65_536),
    "sample.steps": (1, 100_000),
    "sample.corrector_steps": (0, 1000),
    "sample.steps_per_level": (1, 100_000),
    "sample.grid": (0, 10_000),
    "sample.classifier_steps": (1, 10_000_000),
    "eval.fid_n": (2, 1_000_000),
    "eval.bpd_n": (1, 1_000_000),
    "eval.ode_max_nfe": (10, 10_000_000),
    "eval.hutchinson_probes": (1, 1024),
    "eval.dequant_draws": (1, 1024),
    "eval.classifier_steps": (1, 10_000_000),
    "eval.inverse_n": (1, 1_000_000),
    "eval.inverse_cg_iterations": (1, 10_000),
    "resources.max_failures": (0, 1000),
    "seed": (0, 2**63 - 1),
}


def show_bound(n: int) -> str:
    """A bound as the option table and error messages write it: 4096, 10_000_000 (valid YAML and Python), 2**63 - 1."""
    return "2**63 - 1" if n == 2**63 - 1 else f"{n:_}" if n >= 10_000 else str(n)


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


# What determines the trained weights: these sections and the seed (plus the package version). The sample,
# eval and resources sections never do, nor do the train options that only decide what is recorded.
TRAINING_SECTIONS = ("data", "process", "model", "loss", "train")
NOT_TRAINING = {"train": ("log_every", "checkpoint_every")}


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusion-orchestrator")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def training_spec(cfg: TrialConfig) -> dict:
    """Everything that affects training, as plain data: the TRAINING_SECTIONS (less NOT_TRAINING), the seed
    and the package version."""
    spec = {}
    for name in TRAINING_SECTIONS:
        section = dataclasses.asdict(getattr(cfg, name))
        spec[name] = {k: v for k, v in section.items() if k not in NOT_TRAINING.get(name, ())}
    return {**spec, "seed": cfg.seed, "version": package_version()}


def training_key(cfg: TrialConfig) -> str:
    """The training stage's identity: a hash of :func:`training_spec`. Trials with the same key train the
    same model, whatever their sampler, NFE or evaluation settings."""
    blob = json.dumps(training_spec(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check(cond: bool, key: str, value, accepted: str) -> None:
    if not cond:
        raise ConfigError(key, value, accepted)


# Processes that are not Gaussian (Bansal et al. 2022): a network restores x0 from a degraded image.
RESTORATION_PROCESSES = ("naive", "cold")


def _validate_restoration(cfg: TrialConfig, point_sets: tuple[str, ...]) -> TrialConfig:
    """Naive and cold diffusion: images, an integer T, an x0-predicting network trained with the squared error,
    and their own samplers; the Gaussian-only options keep their defaults (a different value would be ignored)."""
    from . import degradations, nets

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
    for key in ("steps", "batch_size", "log_every"):
        _check(getattr(cfg.train, key) >= 1, f"train.{key}", getattr(cfg.train, key), "an integer >= 1")
    _check(cfg.train.lr > 0, "train.lr", cfg.train.lr, "a positive number")
    _check(0.0 <= cfg.train.ema_decay < 1.0, "train.ema_decay", cfg.train.ema_decay, "a number in [0, 1)")
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
    from .inverse import INVERSE_SOLVERS, MASKS, STAGES

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
    _check(cfg.data.name not in point_sets, "eval.inverse", list(cfg.eval.inverse), f"[] for 2-D data (PSNR and SSIM are for images)")
    INVERSE_SOLVERS.get(cfg.eval.inverse_solver)
    _check(cfg.eval.inverse_mask in MASKS, "eval.inverse_mask", cfg.eval.inverse_mask, ", ".join(MASKS))
    _check(0 < cfg.eval.inverse_fraction < 1, "eval.inverse_fraction", cfg.eval.inverse_fraction, "a number in (0, 1)")
    _check(cfg.eval.inverse_sigma_y > 0, "eval.inverse_sigma_y", cfg.eval.inverse_sigma_y, "a positive number")
    _check(cfg.eval.inverse_n >= 1, "eval.inverse_n", cfg.eval.inverse_n, "an integer >= 1")
    _check(cfg.eval.inverse_guidance >= 0, "eval.inverse_guidance", cfg.eval.inverse_guidance, "a number >= 0")
    _check(cfg.eval.inverse_cg_iterations >= 1, "eval.inverse_cg_iterations", cfg.eval.inverse_cg_iterations, "an integer >= 1")


def _validate_common(cfg: TrialConfig) -> None:
    """The eval and resources sections, the same for every kind of process."""
    from . import data, metrics

    _validate_inverse(cfg, data.POINT_SETS)
    metrics.EXTRACTORS.get(cfg.eval.extractor)
    for key in ("bpd_n", "hutchinson_probes", "dequant_draws"):
        _check(getattr(cfg.eval, key) >= 1, f"eval.{key}", getattr(cfg.eval, key), "an integer >= 1")
    _check(cfg.eval.ode_rtol > 0, "eval.ode_rtol", cfg.eval.ode_rtol, "a positive number")
    _check(cfg.eval.ode_atol > 0, "eval.ode_atol", cfg.eval.ode_atol, "a positive number")
    _check(cfg.eval.ode_max_nfe >= 10, "eval.ode_max_nfe", cfg.eval.ode_max_nfe, "an integer >= 10")
    _check(cfg.eval.divergence in ("hutchinson", "exact"), "eval.divergence", cfg.eval.divergence, "hutchinson or exact")
    _check(cfg.eval.probe in ("rademacher", "gaussian"), "eval.probe", cfg.eval.probe, "rademacher or gaussian")
    _check(cfg.eval.classifier_steps >= 1, "eval.classifier_steps", cfg.eval.classifier_steps, "an integer >= 1")
    _check(cfg.eval.reference_split in ("train", "test"), "eval.reference_split", cfg.eval.reference_split, "train or test")
    if cfg.eval.fid_n is not None:
        _check(cfg.eval.fid_n >= 2, "eval.fid_n", cfg.eval.fid_n, "an integer >= 2 or null")
    _check(cfg.resources.cpu > 0, "resources.cpu", cfg.resources.cpu, "a positive number")
    _check(cfg.resources.gpu >= 0, "resources.gpu", cfg.resources.gpu, "a number >= 0 (fractions allowed)")
    _check(cfg.resources.device in ("auto", "cpu", "cuda"), "resources.device", cfg.resources.device, "auto, cpu or cuda")
    for name, amount in cfg.resources.custom.items():
        _check(isinstance(amount, (int, float)) and not isinstance(amount, bool), f"resources.custom.{name}", amount,
               "a number >= 0 (an amount of the custom resource per trial)")
        _check(name not in ("CPU", "GPU", "memory", "object_store_memory"), f"resources.custom.{name}", name,
               "a custom resource name (CPU and GPU are resources.cpu and resources.gpu)")
        _check(amount >= 0, f"resources.custom.{name}", amount, "a number >= 0")
    _check(cfg.resources.max_failures >= 0, "resources.max_failures", cfg.resources.max_failures, "an integer >= 0")


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


def validate(cfg: TrialConfig) -> TrialConfig:
    """Check every value of a trial config; raise ConfigError naming the first bad one."""
    # Imported here: the registries import this module.
    from . import data, losses, nets, parameterizations, processes, samplers

    _check_finite(cfg, "")
    _check_bounds(cfg)
    data.DATASETS.get(cfg.data.name)
    _check(0.0 < cfg.data.test_fraction < 1.0, "data.test_fraction", cfg.data.test_fraction, "a number in (0, 1)")
    _check(cfg.data.n_points >= 10, "data.n_points", cfg.data.n_points, "an integer >= 10")
    if cfg.process.name in RESTORATION_PROCESSES:
        return _validate_restoration(cfg, data.POINT_SETS)
    processes.validate(cfg.process)
    if cfg.process.name == "blur":
        _validate_blur(cfg, data.POINT_SETS)
    parameterization = parameterizations.PARAMETERIZATIONS.get(cfg.model.parameterization)
    continuous = cfg.process.T == "continuous"
    if parameterization.needs_step and continuous:
        raise ConfigError("model.parameterization", cfg.model.parameterization, "eps, score, x0, v or edm in continuous time",
                          detail="mean predicts the posterior mean of one step back, t - 1/T, which needs an integer process.T")
    _check(cfg.model.variance in ("beta", "beta_tilde", "learned_range"), "model.variance", cfg.model.variance,
           "beta, beta_tilde or learned_range")
    if cfg.model.variance == "learned_range" and continuous:
        raise ConfigError("model.variance", "learned_range", "beta or beta_tilde in continuous time",
                          detail="learned_range interpolates between the beta and beta-tilde of one discrete step")
    nets.validate(cfg.model)
    losses.WEIGHTINGS.get(cfg.loss.weighting)
    _check(cfg.loss.min_snr_gamma > 0, "loss.min_snr_gamma", cfg.loss.min_snr_gamma, "a positive number")
    _check(cfg.loss.t_sampling in ("uniform", "importance"), "loss.t_sampling", cfg.loss.t_sampling,
           "uniform or importance")
    _check(cfg.loss.importance_bins >= 1, "loss.importance_bins", cfg.loss.importance_bins, "an integer >= 1")
    _check(cfg.loss.hybrid_lambda >= 0, "loss.hybrid_lambda", cfg.loss.hybrid_lambda, "a number >= 0")
    if cfg.process.schedule == "learned":
        _check(cfg.loss.weighting == "elbo", "loss.weighting", cfg.loss.weighting,
               "elbo with process.schedule learned (the VDM schedule is trained by the variational bound)")
    _check_conditioning(cfg, data.LABELLED_SETS)
    _validate_latent(cfg, data.POINT_SETS)
    if cfg.loss.objective != "denoising":
        from . import score_matching

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
    for key in ("steps", "batch_size", "log_every"):
        _check(getattr(cfg.train, key) >= 1, f"train.{key}", getattr(cfg.train, key), "an integer >= 1")
    _check(cfg.train.lr > 0, "train.lr", cfg.train.lr, "a positive number")
    _check(0.0 <= cfg.train.ema_decay < 1.0, "train.ema_decay", cfg.train.ema_decay, "a number in [0, 1)")
    _check(cfg.train.grad_clip >= 0, "train.grad_clip", cfg.train.grad_clip, "a number >= 0 (0 disables)")
    _check(cfg.train.checkpoint_every >= 0, "train.checkpoint_every", cfg.train.checkpoint_every, "an integer >= 0")
    _check(cfg.train.warmup >= 0, "train.warmup", cfg.train.warmup, "an integer >= 0")
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
    _validate_common(cfg)
    return cfg
