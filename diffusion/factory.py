"""From a config to objects: the one place where config sections become the library's processes, networks,
data sets and samplers (in the manner of improved-diffusion's ``create_gaussian_diffusion`` and score_sde's
``get_sampling_fn``). Everything it builds takes plain numbers and can be built without a config too."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from . import blur  # noqa: F401  (registers process.name blur into PROCESS_FAMILIES)
from .config import ProcessConfig, SampleConfig
from .denoiser import Denoiser
from .process_families import PROCESS_FAMILIES, validate
from .processes import CONTINUOUS, GaussianProcess, LearnedProcess
from .registry import options_for
from .samplers import SAMPLERS, SPACINGS, Progress, in_batches, step_callback

LIMIT_TOLERANCE = 0.25  # largest |log-SNR difference| on the grid for a continuous limit to stand in


def build_process(cfg: ProcessConfig, shape: Optional[tuple] = None) -> GaussianProcess:
    """The process a ProcessConfig names (discrete for integer T, continuous for T = 'continuous'); ``shape``,
    one example's shape, is needed by the per-frequency blur process only."""
    validate(cfg)
    return PROCESS_FAMILIES.get(cfg.name).build(cfg, shape)


def continuous_limit(cfg: ProcessConfig, process: GaussianProcess) -> tuple[GaussianProcess, float]:
    """The continuous-time process of the same schedule, for a discrete ``process`` built from ``cfg``, and
    the largest |lambda_continuous - lambda_discrete| over the grid times 1/T, ..., (T - 5)/T (the last steps
    are left out: there cosine and sigmoid clip their betas at max_beta, at log-SNRs where the data is gone).

    Returns ``(process, deviation)`` unchanged when the process is continuous already, and the limit only if
    the deviation is below LIMIT_TOLERANCE (vp linear or ve geometric at T = 1000: 0.09 and 0.01); small T
    (NCSN's 10 levels: 1.4) keep their own path, which is interpolated between grid times. A learned schedule's
    limit is the same log-SNR network in continuous time (deviation 0)."""
    if process.T is None:
        return process, 0.0
    if process.learned:
        return LearnedProcess(process.schedule, None, 1.0 / process.T), 0.0
    limit = build_process(dataclasses.replace(cfg, T=CONTINUOUS, t_min=1.0 / process.T))
    grid = torch.arange(1, max(process.T - 5, 1) + 1, dtype=torch.float64) / process.T
    log_snr = lambda p: 2 * (p.log_alpha64(grid) - p.log_sigma64(grid))  # noqa: E731
    deviation = (log_snr(limit) - log_snr(process)).abs().max().item()
    return (limit if deviation < LIMIT_TOLERANCE else process), deviation


def make_timesteps(process: GaussianProcess, options: SampleConfig, device="cpu") -> Tensor:
    """The times a sampler visits, largest first, without repeats (float32 [K]): ``options.spacing`` with the
    spacing's own options read from ``options`` (a SampleConfig)."""
    steps = options.steps or (process.T if process.T is not None else 100)
    if process.T is not None:
        steps = min(steps, process.T)
    spacing = SPACINGS.get(options.spacing)
    times = spacing(process, steps, **options_for(spacing, options))
    times = torch.unique(times.float()).flip(0)  # unique sorts ascending
    return times.to(device)


def draw_samples(
    denoiser: Denoiser | Callable[[int, int], Denoiser],
    options: SampleConfig,
    shape: tuple[int, ...],
    n: int,
    generator: torch.Generator,
    device: torch.device,
    variance: str = "beta_tilde",
    process: Optional[GaussianProcess] = None,
    progress: Progress = None,
) -> tuple[Tensor, int]:
    """n samples of per-example ``shape`` in batches of ``options.batch_size`` with the configured
    sampler. ``denoiser`` is one Denoiser, or a function ``(start, size) -> Denoiser`` for the batch of
    samples start..start+size (a class-conditional model's labels follow the batch; then ``process`` names
    the process). Returns (samples on CPU [n, *shape], NFE per sample: the sampler's count of
    denoiser calls times the network evaluations per call, ``Denoiser.cost``, 2 with guidance). A per-dimension
    process (blur) is sampled in its basis and the samples returned as data. The sampler gets the keyword options
    it declares, read from ``options`` by name, and ``variance`` (the model's reverse variance) if it takes one.
    ``progress(done, total)``: called after every sampler step and batch (``samplers.step_callback``)."""
    sampler = SAMPLERS.get(options.sampler)
    keywords = options_for(sampler, options, variance=variance)
    denoiser_for = (lambda start, size: denoiser) if isinstance(denoiser, Denoiser) else denoiser
    process = process or denoiser.process
    timesteps = make_timesteps(process, options, device)

    def draw(start: int, size: int) -> tuple[Tensor, int]:
        x_T = process.prior_sample((size, *shape), generator, device)
        model = denoiser_for(start, size)
        callback = step_callback(progress, start, options.batch_size, n, len(timesteps))
        x, calls = sampler(model, x_T, timesteps, generator=generator, callback=callback, **keywords)
        return process.from_basis(x.float()), calls * model.cost

    return in_batches(n, options.batch_size, draw)
