"""Shared by the benchmark scripts: write a report into its own section of docs/BENCHMARKS.md."""
from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "docs", "BENCHMARKS.md")


def write_section(report: str, begin: str, end: str, heading: str, path: str = BENCHMARKS) -> None:
    """Replace the text between the markers ``begin`` and ``end`` of ``path`` with ``report``; a file or
    section that does not exist yet is created, the section appended under ``## heading``."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    if begin not in text:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"{head}{begin}\n{report}\n{end}{tail}")
