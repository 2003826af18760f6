"""Submit a sweep as a Slurm batch job that brings its own Ray cluster.

    orchestrator submit FILE [key=value ...] --slurm [--nodes N] [--gpus-per-node G] [--cpus-per-node C]
                                             [--partition P] [--time HH:MM:SS] [--dry-run]

``--slurm`` writes ``<sweep name>.sbatch`` (a Ray head on the first node, a Ray worker on each other
node, then ``orchestrator sweep`` against that cluster; only the Ray processes the script started are
stopped at the end) and submits it with ``sbatch`` when there is one. The script is
``templates/sbatch.sh`` (package data, checked with shellcheck by the tests) with its ``@@NAME@@``
placeholders filled in: a placeholder syntax bash never uses, so the template stays a bash script.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib import resources
from typing import Callable, Optional
from urllib.parse import urlsplit

from diffusion.errors import ConfigError
from diffusion.storage import write_text_atomic

from .submit import EXIT_OK, SubmitError, is_loopback, redact
from .sweepfile import Sweep, load_sweep

TEMPLATE = "templates/sbatch.sh"  # in the orchestrator package

_TIME = re.compile(r"^(?:(\d+)-)?(\d{1,3}):([0-5]\d):([0-5]\d)$")
_PARTITION = re.compile(r"^[A-Za-z0-9_.-]+(?:,[A-Za-z0-9_.-]+)*$")
_PLACEHOLDER = re.compile(r"@@([A-Z]+)@@")


# --------------------------------------------------------------------------------------------------
# options


def _positive_int(key: str, value, minimum: int, accepted: str) -> Optional[int]:
    if value is None:
        return None
    try:
        number = int(str(value), 10)
    except ValueError:
        raise ConfigError(key, value, accepted) from None
    if number < minimum:
        raise ConfigError(key, value, accepted)
    return number


def check_slurm_options(nodes=1, gpus_per_node=0, cpus_per_node=None, partition=None, time=None) -> dict:
    """Validated Slurm options; ConfigError naming the option, the value and what is accepted."""
    options = {
        "nodes": _positive_int("--nodes", nodes if nodes is not None else 1, 1, "an integer >= 1"),
        "gpus_per_node": _positive_int("--gpus-per-node", gpus_per_node if gpus_per_node is not None else 0, 0,
                                       "an integer >= 0"),
        "cpus_per_node": _positive_int("--cpus-per-node", cpus_per_node, 1, "an integer >= 1"),
        "partition": partition,
        "time": time,
    }
    if partition is not None and not _PARTITION.match(partition):
        raise ConfigError("--partition", partition, "a Slurm partition name (letters, digits, '_', '.', '-'), or a "
                          "comma-separated list of them")
    if time is not None:
        match = _TIME.match(time)
        if not match:
            raise ConfigError("--time", time, "a time limit HH:MM:SS or D-HH:MM:SS, e.g. 02:00:00 or 1-12:00:00")
        if match.group(1) is not None and int(match.group(2)) > 23:
            raise ConfigError("--time", time, "a time limit HH:MM:SS or D-HH:MM:SS (hours 0-23 after a day count)")
    return options


# --------------------------------------------------------------------------------------------------
# the script


def template() -> str:
    """The batch script with its ``@@NAME@@`` placeholders (``templates/sbatch.sh``)."""
    return (resources.files("orchestrator") / TEMPLATE).read_text(encoding="utf-8")


def render(text: str, values: dict[str, str]) -> str:
    """``text`` with each ``@@NAME@@`` replaced by ``values[NAME]``, in one pass (a value holding a placeholder
    is never substituted again). ValueError unless the placeholders are exactly the names of ``values``, or
    when an ``@@`` is not part of a placeholder: nothing is left unfilled, nothing is filled by accident."""
    found = set(_PLACEHOLDER.findall(text))
    if found != set(values) or "@@" in _PLACEHOLDER.sub("", text):
        raise ValueError(f"the script template's placeholders {sorted(found)} are not the values given "
                         f"{sorted(values)}, or it has a stray '@@'")
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], text)


def _sbatch_lines(sweep: Sweep, options: dict, workdir: str) -> list[str]:
    """The #SBATCH lines (not shell: each value is validated, or a fixed form)."""
    lines = [f"#SBATCH --job-name={sweep.name}", f"#SBATCH --nodes={options['nodes']}", "#SBATCH --ntasks-per-node=1"]
    if options["gpus_per_node"]:
        lines.append(f"#SBATCH --gpus-per-node={options['gpus_per_node']}")
    if options["cpus_per_node"]:
        lines.append(f"#SBATCH --cpus-per-task={options['cpus_per_node']}")
    if options["partition"]:
        lines.append(f"#SBATCH --partition={options['partition']}")
    if options["time"]:
        lines.append(f"#SBATCH --time={options['time']}")
    if re.fullmatch(r"[A-Za-z0-9_./+-]+", workdir):  # #SBATCH lines are not shell: only a plain path
        lines.append(f"#SBATCH --chdir={workdir}")
    lines.append(f"#SBATCH --output={sweep.name}-%j.out")
    return lines


def slurm_script(sweep: Sweep, file: str, overrides: list[str], options: dict, workdir: str,
                 script_name: str, bindir: Optional[str] = None) -> str:
    """The batch script: every value from the user is shell-quoted (and #SBATCH values validated)."""
    workdir = os.path.realpath(workdir)
    relative = os.path.relpath(os.path.realpath(file), workdir)
    sweep_file = relative if relative.split(os.sep)[0] != os.pardir else os.path.realpath(file)
    bindir = bindir if bindir is not None else os.path.dirname(sys.executable)
    return render(template(), {
        "SBATCH": "\n".join(_sbatch_lines(sweep, options, workdir)),
        "NAME": sweep.name,  # a sweep name is letters, digits, '_', '.' and '-' (sweepfile.NAME_PATTERN)
        "DIGEST": sweep.digest(),
        "SCRIPT": shlex.quote(script_name),
        "WORKDIR": shlex.quote(workdir),
        "BINDIR": shlex.quote(bindir),
        "FILE": shlex.quote(sweep_file),
        "GPUS": str(options["gpus_per_node"]),
        "CPUS": str(options["cpus_per_node"] or "$(nproc)"),
        "OVERRIDES": "".join(shlex.quote(item) + " " for item in overrides),
    })


# --------------------------------------------------------------------------------------------------
# submit


def idle_gpus_warning(sweep, options: dict) -> Optional[str]:
    """Why the allocation's GPUs would sit idle, when ``--gpus-per-node`` asks for GPUs that no trial of the sweep
    requests (``resources.gpu``); None otherwise."""
    if not options["gpus_per_node"] or any(t.config.resources.gpu > 0 for t in sweep.trials):
        return None
    return (f"--gpus-per-node {options['gpus_per_node']} allocates GPUs, but no trial of sweep {sweep.name} requests "
            "one (resources.gpu is 0 in every trial): they would sit idle. Set base.resources.gpu (a fraction shares "
            "a GPU between trials) or drop --gpus-per-node")


def submit_slurm(file: str, overrides: list[str], nodes=None, gpus_per_node=None, cpus_per_node=None,
                 partition=None, time=None, dry_run: bool = False, workdir: str = ".",
                 out: Callable[[str], None] = print) -> int:
    """Write ``<sweep name>.sbatch`` in ``workdir`` and submit it with sbatch (unless ``dry_run`` or no sbatch)."""
    options = check_slurm_options(nodes, gpus_per_node, cpus_per_node, partition, time)
    sweep = load_sweep(file, overrides)
    script_name = f"{sweep.name}.sbatch"
    path = os.path.join(os.path.abspath(workdir), script_name)
    text = slurm_script(sweep, file, overrides, options, workdir, script_name)
    write_text_atomic(path, text, mode=0o755)
    note = _tracking_note(os.environ.get("MLFLOW_TRACKING_URI"))
    idle = idle_gpus_warning(sweep, options)
    if idle:
        out(f"warning: {idle}")
    sbatch = shutil.which("sbatch")
    if dry_run or not sbatch:
        if dry_run:
            out(text.rstrip("\n"))
            out("")
        out(f"wrote {path} ({len(sweep.trials)} trial(s) on {options['nodes']} node(s)); "
            + ("" if sbatch else "sbatch is not on PATH; ") + f"submit it with: sbatch {shlex.quote(script_name)}")
        if note:
            out(f"note: {note}")
        return EXIT_OK
    if note:
        out(f"note: {note}")
    result = subprocess.run([sbatch, "--parsable", script_name], cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        raise SubmitError(f"sbatch refused {path}: " + (result.stderr.strip().splitlines() or ["no message"])[-1])
    job_id = result.stdout.strip().split(";")[0]
    out(f"submitted sweep {sweep.name} ({len(sweep.trials)} trial(s) on {options['nodes']} node(s)) as Slurm job "
        f"{job_id}; script {path}, output {sweep.name}-{job_id}.out")
    out(f"follow it with: squeue -j {job_id}    and: tail -f {sweep.name}-{job_id}.out")
    return EXIT_OK


def _tracking_note(uri: Optional[str]) -> Optional[str]:
    """What to tell about MLFLOW_TRACKING_URI (the script reads it from the environment sbatch passes on)."""
    if not uri:
        return ("MLFLOW_TRACKING_URI is not set: on one node the sweep starts its own MLflow server in this "
                "directory; with several nodes the script stops. Export the URI of an MLflow server the compute "
                "nodes reach before sbatch")
    if is_loopback(urlsplit(uri).hostname if "://" in uri else None):
        return (f"MLFLOW_TRACKING_URI ({redact(uri)}) is a loopback address: the compute nodes reach it only if "
                f"the job runs on this machine")
    return None
