"""Name -> object registries, so every choice-valued option can list its valid names."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from the names users write in config files to implementations."""

    def __init__(self, key: str):
        self.key = key  # the config key this registry serves, e.g. "sample.sampler"
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.key}: {name!r} registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(self.key, name, "one of " + ", ".join(sorted(self._items)))
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def options_for(function: Callable, section: Any, renames: Optional[dict[str, str]] = None, **available: Any) -> dict:
    """The keyword arguments ``function`` declares, and only those: each from ``available`` where given (values
    from outside the config, such as the times ``t`` or the model's reverse variance), else, for a parameter with
    a default, from the config ``section``'s field of the same name (or of the name ``renames`` maps it to). This
    is how a config turns into a call of a function that takes plain numbers (a schedule, a sampler, a weighting,
    a data set); a parameter the section lacks keeps its default."""
    options, renames = {}, renames or {}
    for name, parameter in inspect.signature(function).parameters.items():
        field = renames.get(name, name)
        if name in available:
            options[name] = available[name]
        elif parameter.default is not inspect.Parameter.empty and hasattr(section, field):
            options[name] = getattr(section, field)
    return options
