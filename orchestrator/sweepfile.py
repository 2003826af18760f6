"""Sweep files: OmegaConf YAML validated against dataclass schemas, expanded into trials.

A sweep file has a ``name``, a ``base`` trial config, named ``variants`` (bundles of overrides)
and a ``grid`` of dotted keys to lists of values. The trials are the product variants x grid.
Command-line overrides (``key=value``, OmegaConf dotlist) apply to the sweep file itself, so
``base.train.steps=100`` or ``grid.seed=[0]`` both work.

Sweep files are plain data: ``${...}`` interpolation (OmegaConf resolvers such as ``oc.env``, or references
to other keys) is refused, so nothing from the environment reaches MLflow, Tune's state or the model cache.
The YAML reader refuses duplicate keys, nesting deeper than MAX_DEPTH and documents whose aliases expand
to more than MAX_NODES values (a "billion laughs"), before any of it is expanded.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
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

SWEEP_KEYS = ("name", "base", "variants", "grid", "storage", "max_concurrent")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_DEPTH = 32  # YAML nesting (of a sweep file or an override's value), aliases expanded
MAX_NODES = 100_000  # YAML values (keys, scalars, lists, mappings) of a document, each alias expansion counted
RESOLVER = re.compile(r"\$\{\s*([^:}\s]*)\s*:")  # ${name:...} calls the resolver `name`


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
                cfg = _merge(cfg, _nest(key, value), "grid")
            name = variant if not axes else variant + "-" + ",".join(f"{k}={_short(v)}" for k, v in axes.items())
            origin = functools.partial(key_origin, base=base, variant=variant if has_variants else None,
                                       overrides_of_variant=overrides_of_variant, axes=axes)
            try:
                obj = OmegaConf.to_object(cfg)
            except OmegaConfBaseException as error:  # after the merge: named like the validation errors below
                key = str(error.full_key or error.key or "")
                raise ConfigError(origin(key) if key else "base", None, "a value of the type the schema gives this key",
                                  detail=str(error).splitlines()[0]) from None
            _validate_values(obj, origin)
            trials.append(Trial(name=name, variant=variant, axes=axes, config=obj))
    varying = (["variant"] if len(variants) > 1 else []) + [k for k, v in grid.items() if len(v) > 1]
    return Sweep(name=sweep_name, trials=trials, varying=varying, storage=storage, max_concurrent=max_concurrent, source=raw)


def _validate_values(cfg: TrialConfig, origin) -> None:
    """Registry and range checks; the key path names where in the sweep file the bad value came from."""
    try:
        trial_config.validate(cfg)
    except ConfigError as error:
        raise ConfigError(origin(error.key), error.value, error.accepted, detail=error.detail) from None


def key_origin(key: str, base: dict, variant: Optional[str], overrides_of_variant: dict, axes: dict) -> str:
    """The sweep-file path of a trial-config key: grid.<axis> when a grid axis sets it, else variants.<name>.<key>
    when the variant sets it, else base.<key>; a key nobody sets (a default that conflicts with another value)
    is named under the trial's variant, or base without variants."""
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


class _Refused(yaml.YAMLError):
    """A YAML document the reader refuses: ``path`` (keys and [indices]) and 1-based ``lines`` say where."""

    def __init__(self, problem: str, accepted: str, path: list[str], lines: tuple[int, ...], value: Any = None):
        super().__init__(problem)
        self.problem, self.accepted, self.path, self.lines, self.value = problem, accepted, path, lines, value


class _DuplicateKey(_Refused):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys, nesting deeper than MAX_DEPTH and more than MAX_NODES values
    with every alias expanded (and recursive aliases). It checks while composing, so an alias bomb is refused
    from its small node graph, before anything is constructed or copied."""

    def __init__(self, stream):
        super().__init__(stream)
        self._path: list[str] = []
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth), aliases expanded
        self._keys: dict[int, dict] = {}  # id(mapping node) -> {key: its key node}
        self._composed = 0  # distinct nodes so far: a long flat list is refused before it is all read

    def compose_node(self, parent, index):
        part = None if parent is None else f"[{index}]" if isinstance(index, int) else (
            str(index.value)[:40] if isinstance(index, yaml.ScalarNode) else "?" if index is not None else None)
        if part is not None:
            self._path.append(part)
        try:
            if isinstance(index, yaml.Node) and isinstance(parent, yaml.MappingNode):
                self._check_duplicate(parent, index)
            if len(self._path) > MAX_DEPTH:
                raise self._refuse(f"nested deeper than {MAX_DEPTH} levels", f"YAML nested at most {MAX_DEPTH} levels deep")
            alias = self.check_event(yaml.AliasEvent)
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:
                if alias:
                    raise self._refuse("a recursive alias (a node containing itself)", "YAML without recursive aliases",
                                       node.start_mark)
                self._sizes[id(node)] = self._measure(node)
                self._composed += 1
            values, depth = self._sizes[id(node)]
            if values > MAX_NODES or self._composed > MAX_NODES:
                problem = f"{values:_} values once aliases are expanded" if values > MAX_NODES else "too many values"
                raise self._refuse(problem, f"at most {MAX_NODES:_} values in a YAML document, each alias expansion "
                                            "counted", node.start_mark)
            if depth + len(self._path) > MAX_DEPTH:
                raise self._refuse(f"nested deeper than {MAX_DEPTH} levels once aliases are expanded",
                                   f"YAML nested at most {MAX_DEPTH} levels deep", node.start_mark)
            return node
        finally:
            if part is not None:
                self._path.pop()

    def _measure(self, node) -> tuple[int, int]:
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            return 1, 0
        sizes = [self._sizes[id(child)] for child in children]
        return 1 + sum(values for values, _ in sizes), 1 + max((depth for _, depth in sizes), default=0)

    def _check_duplicate(self, parent, key_node) -> None:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            return
        try:
            key = self.construct_object(key_node)
            hash(key)
        except Exception:  # noqa: BLE001 - a key that does not construct compares by its text
            self.recursive_objects.pop(key_node, None)  # constructing the document reports the error again
            key = (key_node.tag, key_node.value)
        seen = self._keys.setdefault(id(parent), {})
        if key in seen:
            lines = (seen[key].start_mark.line + 1, key_node.start_mark.line + 1)
            raise _DuplicateKey(f"a duplicate key at lines {lines[0]} and {lines[1]}; YAML would silently keep the "
                                "later one", "each key once in a mapping", list(self._path), lines, key)
        seen[key] = key_node

    def _refuse(self, problem: str, accepted: str, mark=None) -> _Refused:
        if mark is None and self.check_event():
            mark = self.peek_event().start_mark
        return _Refused(problem, accepted, list(self._path), (mark.line + 1,) if mark else ())


class _OverrideLoader(_BoundedLoader):
    """The same limits, and OmegaConf's dotlist value rules (1e-3 is a float, no timestamps), as before."""


try:  # OmegaConf's dotlist loader: its module moved between releases
    from omegaconf._yaml import get_yaml_loader
except ImportError:  # pragma: no cover
    from omegaconf._utils import get_yaml_loader
_OverrideLoader.yaml_implicit_resolvers = get_yaml_loader().yaml_implicit_resolvers


def _dotted(path: list[str]) -> str:
    text = ".".join(path).replace(".[", "[")
    return text if len(text) <= 80 else text[:77] + "..."


def _load(text, loader: type) -> Any:
    reader = loader(text)
    try:
        return reader.get_single_data()
    finally:
        reader.dispose()


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError("FILE", path, "the path of an existing sweep file (YAML)")
    try:
        with open(path, encoding="utf-8") as handle:
            raw = _load(handle, _BoundedLoader)
    except _Refused as error:
        where = _dotted(error.path) or "the document"
        lines = " and ".join(map(str, error.lines))
        if isinstance(error, _DuplicateKey):
            variant = len(error.path) == 2 and error.path[0] == "variants"
            raise ConfigError(where, error.value, "each variant name once" if variant else error.accepted,
                              detail=("two variants of this name" if variant else "a duplicate key") +
                              f" at lines {lines} of {path}; YAML would silently keep the later one") from None
        raise ConfigError("FILE", path, error.accepted, detail=f"{where} (line {lines}): {error.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as error:
        detail = str(error).replace("\n", " ").split("; use sys.")[0]  # an integer of more than 4300 digits
        raise ConfigError("FILE", path, "a YAML mapping with name, base, variants, grid", detail=detail) from None
    if not isinstance(raw, dict):
        raise ConfigError("FILE", path, "a YAML mapping with name, base, variants, grid")
    return raw


def _apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` items to the sweep file's data, as OmegaConf's dotlist merge would (a mapping value is
    merged into the mapping there, anything else replaces it), without OmegaConf: nothing is resolved."""
    for item in overrides:
        key, equals, text = item.partition("=")
        if not equals:
            raise ConfigError("override", item, "key=value, e.g. base.train.steps=100")
        parts = key.replace("[", ".").replace("]", "").split(".")
        if not all(part.strip() for part in parts):
            raise ConfigError("override", item, "a key=value item with a non-empty key of dot-separated names, "
                                                "e.g. base.train.steps=100")
        try:
            value = _load(text, _OverrideLoader)
        except _Refused as error:
            where = _dotted([key, *error.path])
            raise ConfigError(where, text, error.accepted, detail=f"override {item[:40]!r}: {error.problem}") from None
        except (yaml.YAMLError, ValueError, RecursionError) as error:
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(key, text, "a YAML value, e.g. base.train.steps=100 or 'grid.seed=[0, 1]'",
                              detail=f"override {item[:40]!r}: {problem}") from None
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
