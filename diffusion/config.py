"""Trial configuration: plain dataclasses, one per section, and the bounds of the integer options.

This module holds data only and imports nothing else of the library: `diffusion.validation` checks the
values against the registries, `diffusion.factory` turns sections into objects, and the orchestrator turns
these dataclasses into OmegaConf structured configs (adding its own ``resources`` section), which check key
names and types. Every field's comment is its documentation: the README's option table is generated from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional


@dataclass
class DataConfig:
    name: str = "digits"  # data set: digits, swiss_roll, moons, gaussian_mixture, mnist, fashion_mnist, cifar10, image_folder
    root: str = "data"  # where torchvision data sets and image_folder images live
    download: bool = False  # let torchvision download mnist/fashion_mnist/cifar10 into root
    verify: bool = True  # cifar10: check the files' published MD5 checksums (false: read other files of the same format, e.g. a subset)
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
    attention: bool = True  # unet: self-attention at the lowest resolution (layout ddpm: in the middle block)
    attention_resolutions: list[int] = field(default_factory=list)  # unet: also self-attention after every ResNet block whose feature maps have one of these sides (Ho et al. 2020 on CIFAR-10: [16])
    resample: str = "pool"  # unet: pool (2x2 average pooling down, nearest-neighbour up) or conv (stride-2 3x3 conv down, nearest neighbour and a 3x3 conv up; Ho et al. 2020)
    layout: str = "lean"  # unet: lean (fast on a CPU: no middle ResNet blocks, one skip per upsampling block) or ddpm (Ho et al. 2020: a middle block, num_res_blocks + 1 upsampling blocks per level with skips from every downsampling stage)
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
    compile: bool = False  # torch.compile the network for training (inductor: a C++ compiler on CPU; compiling costs tens of seconds once per trial, see docs/BENCHMARKS.md for what it gains)
    hflip: bool = False  # images: flip each training example left-right with probability 1/2 (Ho et al. 2020 and Song & Ermon 2020 on CIFAR-10)
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
    reference: str = "split"  # FID's reference statistics: split (the data set's eval.reference_split, features computed here) or clean-fid's published Inception statistics (eval.extractor inception, images of their size; no KID): cleanfid:cifar10-32-train, cleanfid:cifar10-32-test, cleanfid:ffhq-256-trainval, cleanfid:ffhq-256-trainval70k, cleanfid:ffhq-1024-trainval, cleanfid:ffhq-1024-trainval70k, cleanfid:lsun_church-256-train, cleanfid:lsun_horse-256-train, cleanfid:lsun_cat-256-train, cleanfid:lsun_cat-256-trainfull, cleanfid:afhq_cat-512-train, cleanfid:afhq_dog-512-train, cleanfid:afhq_wild-512-train, cleanfid:brecahad-512-train, cleanfid:metfaces-1024-train, cleanfid:horse2zebra-256-test, cleanfid:cat2dog-256-test
    reference_split: str = "train"  # with eval.reference split, FID is measured against this split's statistics
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
    cache_dir: str = "~/.cache/diffusion-orchestrator"  # where trained feature extractors and reference-split features are kept, and clean-fid's Inception weights and published statistics (in <cache_dir>/inception)
    every: int = 0  # FID and KID during training every this many steps (0: off), of eval.every_n samples of the EMA model drawn by eval.every_sampler in eval.every_steps steps, against the final FID's reference; logged as the training run's step metrics fid and kid and reported to Ray Tune
    every_n: int = 256  # eval.every: samples per measurement (at most the test split's size)
    every_sampler: str = "ddim"  # eval.every: the sampler (a fast one; the sample section's other options apply)
    every_steps: Optional[int] = None  # eval.every: the sampler's NFE budget (default: 50, or a smaller integer process.T)
    download: bool = False  # fetch clean-fid's Inception weights and the published statistics of eval.reference into <cache_dir>/inception on first use; false: a missing file stops the sweep before it starts, naming where to place it


@dataclass
class TrialConfig:
    data: DataConfig = field(default_factory=DataConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
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
    "eval.every": (0, 1_000_000_000),
    "eval.every_n": (2, 1_000_000),
    "eval.every_steps": (1, 100_000),
    "eval.bpd_n": (1, 1_000_000),
    "eval.ode_max_nfe": (10, 10_000_000),
    "eval.hutchinson_probes": (1, 1024),
    "eval.dequant_draws": (1, 1024),
    "eval.classifier_steps": (1, 10_000_000),
    "eval.inverse_n": (1, 1_000_000),
    "eval.inverse_cg_iterations": (1, 10_000),
    "seed": (0, 2**63 - 1),
}


def show_bound(n: int) -> str:
    """A bound as the option table and error messages write it: 4096, 10_000_000 (valid YAML and Python), 2**63 - 1."""
    return "2**63 - 1" if n == 2**63 - 1 else f"{n:_}" if n >= 10_000 else str(n)
