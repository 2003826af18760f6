"""Process families: the values of ``process.name`` that have a Gaussian path (vp, ve, subvp, and blur, which
``diffusion.blur`` registers), each with how a ProcessConfig becomes its process, its schedules and its own
option checks. ``validate`` checks a ProcessConfig against its family; ``diffusion.factory.build_process`` builds
it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

from .config import ProcessConfig
from .errors import ConfigError
from .processes import (CONTINUOUS, GaussianProcess, LearnedProcess, MonotoneLogSNR, continuous_process, ve_process,
                        vp_process)
from .registry import Registry, options_for
from .schedules import VE_SCHEDULES, VP_SCHEDULES, Schedule


def _no_check(cfg: ProcessConfig) -> None:
    pass


@dataclass(frozen=True)
class ProcessFamily:
    """A value of ``process.name`` with a Gaussian path: how a ProcessConfig becomes its process (``build(cfg,
    shape)``, ``shape`` being one example's shape), its schedules, whether its options are vp's betas or ve's
    sigmas, whether ``schedule: learned`` applies, and its own option checks (``check``, run after the checks
    of the name, the schedule and T). Blur diffusion registers itself here (``diffusion.blur``)."""

    build: Callable[[ProcessConfig, Optional[tuple]], GaussianProcess]
    schedules: Registry[Schedule]
    variance_preserving: bool = True
    learned: bool = False
    check: Callable[[ProcessConfig], None] = _no_check


PROCESS_FAMILIES: Registry[ProcessFamily] = Registry("process.name")


def validate(cfg: ProcessConfig) -> None:
    """Check a ProcessConfig against its family; raise ConfigError naming the first bad key."""
    if cfg.name not in PROCESS_FAMILIES:
        raise ConfigError("process.name", cfg.name, "one of " + ", ".join(PROCESS_FAMILIES.names()))
    family = PROCESS_FAMILIES.get(cfg.name)
    names = family.schedules.names() + (["learned"] if family.learned else [])
    if cfg.schedule not in names:
        raise ConfigError("process.schedule", cfg.schedule, f"for process {cfg.name}: one of " + ", ".join(names),
                          detail="the learned schedule (VDM) is variance preserving" if cfg.schedule == "learned" else "")
    T = cfg.T
    if not (T == CONTINUOUS or (isinstance(T, int) and not isinstance(T, bool) and T >= 1)):
        raise ConfigError("process.T", T, f"an integer >= 1 or '{CONTINUOUS}'")
    family.check(cfg)
    if not 0 < cfg.t_min < 1:
        raise ConfigError("process.t_min", cfg.t_min, "a number in (0, 1)")
    if cfg.schedule == "learned":
        if not cfg.log_snr_min < cfg.log_snr_max:
            raise ConfigError("process.log_snr_min", cfg.log_snr_min, f"a number < log_snr_max={cfg.log_snr_max}")
        if cfg.learned_hidden < 1:
            raise ConfigError("process.learned_hidden", cfg.learned_hidden, "an integer >= 1")
    (_check_betas if family.variance_preserving else _check_sigmas)(cfg)


def _check_betas(cfg: ProcessConfig) -> None:
    # Each bound is blamed on the key that breaks it: a bad beta_end is not reported as beta_start.
    if not 0 < cfg.beta_end < 1:
        raise ConfigError("process.beta_end", cfg.beta_end, f"a number in (0, 1), >= beta_start={cfg.beta_start}")
    if not 0 < cfg.beta_start <= cfg.beta_end:
        raise ConfigError("process.beta_start", cfg.beta_start, f"a number in (0, beta_end={cfg.beta_end}]")
    if not cfg.beta_max > 0:
        raise ConfigError("process.beta_max", cfg.beta_max, f"a positive number >= beta_min={cfg.beta_min}")
    if not 0 < cfg.beta_min <= cfg.beta_max:
        raise ConfigError("process.beta_min", cfg.beta_min, f"a number in (0, beta_max={cfg.beta_max}]")
    if not 0 < cfg.max_beta < 1:
        raise ConfigError("process.max_beta", cfg.max_beta, "a number in (0, 1)")
    if cfg.cosine_s < 0:
        raise ConfigError("process.cosine_s", cfg.cosine_s, "a number >= 0")
    if not cfg.sigmoid_start < cfg.sigmoid_end:
        raise ConfigError("process.sigmoid_start", cfg.sigmoid_start, f"a number < sigmoid_end={cfg.sigmoid_end}")
    if not cfg.sigmoid_tau > 0:
        raise ConfigError("process.sigmoid_tau", cfg.sigmoid_tau, "a positive number")


def _check_sigmas(cfg: ProcessConfig) -> None:
    if not cfg.sigma_max > 0:
        raise ConfigError("process.sigma_max", cfg.sigma_max, f"a positive number > sigma_min={cfg.sigma_min}")
    if not 0 < cfg.sigma_min < cfg.sigma_max:
        raise ConfigError("process.sigma_min", cfg.sigma_min, f"a number in (0, sigma_max={cfg.sigma_max})")


def _continuous_only(cfg: ProcessConfig) -> None:
    if cfg.T != CONTINUOUS:
        raise ConfigError("process.T", cfg.T, f"'{CONTINUOUS}' for subvp (the sub-VP SDE is defined in continuous time)")


def build_gaussian(cfg: ProcessConfig, shape: Optional[tuple] = None) -> GaussianProcess:
    """The vp, ve or subvp process of a ProcessConfig: discrete for an integer T, continuous for T = 'continuous'
    (``shape`` is not needed)."""
    if cfg.schedule == "learned":
        schedule = MonotoneLogSNR(cfg.log_snr_max, cfg.log_snr_min, cfg.learned_hidden)
        return LearnedProcess(schedule, None if cfg.T == CONTINUOUS else cfg.T, cfg.t_min)
    family = PROCESS_FAMILIES.get(cfg.name)
    schedule = family.schedules.get(cfg.schedule)
    if cfg.T != CONTINUOUS:
        table = schedule.discrete(cfg.T, **options_for(schedule.discrete, cfg))
        return vp_process(table) if family.variance_preserving else ve_process(table)
    return continuous_process(cfg.name, functools.partial(schedule.continuous, **options_for(schedule.continuous, cfg)),
                              cfg.t_min)


PROCESS_FAMILIES.register("vp")(ProcessFamily(build_gaussian, VP_SCHEDULES, learned=True))
PROCESS_FAMILIES.register("ve")(ProcessFamily(build_gaussian, VE_SCHEDULES, variance_preserving=False))
PROCESS_FAMILIES.register("subvp")(ProcessFamily(build_gaussian, VP_SCHEDULES, check=_continuous_only))
