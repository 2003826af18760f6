"""Submit a sweep to a cluster: what the Ray Job and the Slurm batch job share.

    orchestrator submit FILE [key=value ...] [--address URL] [--tracking-uri URI] [--resubmit] [--dry-run]
    orchestrator submit FILE [key=value ...] --slurm [--nodes N] [--gpus-per-node G] [--cpus-per-node C]
                                             [--partition P] [--time HH:MM:SS] [--dry-run]
    orchestrator status JOB [--address URL]
    orchestrator logs JOB [--address URL] [--follow]

``jobs.py`` submits a sweep as a Ray Job and reads its status and logs; ``slurm.py`` writes the sbatch
script (``templates/sbatch.sh``) and submits it. This module holds what they share: ``SubmitError``,
the exit statuses, the checks of addresses and of the tracking URI (``redact``, ``is_loopback``,
``check_tracking_uri``), and what a Ray Job is made of (its id, the sweep file inside the uploaded
project directory, the entrypoint).
"""
from __future__ import annotations

import ipaddress
import os
import re
import shlex
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

from diffusion.errors import ConfigError

from .sweepfile import Sweep

DEFAULT_JOB_SERVER = "http://127.0.0.1:8265"
EXIT_OK, EXIT_FAILED = 0, 1

# Paths of the project directory that are never uploaded with a job (gitignore patterns relative to
# the working directory; Ray also honours the project's .gitignore): heavy local state, and secrets.
TOP_LEVEL_EXCLUDES = (".venv", ".git", "mlartifacts", "mlruns", "mlflow.db", "mlflow-server.log", "mlflow-server.json",
                      "mlflow-server.lock", "ray_results", "data")
ANYWHERE_EXCLUDES = (".env", "*.pt", "__pycache__")
JOB_EXCLUDES = [f"/{name}" for name in TOP_LEVEL_EXCLUDES] + list(ANYWHERE_EXCLUDES)

# Ray stores submission ids in log file names and actor names: keep to a safe alphabet.
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_REMOTE_SCHEMES = ("http", "https", "databricks")


class SubmitError(RuntimeError):
    """The cluster refused or could not be reached (exit status 1, one line on stderr)."""


# --------------------------------------------------------------------------------------------------
# addresses and the tracking URI


def default_address() -> str:
    """The job server: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else http://127.0.0.1:8265."""
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        if os.environ.get(name):
            return os.environ[name]
    return DEFAULT_JOB_SERVER


def redact(uri: str) -> str:
    """``uri`` without a user:password@ part, for messages."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparsable URI>"
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _host_of(address: str) -> Optional[str]:
    if address in ("auto", "local"):
        return "127.0.0.1"  # a cluster on this machine
    if "://" not in address:
        address = "http://" + address
    try:
        return urlsplit(address).hostname
    except ValueError:
        return None


def is_loopback(host: Optional[str]) -> bool:
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost") or host in ("ip6-localhost", "ip6-loopback"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def check_tracking_uri(uri: Optional[str], ray_address: str, key: str = "MLFLOW_TRACKING_URI") -> str:
    """The tracking URI the job will use; ConfigError unless the cluster can reach it."""
    accepted = "the http(s) URI of an MLflow tracking server the cluster reaches, e.g. http://mlflow.internal:5000"
    if not uri:
        raise ConfigError(key, None, accepted, detail="set MLFLOW_TRACKING_URI in the environment, or pass "
                          "--tracking-uri; the job does not start its own MLflow server")
    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
    if scheme not in _REMOTE_SCHEMES:
        raise ConfigError(key, redact(uri), accepted,
                          detail="a local file or database is not shared with the cluster's nodes")
    if is_loopback(urlsplit(uri).hostname) and not is_loopback(_host_of(ray_address)):
        raise ConfigError(key, redact(uri), accepted,
                          detail=f"it is a loopback address of this machine, and the Ray cluster at "
                                 f"{redact(ray_address)} runs elsewhere; pass --tracking-uri with the address "
                                 f"the cluster uses (e.g. http://mlflow:5000 inside the compose stack)")
    return uri


# --------------------------------------------------------------------------------------------------
# what a Ray Job is made of


def submission_id(sweep: Sweep) -> str:
    """``<sweep name>-<digest>``: the same sweep file with the same overrides gives the same id."""
    return _ID_UNSAFE.sub("-", f"{sweep.name}-{sweep.digest()}")[:120]


def project_file(path: str, workdir: str) -> str:
    """``path`` relative to the project directory ``workdir``; ConfigError when it is outside it or
    in a part that is not uploaded."""
    workdir = os.path.realpath(workdir)
    relative = os.path.relpath(os.path.realpath(path), workdir)
    if relative == os.curdir or relative.split(os.sep)[0] == os.pardir or os.path.isabs(relative):
        raise ConfigError("FILE", path, "a sweep file inside the current directory, which is uploaded as the job's "
                          "working directory", detail=f"the current directory is {workdir}; cd to the project first")
    parts = relative.split(os.sep)
    if parts[0] in TOP_LEVEL_EXCLUDES or any(p in (".env", "__pycache__") for p in parts) or parts[-1].endswith(".pt"):
        raise ConfigError("FILE", path, "a sweep file in a part of the project that is uploaded",
                          detail="not uploaded: " + ", ".join(JOB_EXCLUDES))
    return relative.replace(os.sep, "/")


def entrypoint(relative_file: str, overrides: list[str], resume: bool = False) -> str:
    command = ["python", "-m", "orchestrator", "sweep", relative_file, *overrides, "--address", "auto"]
    if resume:
        command.append("--resume")
    return shlex.join(command)

