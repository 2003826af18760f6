"""Sweep files: OmegaConf YAML validated against dataclass schemas, expanded into trials.

A sweep file has a ``name``, a ``base`` trial config, named ``variants`` (bundles of overrides)
and a ``grid`` of dotted keys to lists of values. The trials are the product variants x grid.
Command-line overrides (``key=value``, OmegaConf dotlist) apply to the sweep file itself, so
``base.train.steps=100`` or ``grid.seed=[0]`` both work.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from diffusion import config as trial_config
from diffusion.config import TrialConfig
from diffusion.errors import ConfigError

from .cache import check_uri, is_uri

SWEEP_KEYS = ("name", "base", "variants", "grid", "storage", "max_concurrent")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Trial:
    """One point of the sweep: a variant, grid values, and the resolved trial config."""

    name: str  # e.g. "ddpm-seed=1"
    variant: str
    axes: dict[str, Any]  # the grid values of this trial
    config: TrialConfig

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

    def digest(self) -> str:
        """A short hash of the expanded sweep (names and configs of its trials)."""
        blob = json.dumps([t.as_dict() for t in self.trials], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def load_sweep(path: str, overrides: list[str] | None = None) -> Sweep:
    """Read, override, validate and expand a sweep file. Raises ConfigError on any bad input."""
    raw = _read_yaml(path)
    if overrides:
        raw = _apply_overrides(raw, overrides)
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(unknown[0], raw[unknown[0]], "top-level keys " + ", ".join(SWEEP_KEYS), detail="unknown key")
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
    if max_concurrent is not None and (not isinstance(max_concurrent, int) or max_concurrent < 1):
        raise ConfigError("max_concurrent", max_concurrent, "an integer >= 1 or null")
    storage = raw.get("storage", "ray_results")
    if not isinstance(storage, str) or not storage:
        raise ConfigError("storage", storage, "a directory path or URI")
    if is_uri(storage):
        check_uri("storage", storage)

    base_cfg = _merge(OmegaConf.structured(TrialConfig), base, "base")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}", values, "a non-empty list of values")
        _check_dotted_key(key)
    has_variants = bool(variants)
    if not has_variants:
        variants = {"base": {}}
    trials = []
    for variant, overrides_of_variant in variants.items():
        if not isinstance(variant, str) or not NAME_PATTERN.match(variant):
            raise ConfigError("variants", variant, "variant names of letters, digits, '_', '.', '-'")
        if not isinstance(overrides_of_variant, dict):
            raise ConfigError(f"variants.{variant}", overrides_of_variant, "a mapping of trial-config overrides")
        variant_cfg = _merge(base_cfg, overrides_of_variant, f"variants.{variant}")
        for values in itertools.product(*grid.values()):
            axes = dict(zip(grid.keys(), values))
            cfg = variant_cfg.copy()
            for key, value in axes.items():
                cfg = _merge(cfg, _nest(key, value), f"grid.{key}")
            name = variant if not axes else variant + "-" + ",".join(f"{k}={_short(v)}" for k, v in axes.items())
            obj = OmegaConf.to_object(cfg)
            _validate_values(obj, f"variants.{variant}" if has_variants else "base")
            trials.append(Trial(name=name, variant=variant, axes=axes, config=obj))
    varying = (["variant"] if len(variants) > 1 else []) + [k for k, v in grid.items() if len(v) > 1]
    return Sweep(name=sweep_name, trials=trials, varying=varying, storage=storage, max_concurrent=max_concurrent, source=raw)


def _validate_values(cfg: TrialConfig, where: str) -> None:
    """Registry and range checks; the key path names where in the sweep file the trial came from."""
    try:
        trial_config.validate(cfg)
    except ConfigError as error:
        raise ConfigError(f"{where}.{error.key}", error.value, error.accepted, detail=error.detail) from None


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError("FILE", path, "the path of an existing sweep file (YAML)")
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        detail = str(error).replace("\n", " ")
        raise ConfigError("FILE", path, "a YAML mapping with name, base, variants, grid", detail=detail) from None
    if not isinstance(raw, dict):
        raise ConfigError("FILE", path, "a YAML mapping with name, base, variants, grid")
    return raw


def _apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError("override", item, "key=value, e.g. base.train.steps=100")
    try:
        merged = OmegaConf.merge(OmegaConf.create(raw), OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as error:
        raise ConfigError("override", " ".join(overrides), "key=value items", detail=str(error)) from None
    return OmegaConf.to_container(merged, resolve=True)


def _merge(cfg: DictConfig, overrides: dict, where: str) -> DictConfig:
    """Merge plain overrides onto a structured config; schema errors become ConfigError."""
    try:
        return OmegaConf.merge(cfg, overrides)
    except ConfigKeyError as error:
        key = str(error.full_key or error.key)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(cfg, parent) if parent else cfg
        accepted = ", ".join(node.keys()) if isinstance(node, DictConfig) else "no sub-keys"
        raise ConfigError(f"{where}.{key}", _lookup(overrides, key), f"keys {accepted}", detail="unknown key") from None
    except ValidationError as error:
        key = str(error.full_key or error.key)
        expected = _expected_type(cfg, key)
        raise ConfigError(f"{where}.{key}", _lookup(overrides, key), expected) from None
    except OmegaConfBaseException as error:
        raise ConfigError(where, overrides, "trial-config overrides", detail=str(error).splitlines()[0]) from None


def _expected_type(cfg: DictConfig, key: str) -> str:
    try:
        node = cfg._get_node(key) if "." not in key else OmegaConf.select(cfg, key.rsplit(".", 1)[0])._get_node(key.rsplit(".", 1)[1])
        kind = getattr(node, "_metadata").ref_type
        return f"a value of type {getattr(kind, '__name__', kind)}"
    except Exception:  # noqa: BLE001 - the node may be a list element; describe it generally
        return "a value of the type the schema gives this key (see the README's option table)"


def _lookup(data: Any, dotted: str) -> Any:
    for part in dotted.replace("[", ".").replace("]", "").split("."):
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return None
    return data


def _check_dotted_key(key: str) -> None:
    node: Any = OmegaConf.structured(TrialConfig)
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
