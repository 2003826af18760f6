"""A sweep file's ``search`` section: distributions over trial-config keys, sampled into trials beside the grid.

    search:
      algorithm: random          # random (optuna and hyperopt: refused, not built yet)
      num_samples: 8             # per variant and grid point
      metric: fid                # what the search ranks by (a final metric of the evaluation runs)
      mode: min                  # min or max
      seed: 0                    # the draws' seed: the same file gives the same trials (resume, --dry-run)
      space:
        train.lr: {loguniform: [1.0e-5, 3.0e-3]}
        train.ema_decay: {choice: [0.99, 0.999, 0.9999]}
        process.schedule: {choice: [linear, cosine]}
        model.channels: {qrandint: [16, 64, 16]}

The distributions are Ray Tune's, with its bounds: ``uniform: [low, high]``, ``loguniform: [low, high]`` (low > 0),
``quniform: [low, high, q]`` (rounded to a multiple of q), ``randint: [low, high]`` (an integer in [low, high), high
excluded), ``qrandint: [low, high, q]`` (a multiple of q in [low, high], high included), ``choice: [values]``.
Random search draws ``num_samples`` points for every variant x grid point, so trials compose as variants x grid x
num_samples; each is a trial like a grid point's (its sampled values are its axes, named ``sample=<i>``), validated
the same way. Every value a distribution can give is checked before anything starts: each choice, and both ends
of a range, on every variant.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from diffusion.errors import ConfigError

SEARCH_KEYS = ("algorithm", "num_samples", "metric", "mode", "seed", "space")
ALGORITHMS = ("random", "optuna", "hyperopt")
ADAPTIVE = {"optuna": "optuna", "hyperopt": "hyperopt"}  # searcher -> the package it needs
DISTRIBUTIONS = {"uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2, "qrandint": 3, "choice": None}
SAMPLE_AXIS = "sample"  # the axis that numbers a search's draws in trial names


@dataclass
class Search:
    algorithm: str = "random"
    num_samples: int = 1
    metric: str = "fid"
    mode: str = "min"
    seed: int = 0
    space: dict[str, tuple[str, list]] = field(default_factory=dict)  # dotted key -> (distribution, arguments)

    def describe(self) -> str:
        return (f"search: {self.algorithm}, {self.num_samples} sample(s) per variant and grid point (seed {self.seed}), "
                f"ranked by {self.metric} ({self.mode}); over " +
                ", ".join(f"{key} ~ {name}{args}" for key, (name, args) in self.space.items()))

    def draws(self) -> list[dict[str, Any]]:
        """The ``num_samples`` points, the same for every variant and grid point (a fair comparison of them)."""
        rng = random.Random(self.seed)
        return [{key: _draw(rng, name, args) for key, (name, args) in self.space.items()}
                for _ in range(self.num_samples)]

    def extremes(self) -> list[dict[str, Any]]:
        """Every value the space can give at its edges, one key at a time: each choice, both ends of each range."""
        return [{key: value} for key, (name, args) in self.space.items() for value in _edges(name, args)]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_search(raw: Any, check_key) -> Search:
    """The ``search`` section, checked: ConfigError naming ``search.<key>`` or ``search.space.<key>``.
    ``check_key(dotted)``: raises for a key the trial config does not have."""
    if not isinstance(raw, dict):
        raise ConfigError("search", raw, "a mapping with " + ", ".join(SEARCH_KEYS))
    unknown = sorted(str(k) for k in raw if k not in SEARCH_KEYS)
    if unknown:
        raise ConfigError(f"search.{unknown[0]}", raw[unknown[0]], "keys " + ", ".join(SEARCH_KEYS), detail="unknown key")
    search = Search()
    algorithm = raw.get("algorithm", "random")
    if algorithm not in ALGORITHMS:
        raise ConfigError("search.algorithm", algorithm, ", ".join(ALGORITHMS))
    if algorithm in ADAPTIVE:
        import importlib.util

        package = ADAPTIVE[algorithm]
        installed = "is installed" if importlib.util.find_spec(package) else "is missing"
        raise ConfigError("search.algorithm", algorithm, "random",
                          detail=f"package {package} {installed}, and the orchestrator's {algorithm} search, which "
                                 "learns from finished trials, is not built yet")
    search.algorithm = algorithm
    num = raw.get("num_samples", 1)
    if not isinstance(num, int) or isinstance(num, bool) or not 1 <= num <= 10_000:
        raise ConfigError("search.num_samples", num, "an integer from 1 to 10000")
    search.num_samples = num
    metric = raw.get("metric", "fid")
    if not isinstance(metric, str) or not metric:
        raise ConfigError("search.metric", metric, "the name of a final metric, e.g. fid, kid, bpd_ode")
    search.metric = metric
    mode = raw.get("mode", "min")
    if mode not in ("min", "max"):
        raise ConfigError("search.mode", mode, "min or max")
    search.mode = mode
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError("search.seed", seed, "an integer")
    search.seed = seed
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError("search.space", space, "a non-empty mapping from dotted keys to {distribution: arguments}")
    for key, spec in space.items():
        where = f"search.space.{key}"
        try:
            check_key(str(key))
        except ConfigError as error:
            raise ConfigError(where, spec, "a distribution over a key of the trial config",
                              detail=f"unknown key {key}: {error.accepted}") from None
        search.space[str(key)] = _distribution(where, spec)
    return search


def _distribution(where: str, spec: Any) -> tuple[str, list]:
    accepted = "one of {" + ", ".join(f"{name}: [...]" for name in DISTRIBUTIONS) + "}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(where, spec, accepted)
    [(name, args)] = spec.items()
    if name not in DISTRIBUTIONS:
        raise ConfigError(where, spec, accepted, detail=f"unknown distribution {name}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}.{name}", args, "a non-empty list")
    if name == "choice":
        return name, list(args)
    arity = DISTRIBUTIONS[name]
    if len(args) != arity or not all(_number(a) for a in args):
        shape = "[low, high]" if arity == 2 else "[low, high, q]"
        raise ConfigError(f"{where}.{name}", args, f"{shape} of finite numbers")
    low, high = args[0], args[1]
    integer = name in ("randint", "qrandint")
    if integer and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}.{name}", args, "integers")
    if name == "randint" and not low < high:
        raise ConfigError(f"{where}.{name}", args, "low < high (randint draws from [low, high), high excluded)")
    if not low <= high:
        raise ConfigError(f"{where}.{name}", args, "low <= high")
    if name == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.{name}", args, "0 < low <= high (a log scale)")
    if arity == 3 and not args[2] > 0:
        raise ConfigError(f"{where}.{name}", args, "q > 0")
    if arity == 3 and _multiples(low, high, args[2]) == []:
        raise ConfigError(f"{where}.{name}", args, f"a range that holds a multiple of q = {args[2]}")
    return name, list(args)


def _multiples(low, high, q) -> list:
    first, last = math.ceil(low / q - 1e-9), math.floor(high / q + 1e-9)
    return [first, last] if first <= last else []


def _round(value: float, q) -> Any:
    rounded = round(value / q) * q
    return int(rounded) if isinstance(q, int) else float(rounded)


def _draw(rng: random.Random, name: str, args: list) -> Any:
    if name == "choice":
        return args[rng.randrange(len(args))]
    if name == "uniform":
        return rng.uniform(args[0], args[1])
    if name == "loguniform":
        return math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))
    if name == "randint":
        return rng.randrange(args[0], args[1])
    first, last = _multiples(*args)
    if name == "qrandint":
        return int(rng.randint(first, last) * args[2])
    value = min(max(rng.uniform(args[0], args[1]), first * args[2]), last * args[2])
    return _round(value, args[2])


def _edges(name: str, args: list) -> list:
    if name == "choice":
        return list(args)
    if name == "randint":
        return [args[0], args[1] - 1]
    if name in ("qrandint", "quniform"):
        first, last = _multiples(*args)
        return [_round(first * args[2], args[2]), _round(last * args[2], args[2])]
    return [args[0], args[1]]
