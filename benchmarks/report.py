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


def output_options(parser) -> None:
    """``--out FILE`` (write the report there instead of docs/BENCHMARKS.md) or ``--no-write`` (print it only)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=None, help="write the report into this file (default docs/BENCHMARKS.md)")
    where.add_argument("--no-write", action="store_true", help="print the report only")


def publish(report: str, args, begin: str, end: str, heading: str) -> None:
    """Print ``report`` and write it into its section, as ``output_options``' arguments say."""
    print(report)
    if not args.no_write:
        write_section(report, begin, end, heading, **({"path": args.out} if args.out else {}))
