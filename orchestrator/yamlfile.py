"""The bounded YAML reader of sweep files and of command-line override values.

A ``yaml.SafeLoader`` that refuses duplicate keys, nesting deeper than MAX_DEPTH and documents whose aliases
expand to more than MAX_NODES values (a "billion laughs"), while the node graph is composed: before any of it
is constructed or expanded. ``read_yaml`` reads a sweep file with it and turns what it refuses into a
``ConfigError`` naming the key path and the lines; ``OverrideLoader`` (the same limits) parses the values of
command-line overrides, which ``orchestrator.sweepfile`` applies.
"""
from __future__ import annotations

import os
from typing import Any

import yaml

from diffusion.errors import ConfigError

MAX_DEPTH = 32  # YAML nesting (of a sweep file or an override's value), aliases expanded
MAX_NODES = 100_000  # YAML values (keys, scalars, lists, mappings) of a document, each alias expansion counted


class Refused(yaml.YAMLError):
    """A YAML document the reader refuses: ``path`` (keys and [indices]) and 1-based ``lines`` say where."""

    def __init__(self, problem: str, accepted: str, path: list[str], lines: tuple[int, ...], value: Any = None):
        super().__init__(problem)
        self.problem, self.accepted, self.path, self.lines, self.value = problem, accepted, path, lines, value


class _DuplicateKey(Refused):
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

    def _refuse(self, problem: str, accepted: str, mark=None) -> Refused:
        if mark is None and self.check_event():
            mark = self.peek_event().start_mark
        return Refused(problem, accepted, list(self._path), (mark.line + 1,) if mark else ())


class OverrideLoader(_BoundedLoader):
    """The same limits, and OmegaConf's dotlist value rules (1e-3 is a float, no timestamps), as before."""


try:  # OmegaConf's dotlist loader: its module moved between releases
    from omegaconf._yaml import get_yaml_loader
except ImportError:  # pragma: no cover
    from omegaconf._utils import get_yaml_loader
OverrideLoader.yaml_implicit_resolvers = get_yaml_loader().yaml_implicit_resolvers


def dotted_path(path: list[str]) -> str:
    text = ".".join(path).replace(".[", "[")
    return text if len(text) <= 80 else text[:77] + "..."


def load_yaml(text, loader: type) -> Any:
    reader = loader(text)
    try:
        return reader.get_single_data()
    finally:
        reader.dispose()


def read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError("FILE", path, "the path of an existing sweep file (YAML)")
    try:
        with open(path, encoding="utf-8") as handle:
            raw = load_yaml(handle, _BoundedLoader)
    except Refused as error:
        where = dotted_path(error.path) or "the document"
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
