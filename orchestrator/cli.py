"""``orchestrator``: run, validate and inspect sweeps of diffusion-model trials.

    orchestrator sweep FILE [key=value ...] [--dry-run]
    orchestrator validate FILE [key=value ...]
    orchestrator options

Bad input (a missing or unparsable file, an unknown key, a wrong type, an unknown choice, an
out-of-range value) prints one message naming the key, the value and what is accepted, and exits
with status 2 before Ray or MLflow start and before anything is written.
"""
from __future__ import annotations

import argparse
import sys

from diffusion.errors import ConfigError

from .options import option_table
from .runner import EXIT_USAGE, describe, run_sweep
from .sweepfile import load_sweep


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser("sweep", help="run every trial of a sweep file on Ray Tune, recorded in MLflow")
    sweep.add_argument("file", help="sweep file (YAML)")
    sweep.add_argument("overrides", nargs="*", help="key=value overrides of the sweep file, e.g. base.train.steps=100")
    sweep.add_argument("--dry-run", action="store_true", help="list the trials and run nothing")
    validate = commands.add_parser("validate", help="check a sweep file and list its trials; run nothing")
    validate.add_argument("file")
    validate.add_argument("overrides", nargs="*")
    commands.add_parser("options", help="print every trial-config option with its default and meaning")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "options":
        print(option_table())
        return 0
    try:
        sweep = load_sweep(args.file, args.overrides)
    except ConfigError as error:
        print(f"orchestrator: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "validate" or args.dry_run:
        print(describe(sweep))
        return 0
    try:
        return run_sweep(sweep)
    except ConfigError as error:
        print(f"orchestrator: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
