"""``orchestrator``: run, validate and inspect sweeps of diffusion-model trials.

    orchestrator sweep FILE [key=value ...] [--dry-run] [--no-cache] [--resume] [--address ADDRESS]
    orchestrator resume FILE [key=value ...] [--address ADDRESS]
    orchestrator validate FILE [key=value ...] [--address ADDRESS]
    orchestrator options [PREFIX]
    orchestrator report SWEEP_NAME_OR_PARENT_RUN_ID
    orchestrator --version
    orchestrator submit FILE [key=value ...] [--address URL] [--tracking-uri URI] [--resubmit] [--dry-run]
    orchestrator submit FILE [key=value ...] --slurm [--nodes N] [--gpus-per-node G] [--cpus-per-node C]
                                             [--partition P] [--time HH:MM:SS] [--dry-run]
    orchestrator status JOB [--address URL]
    orchestrator logs JOB [--address URL] [--follow]

Bad input (a missing or unparsable file, an unknown key, a wrong type, an unknown choice, an
out-of-range value, a data set whose files are missing, resources no node has, a tracking server that does
not answer or refuses the credentials) prints one message
naming the key, the value and what is accepted, and exits with status 2 before MLflow starts and
before anything is written.
"""
from __future__ import annotations

import argparse
import sys

from diffusion.errors import ConfigError

from . import EXIT_USAGE

# torch (through the sweep file's schema), Ray and MLflow are imported only by the commands that need them:
# --help and --version answer without them.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser("sweep", help="run every trial of a sweep file on Ray Tune, recorded in MLflow")
    sweep.add_argument("file", help="sweep file (YAML)")
    sweep.add_argument("overrides", nargs="*", help="key=value overrides of the sweep file, e.g. base.train.steps=100")
    sweep.add_argument("--dry-run", action="store_true",
                       help="list the trials and how many models would be trained or reused; run nothing")
    sweep.add_argument("--no-cache", action="store_true",
                       help="retrain every model even when the model cache has it (the cache entries are replaced)")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the latest unfinished run of this sweep: finished trials are not rerun")
    resume = commands.add_parser("resume", help="continue the latest unfinished run of a sweep (sweep FILE --resume)")
    resume.add_argument("file")
    resume.add_argument("overrides", nargs="*", help="the overrides the sweep was started with")
    for command in (sweep, resume):
        command.add_argument("--address", default=None,
                             help="join a running Ray cluster: auto, HOST:6379 or ray://HOST:10001 (default: start "
                                  "a local Ray instance)")
    validate = commands.add_parser("validate", help="check a sweep file, its data and resources, and list its "
                                                    "trials; run nothing")
    validate.add_argument("file")
    validate.add_argument("overrides", nargs="*")
    validate.add_argument("--address", default=None,
                          help="check the trials' resources against this Ray cluster (default: this machine)")
    options = commands.add_parser("options", help="print every trial-config option with its default and meaning")
    options.add_argument("prefix", nargs="?", default="",
                         help="only the options whose key starts with this, e.g. eval. or sample.steps")
    report = commands.add_parser("report", help="make a sweep's report (variants with intervals, verdicts, plots, "
                                                 "samples) again from MLflow, for a finished or partial sweep")
    report.add_argument("sweep", help="a sweep's name (its latest run) or its parent run's id")
    _add_cluster_commands(commands)
    return parser


JOB_SERVER_HELP = ("the Ray job server (dashboard) URL, e.g. http://head:8265 (default: $RAY_API_SERVER_ADDRESS, "
                   "else $RAY_ADDRESS, else http://127.0.0.1:8265)")


def _version() -> str:
    """The installed distribution's version (pyproject.toml's), without importing the package's dependencies."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusion-orchestrator")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def _add_cluster_commands(commands) -> None:
    submit = commands.add_parser(
        "submit", help="submit a sweep to a Ray cluster as a Ray Job (once per sweep), or as a Slurm batch job")
    submit.add_argument("file", help="sweep file (YAML), inside the current directory for a Ray Job")
    submit.add_argument("overrides", nargs="*", help="key=value overrides of the sweep file")
    submit.add_argument("--address", default=None, help=JOB_SERVER_HELP)
    submit.add_argument("--tracking-uri", default=None,
                        help="the MLflow URI as the cluster reaches it (default: $MLFLOW_TRACKING_URI)")
    submit.add_argument("--resubmit", action="store_true",
                        help="submit again when the sweep's latest job has ended, as <id>-2, <id>-3, ...; it "
                             "continues the sweep's unfinished MLflow run if there is one")
    submit.add_argument("--dry-run", action="store_true",
                        help="show what would be submitted (with --slurm: write and print the batch script); "
                             "submit nothing")
    slurm = submit.add_argument_group("Slurm (--slurm)")
    slurm.add_argument("--slurm", action="store_true",
                       help="write <sweep name>.sbatch (a Ray cluster over the allocation, then the sweep) and "
                            "submit it with sbatch when sbatch is on PATH")
    slurm.add_argument("--nodes", default=None, help="nodes (default 1)")
    slurm.add_argument("--gpus-per-node", default=None, help="GPUs per node (default 0)")
    slurm.add_argument("--cpus-per-node", default=None, help="CPUs per node (default: the partition's default)")
    slurm.add_argument("--partition", default=None, help="Slurm partition")
    slurm.add_argument("--time", default=None, help="time limit, HH:MM:SS or D-HH:MM:SS")
    status = commands.add_parser("status", help="print the status of a Ray job submitted with orchestrator submit")
    status.add_argument("job", help="the job's submission id")
    status.add_argument("--address", default=None, help=JOB_SERVER_HELP)
    logs = commands.add_parser("logs", help="print the logs of a Ray job submitted with orchestrator submit")
    logs.add_argument("job", help="the job's submission id")
    logs.add_argument("--address", default=None, help=JOB_SERVER_HELP)
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing the logs until the job ends")


def _cluster_command(args) -> int:
    from .jobs import job_logs, job_status, submit_job
    from .slurm import submit_slurm

    if args.command == "submit":
        slurm_only = {"--nodes": args.nodes, "--gpus-per-node": args.gpus_per_node,
                      "--cpus-per-node": args.cpus_per_node, "--partition": args.partition, "--time": args.time}
        if args.slurm:
            for flag, value in {"--address": args.address, "--tracking-uri": args.tracking_uri,
                                "--resubmit": args.resubmit or None}.items():
                if value is not None:
                    raise ConfigError(flag, value, "no " + flag + " with --slurm",
                                      detail="the batch job starts its own Ray cluster and reads MLFLOW_TRACKING_URI "
                                             "from the environment sbatch passes on")
            return submit_slurm(args.file, args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                cpus_per_node=args.cpus_per_node, partition=args.partition, time=args.time,
                                dry_run=args.dry_run)
        for flag, value in slurm_only.items():
            if value is not None:
                raise ConfigError(flag, value, f"{flag} only with --slurm")
        return submit_job(args.file, args.overrides, address=args.address, tracking_uri=args.tracking_uri,
                          resubmit=args.resubmit, dry_run=args.dry_run)
    if args.command == "status":
        return job_status(args.job, address=args.address)
    return job_logs(args.job, address=args.address, follow=args.follow)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "options":
        from .options import option_table

        table = option_table(args.prefix)
        if table is None:
            print(f"orchestrator: error: options: no option key starts with {args.prefix!r}; the sections are "
                  "data., process., model., loss., train., sample., eval., resources. and seed", file=sys.stderr)
            return EXIT_USAGE
        print(table)
        return 0
    if args.command == "report":
        from .report import regenerate

        try:
            made = regenerate(args.sweep)
        except ConfigError as error:
            print(f"orchestrator: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        print(made.summary)
        print(f"report: {made.path}")
        return 0
    if args.command in ("submit", "status", "logs"):
        from .submit import SubmitError

        try:
            return _cluster_command(args)
        except ConfigError as error:
            print(f"orchestrator: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        except SubmitError as error:
            print(f"orchestrator: error: {error}", file=sys.stderr)
            return 1
    from .preflight import quiet_env
    from .sweepfile import load_sweep

    quiet_env()  # before anything imports Ray, which reads some of it then
    try:
        sweep = load_sweep(args.file, args.overrides)
    except ConfigError as error:
        print(f"orchestrator: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    from .preflight import check_data, check_resources, local_resources, start_ray
    from .runner import describe, model_cache, plan, run_sweep

    use_cache = not getattr(args, "no_cache", False)
    try:
        if args.command == "validate" or getattr(args, "dry_run", False):
            datasets = check_data(sweep, fetch=False)
            cache = model_cache(sweep)
            # the plan first: a sweep sized for a cluster is described even where this machine cannot run it
            print(describe(sweep, plan(sweep, cache, use_cache), cache, datasets), flush=True)
            if args.address:
                start_ray(sweep, args.address)  # checks the cluster's resources
                import ray

                ray.shutdown()
            else:
                check_resources(sweep, local_resources(), "this machine")
            return 0
        resume = args.command == "resume" or args.resume
        return run_sweep(sweep, use_cache=use_cache, resume=resume, address=args.address)
    except ConfigError as error:
        print(f"orchestrator: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
