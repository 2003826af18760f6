"""The option table (every trial-config key, its default and meaning), read from the schemas.

The comments on the fields of ``diffusion.config`` (and ``orchestrator.schema``'s resources) are the documentation; this module turns them
into the table that ``orchestrator options`` prints and that the README embeds (a test keeps the
two equal).
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from diffusion import config

from . import schema

FIELD_LINE = re.compile(r"^\s+(\w+):\s*[^=]+=\s*.*?#\s*(.+)$")


def _comments(cls) -> dict[str, str]:
    return {m.group(1): m.group(2).strip() for m in map(FIELD_LINE.match, inspect.getsource(cls).splitlines()) if m}


def option_rows() -> list[tuple[str, str, str]]:
    """(dotted key, default, meaning) for every leaf of TrialConfig, in schema order."""
    rows = []
    hints = typing.get_type_hints(schema.SweepTrialConfig)
    top = schema.SweepTrialConfig()
    # the sections in schema order (the library's, then the orchestrator's resources), then top-level keys (seed)
    fields = dataclasses.fields(schema.SweepTrialConfig)
    for section in sorted(fields, key=lambda f: not dataclasses.is_dataclass(hints[f.name])):
        cls = hints[section.name]
        if not dataclasses.is_dataclass(cls):
            rows.append((section.name, _show(getattr(top, section.name)), _comments(config.TrialConfig)[section.name]))
            continue
        comments, instance = _comments(cls), cls()
        for item in dataclasses.fields(cls):
            rows.append((f"{section.name}.{item.name}", _show(getattr(instance, item.name)), comments.get(item.name, "")))
    return [(key, default, meaning + _bounds(key)) for key, default, meaning in rows]


def _bounds(key: str) -> str:
    """The range validate enforces on an integer option (config.INT_BOUNDS), as the table states it."""
    bounds = {**config.INT_BOUNDS, **schema.INT_BOUNDS}
    if key not in bounds:
        return ""
    low, high = map(config.show_bound, bounds[key])
    return f" (range: {'each ' if key == 'model.channel_mult' else ''}{low} to {high})"


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def option_table(prefix: str = "") -> str | None:
    """The Markdown table of the options whose key starts with ``prefix`` (all by default); None when none does."""
    rows = [row for row in option_rows() if row[0].startswith(prefix)]
    if not rows:
        return None
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | `{default}` | {meaning} |" for key, default, meaning in rows]
    return "\n".join(lines)
