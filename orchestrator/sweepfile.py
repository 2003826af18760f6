"""Sweep files: OmegaConf YAML validated against dataclass schemas, expanded into trials.

A sweep file has a ``name``, a ``base`` trial config, named ``variants`` (bundles of overrides)
and a ``grid`` of dotted keys to lists of values. The trials are the product variants x grid.
Command-line overrides (``key=value``, OmegaConf dotlist) apply to the sweep file itself, so
``base.train.steps=100`` or ``grid.seed=[0]`` both work; ``grid.sample.steps=[10,20]`` adds the axis
``sample.steps`` beside the grid's others.

Sweep files are plain data: ``${...}`` interpolation (OmegaConf resolvers such as ``oc.env``, or references
to other keys) is refused, so nothing from the environment reaches MLflow, Tune's state or the model cache.
The YAML reader (``orchestrator.yamlfile``) refuses duplicate keys, nesting deeper than MAX_DEPTH and documents
whose aliases expand to more than MAX_NODES values (a "billion laughs"), before any of it is expanded.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from diffusion.errors import ConfigError

from . import schema
from .schema import SweepTrialConfig
from .search import SAMPLE_AXIS
from .yamlfile import OverrideLoader, Refused, dotted_path, load_yaml, read_yaml

SWEEP_KEYS = ("name", "base", "variants", "grid", "search", "scheduler", "storage", "max_concurrent")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RESOLVER = re.compile(r"\$\{\s*([^:}\s]*)\s*:")  # ${name:...} calls the resolver `name`


@dataclass
class Trial:
    """One point of the sweep: a variant, grid values, and the resolved trial config."""

    name: str  # e.g. "ddpm-seed=1"
    variant: str
    axes: dict[str, Any]  # the grid values of this trial
    config: SweepTrialConfig

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "variant": self.variant,
            "axes": self.axes,
            "config": OmegaConf.to_container(OmegaConf.structured(self.config), resolve=True),
        }


@dataclass
class Sweep:
    name: str
    trials: list[Trial]
    varying: list[str]  # the axes that vary across trials: "variant" and the grid keys
    storage: str = "ray_results"  # where Ray Tune keeps its state
    max_concurrent: Optional[int] = None  # trials run at once (default: as many as resources allow)
    source: dict = field(default_factory=dict)  # the sweep file after overrides, as plain data
    search: Optional[Any] = None  # the search section (orchestrator.search.Search), or None
    scheduler: Optional[Any] = None  # the scheduler section (orchestrator.scheduler.Scheduler), or None

    def digest(self) -> str:
        """A short hash of the expanded sweep (names and configs of its trials)."""
        blob = json.dumps([t.as_dict() for t in self.trials], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def load_sweep(path: str, overrides: list[str] | None = None) -> Sweep:
    """Read, override, validate and expand a sweep file. Raises ConfigError on any bad input."""
    raw = read_yaml(path)
    if overrides:
        raw = _apply_overrides(raw, overrides)
    _check_plain(raw, "")  # before anything reads a value: no ${...}, no inf or nan
    unknown = sorted((key for key in raw if key not in SWEEP_KEYS), key=str)
    if unknown:
        raise ConfigError(str(unknown[0]), raw[unknown[0]], "top-level keys " + ", ".join(SWEEP_KEYS), detail="unknown key")
    sweep_name = raw.get("name")
    if not isinstance(sweep_name, str) or not NAME_PATTERN.match(sweep_name):
        raise ConfigError("name", sweep_name, "a non-empty name of letters, digits, '_', '.', '-'")
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError("base", base, "a mapping of trial-config sections")
    variants = raw.get("variants") or {}
    if not isinstance(variants, dict):
        raise ConfigError("variants", variants, "a mapping from variant names to override mappings")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError("grid", grid, "a mapping from dotted keys to lists of values")
    max_concurrent = raw.get("max_concurrent")
    if max_concurrent is not None and (not isinstance(max_concurrent, int) or isinstance(max_concurrent, bool)
                                       or max_concurrent < 1):
        raise ConfigError("max_concurrent", max_concurrent, "an integer >= 1 or null")
    storage = raw.get("storage", "ray_results")
    if not isinstance(storage, str) or not storage:
        raise ConfigError("storage", storage, "a directory path or URI")
    from .cache import check_uri, is_uri  # here: reading a sweep file needs neither torch nor boto3

    if is_uri(storage):
        check_uri("storage", storage)

    base_cfg = _merge(OmegaConf.structured(SweepTrialConfig), base, "base")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}", values, "a non-empty list of values")
        _check_dotted_key(key)
    search = None
    if raw.get("search") is not None:
        from .search import parse_search

        search = parse_search(raw["search"], _check_dotted_key)
        both = sorted(set(search.space) & set(grid))
        if both:
            raise ConfigError(f"search.space.{both[0]}", raw["search"]["space"][both[0]],
                              "a key the grid does not also vary", detail=f"grid.{both[0]} sets it too")
    has_variants = bool(variants)
    if not has_variants:
        variants = {"base": {}}
    trials = _expand(base_cfg, base, variants, grid, has_variants, search)
    varying = (["variant"] if len(variants) > 1 else []) + [k for k, v in grid.items() if len(v) > 1]
    if search is not None:
        varying += [key for key in search.space if len({repr(t.axes[key]) for t in trials}) > 1]
    scheduler = None
    if raw.get("scheduler") is not None:
        from .scheduler import parse_scheduler

        scheduler = parse_scheduler(raw["scheduler"], trials)
    return Sweep(name=sweep_name, trials=trials, varying=varying, storage=storage, max_concurrent=max_concurrent,
                 source=raw, search=search, scheduler=scheduler)


def _expand(base_cfg: DictConfig, base: dict, variants: dict, grid: dict, has_variants: bool,
            search=None) -> list[Trial]:
    """The trials, variants x grid (x the search's draws): each variant's overrides merged onto ``base_cfg``, then
    each point of the grid (and each draw, named ``sample=<i>``), converted to the schema's dataclasses and
    validated; an error names where in the sweep file the value came from (``key_origin``). Every value a search
    distribution can give (``Search.extremes``) is validated on every variant and grid point first."""
    draws = [{}] if search is None else search.extremes() + [None] + search.draws()
    trials = []
    for variant, overrides_of_variant in variants.items():
        if not isinstance(variant, str) or not NAME_PATTERN.match(variant):
            raise ConfigError("variants", variant, "variant names of letters, digits, '_', '.', '-'")
        if not isinstance(overrides_of_variant, dict):
            raise ConfigError(f"variants.{variant}", overrides_of_variant, "a mapping of trial-config overrides")
        variant_cfg = _merge(base_cfg, overrides_of_variant, f"variants.{variant}")
        for values in itertools.product(*grid.values()):
            grid_axes = dict(zip(grid.keys(), values))
            checking, index = search is not None, 0
            for drawn in draws:
                if drawn is None:  # the extremes are checked: the draws follow
                    checking = False
                    continue
                axes = {**grid_axes, **drawn}
                cfg = variant_cfg.copy()
                for key, value in axes.items():
                    cfg = _merge(cfg, _nest(key, value), "search.space" if key in drawn else "grid")
                shown = {**grid_axes, **({SAMPLE_AXIS: index} if search is not None and not checking else {})}
                name = variant if not shown else variant + "-" + ",".join(f"{k}={_short(v)}" for k, v in shown.items())
                origin = functools.partial(key_origin, base=base, variant=variant if has_variants else None,
                                           overrides_of_variant=overrides_of_variant, axes=grid_axes, drawn=drawn)
                try:
                    obj = OmegaConf.to_object(cfg)
                except OmegaConfBaseException as error:  # after the merge: named like the validation errors below
                    key = str(error.full_key or error.key or "")
                    raise ConfigError(origin(key) if key else "base", None,
                                      "a value of the type the schema gives this key",
                                      detail=str(error).splitlines()[0]) from None
                _validate_values(obj, origin)
                if not checking:
                    trials.append(Trial(name=name, variant=variant, axes=axes, config=obj))
                    index += search is not None
    return trials


def _validate_values(cfg: SweepTrialConfig, origin) -> None:
    """Registry and range checks; the key path names where in the sweep file the bad value came from."""
    try:
        schema.validate(cfg)
    except ConfigError as error:
        raise ConfigError(origin(error.key), error.value, error.accepted, detail=error.detail) from None


def key_origin(key: str, base: dict, variant: Optional[str], overrides_of_variant: dict, axes: dict,
               drawn: Optional[dict] = None) -> str:
    """The sweep-file path of a trial-config key: search.space.<key> when the search draws it, grid.<axis> when a
    grid axis sets it, else variants.<name>.<key>
    when the variant sets it, else base.<key>; a key nobody sets (a default that conflicts with another value)
    is named under the trial's variant, or base without variants."""
    for axis in drawn or {}:
        if key == axis or key.startswith(axis + "."):
            return f"search.space.{key}"
    for axis in axes:
        if key == axis or key.startswith(axis + "."):
            return f"grid.{key}"
    if variant is not None and _is_set(overrides_of_variant, key):
        return f"variants.{variant}.{key}"
    if variant is None or _is_set(base, key):
        return f"base.{key}"
    return f"variants.{variant}.{key}"


def _is_set(data: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True



def _apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` items to the sweep file's data, as OmegaConf's dotlist merge would (a mapping value is
    merged into the mapping there, anything else replaces it), without OmegaConf: nothing is resolved. Under
    ``grid`` the rest of the key is one axis (``grid.sample.steps=[10, 20]`` adds or replaces the axis
    ``sample.steps`` and keeps the others)."""
    for item in overrides:
        key, equals, text = item.partition("=")
        if not equals:
            raise ConfigError("override", item, "key=value, e.g. base.train.steps=100")
        parts = key.replace("[", ".").replace("]", "").split(".")
        if not all(part.strip() for part in parts):
            raise ConfigError("override", item, "a key=value item with a non-empty key of dot-separated names, "
                                                "e.g. base.train.steps=100")
        try:
            value = load_yaml(text, OverrideLoader)
        except Refused as error:
            where = dotted_path([key, *error.path])
            raise ConfigError(where, text, error.accepted, detail=f"override {item[:40]!r}: {error.problem}") from None
        except (yaml.YAMLError, ValueError, RecursionError) as error:
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(key, text, "a YAML value, e.g. base.train.steps=100 or 'grid.seed=[0, 1]'",
                              detail=f"override {item[:40]!r}: {problem}") from None
        if parts[0] == "grid" and len(parts) > 2:  # grid axes are dotted keys: grid.sample.steps=[...] adds one
            parts = ["grid", ".".join(parts[1:])]
        if parts[:2] == ["search", "space"] and len(parts) > 3:  # so are the search space's
            parts = ["search", "space", ".".join(parts[2:])]
        raw = _updated(raw, parts, value)
    return raw


def _updated(node: Any, parts: list[str], value: Any) -> Any:
    """A copy of ``node`` with ``value`` merged in at the path ``parts`` (YAML aliases share objects: nothing is
    changed in place)."""
    if not parts:
        return _merged(node, value)
    head, rest = parts[0], parts[1:]
    if isinstance(node, list) and head.isdigit() and int(head) < len(node):
        out = list(node)
        out[int(head)] = _updated(node[int(head)], rest, value)
        return out
    out = dict(node) if isinstance(node, dict) else {}
    out[head] = _updated(out.get(head), rest, value)
    return out


def _merged(old: Any, new: Any) -> Any:
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{key: _merged(old.get(key), value) for key, value in new.items()}}
    return new


def _check_plain(data: Any, path: str) -> None:
    """Refuse ${...} (an OmegaConf interpolation: a resolver such as oc.env, or another key) in any key or string,
    and inf or nan anywhere, naming the key path. The value shown is the text as written, never resolved."""
    if isinstance(data, dict):
        for key, value in data.items():
            dotted = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and "${" in key:
                _refuse_interpolation(path or "the sweep file", key)
            _check_plain(value, dotted)
    elif isinstance(data, list):
        for index, value in enumerate(data):
            _check_plain(value, f"{path}[{index}]")
    elif isinstance(data, str) and "${" in data:
        _refuse_interpolation(path, data)
    elif isinstance(data, float) and not math.isfinite(data):
        raise ConfigError(path, data, "a finite number", detail="inf and nan are refused everywhere")


def _refuse_interpolation(path: str, text: str) -> None:
    resolver = RESOLVER.search(text)
    what = (f"${{{resolver.group(1)}:...}} calls an OmegaConf resolver" if resolver else
            "${...} would interpolate another key")
    raise ConfigError(path, text, "a plain value without ${...}",
                      detail=f"{what}; sweep files and overrides are not interpolated, so that nothing from the "
                             "environment reaches MLflow, Tune or the model cache") from None


def _merge(cfg: DictConfig, overrides: dict, where: str) -> DictConfig:
    """Merge plain overrides onto a structured config; schema errors become ConfigError."""
    _check_shapes(cfg, overrides, where)
    try:
        return OmegaConf.merge(cfg, overrides)
    except ConfigKeyError as error:
        key = str(error.full_key or error.key)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(cfg, parent) if parent else cfg
        accepted = ", ".join(node.keys()) if isinstance(node, DictConfig) else "no sub-keys"
        raise ConfigError(f"{where}.{key}", _lookup(overrides, key), f"keys {accepted}", detail="unknown key") from None
    except ValidationError as error:
        key = str(error.full_key or error.key or "")
        if not key:  # OmegaConf could not say which key
            raise ConfigError(where, overrides, "trial-config overrides", detail=str(error).splitlines()[0]) from None
        raise ConfigError(f"{where}.{key}", _lookup(overrides, key), _expected_type(cfg, key)) from None
    except (OmegaConfBaseException, TypeError) as error:
        raise ConfigError(where, overrides, "trial-config overrides", detail=str(error).splitlines()[0]) from None


def _check_shapes(cfg: DictConfig, overrides: dict, where: str, path: str = "") -> None:
    """A mapping where the schema has a section or a dict, a list where it has a list: OmegaConf's own errors for
    these name no key (``base.data: [1, 2]`` was reported as ``base.None``) or are not its errors at all."""
    for key, value in overrides.items():
        if not isinstance(key, str) or key not in cfg or value is None:
            continue  # unknown keys and nulls: the merge names them
        node, dotted = cfg._get_node(key), f"{path}.{key}" if path else key
        if isinstance(node, DictConfig):
            kind = OmegaConf.get_type(node)
            if not isinstance(value, dict):
                what = f"keys {', '.join(node.keys())}" if dataclasses.is_dataclass(kind) else "names to values"
                raise ConfigError(f"{where}.{dotted}", value, f"a mapping of {what}")
            if dataclasses.is_dataclass(kind):
                _check_shapes(node, value, where, dotted)
        elif isinstance(node, ListConfig) and not isinstance(value, list):
            raise ConfigError(f"{where}.{dotted}", value, "a list")


def _expected_type(cfg: DictConfig, key: str) -> str:
    try:
        node = cfg._get_node(key) if "." not in key else OmegaConf.select(cfg, key.rsplit(".", 1)[0])._get_node(key.rsplit(".", 1)[1])
        kind = getattr(node, "_metadata").ref_type
        return f"a value of type {getattr(kind, '__name__', kind)}"
    except Exception:  # noqa: BLE001 - the node may be a list element; describe it generally
        return "a value of the type the schema gives this key (see the README's option table)"


def _lookup(data: Any, dotted: str) -> Any:
    for part in dotted.replace("[", ".").replace("]", "").split("."):
        if isinstance(data, dict) and part not in data and part.lstrip("-").isdigit() and int(part) in data:
            part = int(part)  # a YAML integer key
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return None
    return data


def _check_dotted_key(key: str) -> None:
    node: Any = OmegaConf.structured(SweepTrialConfig)
    path = []
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            accepted = ", ".join(node.keys()) if isinstance(node, DictConfig) else "no sub-keys"
            where = ".".join(path) or "the trial config"
            raise ConfigError(f"grid.{key}", part, f"a key of {where}: {accepted}", detail="unknown key")
        path.append(part)
        node = node[part]


def _nest(dotted: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _short(value: Any) -> str:
    if isinstance(value, (ListConfig, DictConfig)):
        value = OmegaConf.to_container(value)
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted.key: value}: the params MLflow records for a trial."""
    out = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out
