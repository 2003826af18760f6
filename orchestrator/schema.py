"""The sweep's trial config: the library's ``TrialConfig`` plus what only the orchestrator uses, the
``resources`` a trial asks Ray for. Field comments are the option documentation, as in ``diffusion.config``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

from diffusion import validation
from diffusion.config import TrialConfig, show_bound
from diffusion.errors import ConfigError
from diffusion.registry import Registry


@dataclass
class ResourcesConfig:
    cpu: float = 1.0  # CPUs reserved per trial
    gpu: float = 0.0  # GPUs reserved per trial (fractions share a GPU)
    device: str = "auto"  # auto (cuda when present, else cpu), cpu or cuda
    amp: Any = "auto"  # bfloat16 autocast of training and sampling: auto (on CUDA only), true (on CUDA and CPU: on this AVX2 CPU the demo's DDPM trains as fast as in float32, to the same FID within its error, while the throughput benchmark's bare step ran 16x slower, docs/BENCHMARKS.md), false (float32)
    custom: Dict[str, float] = field(default_factory=dict)  # Ray custom resources per trial, e.g. {node_a: 1} to pin trials to nodes started with --resources
    workers: int = 1  # data-parallel training on this many Ray Train workers (DDP: NCCL on GPUs, gloo on CPUs), each with the cpu, gpu and custom resources above; the global batch train.batch_size is split evenly across them
    max_failures: int = 2  # retries of a trial whose worker failed (killed, out of memory, node lost); training resumes from its last checkpoint


@dataclass
class SweepTrialConfig(TrialConfig):
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


# resources.device: where a trial runs (diffusion.training.select_device)
DEVICES: Registry[str] = Registry("resources.device")
for _name in ("auto", "cpu", "cuda"):
    DEVICES.register(_name)(_name)

# The bounds of the orchestrator's integer options (diffusion.config.INT_BOUNDS holds the library's).
INT_BOUNDS: Dict[str, tuple[int, int]] = {"resources.max_failures": (0, 1000), "resources.workers": (1, 1024)}


def _check(cond: bool, key: str, value, accepted: str) -> None:
    if not cond:
        raise ConfigError(key, value, accepted)


def validate_resources(resources: ResourcesConfig) -> None:
    """What a trial asks Ray for: positive CPUs, GPUs (fractions share one), custom resources by name, retries."""
    res = resources
    _check(res.cpu > 0, "resources.cpu", res.cpu, "a positive number")
    _check(res.gpu >= 0, "resources.gpu", res.gpu, "a number >= 0 (fractions allowed)")
    DEVICES.get(res.device)
    _check(res.amp == "auto" if isinstance(res.amp, str) else isinstance(res.amp, bool), "resources.amp", res.amp,
           "auto (bf16 autocast on CUDA only), true (also on CPU) or false")
    for name, amount in res.custom.items():
        _check(isinstance(amount, (int, float)) and not isinstance(amount, bool), f"resources.custom.{name}", amount,
               "a number >= 0 (an amount of the custom resource per trial)")
        _check(name not in ("CPU", "GPU", "memory", "object_store_memory"), f"resources.custom.{name}", name,
               "a custom resource name (CPU and GPU are resources.cpu and resources.gpu)")
        _check(amount >= 0, f"resources.custom.{name}", amount, "a number >= 0")
    for key, (low, high) in INT_BOUNDS.items():
        value = getattr(res, key.split(".")[1])
        if not low <= value <= high:
            raise ConfigError(key, value, f"an integer >= {show_bound(low)} and <= {show_bound(high)}",
                              detail="the bounds of the option table")


def validate(cfg: SweepTrialConfig) -> SweepTrialConfig:
    """The library's checks of every section (``diffusion.validation.validate``), then the resources."""
    validation.validate(cfg)
    validate_resources(cfg.resources)
    workers = cfg.resources.workers
    _check(cfg.train.batch_size % workers == 0, "resources.workers", workers,
           f"a divisor of train.batch_size ({cfg.train.batch_size}): every worker evaluates an equal share of the batch")
    return cfg
