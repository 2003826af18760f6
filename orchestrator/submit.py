"""Submit a sweep to a cluster: as a Ray Job, or as a Slurm batch job that brings its own Ray cluster.

    orchestrator submit FILE [key=value ...] [--address URL] [--tracking-uri URI] [--resubmit] [--dry-run]
    orchestrator submit FILE [key=value ...] --slurm [--nodes N] [--gpus-per-node G] [--cpus-per-node C]
                                             [--partition P] [--time HH:MM:SS] [--dry-run]
    orchestrator status JOB [--address URL]
    orchestrator logs JOB [--address URL] [--follow]

Ray Jobs: the job runs ``python -m orchestrator sweep FILE [key=value ...] --address auto`` on the
cluster, in a copy of the current directory (the project directory: Ray's ``working_dir``, without
the virtualenv, MLflow's and Ray's local state, data, ``.env`` and weights). The cluster is assumed
to have the project's dependencies installed (``docker/ray.Dockerfile``); nothing is pip-installed
per job. The submission id is ``<sweep name>-<sweep digest>``, so submitting the same sweep twice
submits it once: the second call prints the first job's status. ``--resubmit`` submits a new
attempt (``<id>-2``, ``<id>-3``, ...) once the latest has ended; it continues the sweep's unfinished
MLflow run (``sweep --resume``: finished trials are not rerun) when there is one.

The tracking server is the one in ``MLFLOW_TRACKING_URI`` (or ``--tracking-uri``, the URI as the
cluster sees it) reaches the job through its ``runtime_env`` ``env_vars``, with the other settings of
``TRACKING_ENV`` that are not secrets. Credentials (``SECRET_ENV``) are never sent: Ray logs a job's
runtime_env and shows it through its job API. The job uses the cluster's own credentials (docs/SECURITY.md).

Slurm: ``--slurm`` writes ``<sweep name>.sbatch`` (a Ray head on the first node, a Ray worker on
each other node, then ``orchestrator sweep`` against that cluster; only the Ray processes the
script started are stopped at the end) and submits it with ``sbatch`` when there is one.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Optional
from urllib.parse import urlsplit, urlunsplit

from diffusion.errors import ConfigError
from diffusion.storage import write_text_atomic

from .sweepfile import Sweep, load_sweep
from .tracking import SECRET_ENV, TRACKING_ENV, check_tracking_uri_credentials

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
_TIME = re.compile(r"^(?:(\d+)-)?(\d{1,3}):([0-5]\d):([0-5]\d)$")
_PARTITION = re.compile(r"^[A-Za-z0-9_.-]+(?:,[A-Za-z0-9_.-]+)*$")
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
# the job


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


def job_env(tracking_uri: str) -> dict[str, str]:
    """The job's env_vars: the tracking variables of this environment that are not secrets (``SECRET_ENV``),
    and the URI as the cluster sees it. Ray writes a job's runtime_env, env_vars included, in plain text to
    its logs and shows it to every user of its job API, so the credentials are never sent: the job uses the
    cluster's own (the nodes' environment, or ~/.mlflow/credentials and ~/.aws/credentials there; see
    docs/SECURITY.md)."""
    env = {name: os.environ[name] for name in TRACKING_ENV if os.environ.get(name) and name not in SECRET_ENV}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def unsent_credentials() -> list[str]:
    """The credential variables set here that a Ray Job does not take along."""
    return [name for name in SECRET_ENV if os.environ.get(name)]


def job_runtime_env(workdir: str, tracking_uri: str, sweep: Sweep) -> dict:
    excludes = list(JOB_EXCLUDES)
    storage = sweep.storage
    if "://" not in storage and not os.path.isabs(storage):
        relative = os.path.normpath(storage)
        if relative.split(os.sep)[0] != os.pardir and f"/{relative}" not in excludes:
            excludes.append(f"/{relative}")
    return {"working_dir": os.path.realpath(workdir), "excludes": excludes, "env_vars": job_env(tracking_uri)}


def connect(address: str):
    """A JobSubmissionClient for ``address``; SubmitError when the job server does not answer."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as error:  # ray without the [default] extra
        raise SubmitError(f"the Ray job client needs ray[default] ({error})") from None
    try:
        return JobSubmissionClient(address)
    except Exception as error:  # noqa: BLE001 - ConnectionError, AuthenticationError, ValueError...
        raise SubmitError(f"cannot use the Ray job server at {redact(address)}: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # Ray's HTTP errors carry the server's traceback: its last line says what went wrong
    if lines and lines[0].startswith("Request failed") and len(lines) > 1:
        return lines[0].split(":")[0] + ": " + lines[-1].rstrip(".")
    return lines[0] if lines else type(error).__name__


def attempts(client, base_id: str) -> list[tuple[int, str, object]]:
    """(attempt number, submission id, JobDetails) of every job submitted for ``base_id``, in order."""
    pattern = re.compile(re.escape(base_id) + r"(?:-(\d+))?$")
    found = []
    for job in client.list_jobs():
        match = pattern.fullmatch(job.submission_id or "")
        if match:
            found.append((int(match.group(1) or 1), job.submission_id, job))
    return sorted(found, key=lambda item: item[0])


def _unfinished_run(sweep: Sweep, uris: list[str]) -> Optional[bool]:
    """Whether MLflow has an unfinished parent run of this sweep (what ``sweep --resume`` continues);
    None when no URI answers."""
    from mlflow.tracking import MlflowClient

    for uri in dict.fromkeys(u for u in uris if u):
        try:
            with _quick_mlflow():
                client = MlflowClient(uri)
                experiment = client.get_experiment_by_name(sweep.name)
                if experiment is None:
                    return False
                runs = client.search_runs([experiment.experiment_id], f"tags.sweep_digest = '{sweep.digest()}'",
                                          order_by=["attributes.start_time DESC"], max_results=100)
        except Exception:  # noqa: BLE001 - unreachable from here (e.g. a name only the cluster resolves)
            continue
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        return bool(parents) and parents[0].info.status != "FINISHED"
    return None


@contextmanager
def _quick_mlflow() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def submit_job(file: str, overrides: list[str], address: Optional[str] = None, tracking_uri: Optional[str] = None,
               resubmit: bool = False, dry_run: bool = False, workdir: str = ".", client=None,
               out: Callable[[str], None] = print) -> int:
    """Submit the sweep as a Ray Job (once per sweep: see the module docstring); returns the exit status."""
    address = address or default_address()
    sweep = load_sweep(file, overrides)
    relative = project_file(file, workdir)
    submitter_uri = os.environ.get("MLFLOW_TRACKING_URI")
    uri_key = "--tracking-uri" if tracking_uri else "MLFLOW_TRACKING_URI"
    check_tracking_uri_credentials(tracking_uri or submitter_uri, uri_key)
    uri = check_tracking_uri(tracking_uri or submitter_uri, address, key=uri_key)
    base_id = submission_id(sweep)
    runtime_env = job_runtime_env(workdir, uri, sweep)
    metadata = {"sweep": sweep.name, "sweep_digest": sweep.digest(), "submitted_by": "orchestrator submit"}
    if dry_run:
        out(f"sweep {sweep.name}: {len(sweep.trials)} trial(s); would be submitted to {redact(address)} as Ray job "
            f"{base_id}")
        out(f"  entrypoint:  {entrypoint(relative, overrides)}")
        out(f"  working dir: {runtime_env['working_dir']} (without {', '.join(runtime_env['excludes'])})")
        out(f"  env vars:    {', '.join(sorted(runtime_env['env_vars']))} (values not shown)")
        out(f"  MLflow:      {redact(uri)}")
        out(_credentials_note())
        return EXIT_OK

    client = client or connect(address)
    try:
        previous = attempts(client, base_id)
    except Exception as error:  # noqa: BLE001
        raise SubmitError(f"cannot list the jobs at {redact(address)}: {_first_line(error)}") from None
    resume = False
    if previous:
        number, latest, job = previous[-1]
        status = str(job.status)
        if not resubmit:
            out(f"sweep {sweep.name} was already submitted as Ray job {latest}: {status}"
                + (f" ({job.message})" if job.message else ""))
            out("not submitted again" + (f"; to run it again (continuing its unfinished MLflow run, if any): "
                                         f"orchestrator submit {shlex.join([file, *overrides])} --resubmit"
                                         if status in ("FAILED", "STOPPED") else ""))
            out(_follow_hint(latest, address))
            return EXIT_OK
        if status not in ("FAILED", "STOPPED", "SUCCEEDED"):
            raise ConfigError("--resubmit", latest, "a sweep whose latest job has ended (FAILED, STOPPED or SUCCEEDED)",
                              detail=f"job {latest} is {status}; stop it first with `ray job stop {latest}`")
        job_id = f"{base_id}-{number + 1}"
        resume = bool(_unfinished_run(sweep, [submitter_uri, uri]))
    else:
        job_id = base_id

    command = entrypoint(relative, overrides, resume=resume)
    try:
        submitted = client.submit_job(entrypoint=command, submission_id=job_id, runtime_env=runtime_env,
                                      metadata=metadata)
    except Exception as error:  # noqa: BLE001
        if "already exists" in str(error):  # submitted by someone else meanwhile
            out(f"sweep {sweep.name} was already submitted as Ray job {job_id}; not submitted again")
            out(_follow_hint(job_id, address))
            return EXIT_OK
        raise SubmitError(f"the Ray job server at {redact(address)} refused the job: {_first_line(error)}") from None
    how = "continuing its unfinished MLflow run" if resume else f"{len(sweep.trials)} trial(s)"
    out(f"submitted sweep {sweep.name} ({how}) to {redact(address)} as Ray job {submitted}")
    out(f"  entrypoint: {command}")
    out(f"  MLflow:     {redact(uri)}, experiment '{sweep.name}'")
    out(_credentials_note())
    out(_follow_hint(submitted, address))
    return EXIT_OK


def _credentials_note() -> str:
    unsent = unsent_credentials()
    if not unsent:
        return "  credentials: none set here; the job uses the cluster's own (docs/SECURITY.md)"
    return (f"  credentials: not sent ({', '.join(unsent)}): Ray logs a job's environment; the job uses the "
            f"cluster's own (docs/SECURITY.md)")


def _follow_hint(job_id: str, address: str) -> str:
    flag = "" if address == default_address() else f" --address {shlex.quote(redact(address))}"
    return (f"follow it with: orchestrator status {job_id}{flag}    or: orchestrator logs {job_id}{flag} --follow")


def _job_info(client, job_id: str, address: str):
    try:
        return client.get_job_info(job_id)
    except Exception as error:  # noqa: BLE001
        if "does not exist" in str(error) or "404" in str(error):
            raise ConfigError("JOB", job_id, "the submission id of a job on this cluster (orchestrator submit prints "
                              "it; `ray job list` lists them)", detail=f"no such job at {redact(address)}") from None
        raise SubmitError(f"cannot read job {job_id} at {redact(address)}: {_first_line(error)}") from None


def job_status(job_id: str, address: Optional[str] = None, client=None, out: Callable[[str], None] = print) -> int:
    """Print a job's status and message; exit status 0 (whatever the job's status)."""
    address = address or default_address()
    client = client or connect(address)
    info = _job_info(client, job_id, address)
    out(f"{job_id}: {info.status}")
    if info.message:
        out(f"  {info.message}")
    if info.driver_exit_code is not None:
        out(f"  exit status of orchestrator sweep: {info.driver_exit_code}")
    return EXIT_OK


def job_logs(job_id: str, address: Optional[str] = None, follow: bool = False, client=None) -> int:
    """Print a job's logs; with ``follow``, keep printing them until the job ends."""
    address = address or default_address()
    client = client or connect(address)
    _job_info(client, job_id, address)  # a clear error for an unknown id
    if not follow:
        sys.stdout.write(client.get_job_logs(job_id))
        sys.stdout.flush()
        return EXIT_OK

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # noqa: BLE001
        raise SubmitError(f"lost the log stream of job {job_id}: {_first_line(error)}") from None
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
# Slurm


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


_SCRIPT = r"""#!/bin/bash
@SBATCH@
#
# Written by `orchestrator submit --slurm` for sweep @NAME@ (digest @DIGEST@); edit freely.
# Submit it with:  sbatch @SCRIPT@
#
# In the allocation: a Ray head on the first node, a Ray worker on each other node (srun), then
# `orchestrator sweep` against that cluster on the first node. On exit the Ray processes this
# script started, and only those, are stopped (never `ray stop`, which would stop every Ray
# instance of your user on the node).
#
# The environment at `sbatch` time is passed on (Slurm's default --export=ALL): MLFLOW_TRACKING_URI,
# an MLflow server the compute nodes reach, and the MLflow credentials come from there; none is
# written here. Optional settings, from the environment:
#   ORCHESTRATOR_RAY_PORT        the head's GCS port (default 6379)
#   ORCHESTRATOR_RAY_TMPDIR      Ray's temp dir on each node (default /tmp/ray-$SLURM_JOB_ID; keep it short)
#   ORCHESTRATOR_DASHBOARD_PORT  start the Ray dashboard on the head, on 127.0.0.1:PORT (default: none)
#   ORCHESTRATOR_HEAD_IP         the head's address as the other nodes reach it (default: resolved)
#   ORCHESTRATOR_RAY_START_ARGS  more arguments for every `ray start` (split on spaces)
#   ORCHESTRATOR_RAY_TIMEOUT     seconds to wait for the Ray head (default 300)
#   RAY_AUTH_MODE=disabled       no token authentication for this job's Ray cluster
set -eo pipefail

cd @WORKDIR@
# the environment `orchestrator submit` ran in (its python and ray), when the nodes have it
if [ -x @BINDIR@/ray ]; then PATH=@BINDIR@:"$PATH"; export PATH; fi
export PYTHONUNBUFFERED=1

: "${SLURM_JOB_NODELIST:?is not set: submit this script with sbatch}"
SWEEP_FILE=@FILE@
GPUS_PER_NODE=@GPUS@
RAY_PORT="${ORCHESTRATOR_RAY_PORT:-6379}"
RAY_TMPDIR="${ORCHESTRATOR_RAY_TMPDIR:-/tmp/ray-${SLURM_JOB_ID:-$$}}"
NUM_CPUS="${SLURM_CPUS_ON_NODE:-@CPUS@}"
read -r -a EXTRA_ARGS <<< "${ORCHESTRATOR_RAY_START_ARGS:-}"

# Token authentication, so that other users on the cluster network cannot use this job's Ray: your
# token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) when you have one, else a new one
# for this job only. Every `ray` command and srun step below inherits the mode and the token.
if [ "${RAY_AUTH_MODE:-}" != disabled ]; then
    export RAY_AUTH_MODE=token
    if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
        RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
        export RAY_AUTH_TOKEN
    fi
fi

if command -v scontrol >/dev/null 2>&1; then
    mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else
    case "$SLURM_JOB_NODELIST" in
        *"["*) echo "orchestrator: scontrol is needed to expand the node list $SLURM_JOB_NODELIST" >&2; exit 1 ;;
    esac
    IFS=, read -r -a NODES <<< "$SLURM_JOB_NODELIST"
fi
NUM_NODES=${#NODES[@]}
HEAD_NODE=${NODES[0]:-}
if [ -z "$HEAD_NODE" ]; then
    echo "orchestrator: no node in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2; exit 1
fi
if [ "$NUM_NODES" -gt 1 ] && ! command -v srun >/dev/null 2>&1; then
    echo "orchestrator: srun is needed to start Ray on $NUM_NODES nodes" >&2; exit 1
fi

HEAD_IP="${ORCHESTRATOR_HEAD_IP:-}"
if [ -z "$HEAD_IP" ]; then
    HEAD_IP=$(getent ahostsv4 "$HEAD_NODE" 2>/dev/null | awk 'NR == 1 {print $1}') || HEAD_IP=
fi
if [ -z "$HEAD_IP" ]; then
    HEAD_IP=$(hostname --ip-address | awk '{print $1}')
fi
if [ "$NUM_NODES" -gt 1 ]; then
    case "$HEAD_IP" in
        127.*|::1) echo "orchestrator: $HEAD_NODE resolves to the loopback address $HEAD_IP, which the other" \
                        "nodes cannot reach; set ORCHESTRATOR_HEAD_IP" >&2; exit 1 ;;
    esac
    case "${MLFLOW_TRACKING_URI:-}" in
        "") echo "orchestrator: MLFLOW_TRACKING_URI is not set: with several nodes, export the URI of an MLflow" \
                 "server every node reaches before sbatch" >&2; exit 2 ;;
        *://127.*|*://localhost*|*://*@127.*|*://*@localhost*|*://\[::1\]*)
            echo "orchestrator: MLFLOW_TRACKING_URI is a loopback address, which the other nodes cannot reach" >&2
            exit 2 ;;
    esac
fi
RAY_HEAD="$HEAD_IP:$RAY_PORT"

RAY_PIDS=()
stop_ray() {
    local status=$?
    trap - EXIT INT TERM
    if [ "${#RAY_PIDS[@]}" -gt 0 ]; then
        echo "orchestrator: stopping the Ray processes this job started"
        kill -TERM "${RAY_PIDS[@]}" 2>/dev/null || true
        local waited=0 pid alive
        while [ "$waited" -lt 60 ]; do
            alive=0
            for pid in "${RAY_PIDS[@]}"; do
                if kill -0 "$pid" 2>/dev/null; then alive=1; fi
            done
            if [ "$alive" -eq 0 ]; then break; fi
            sleep 1
            waited=$((waited + 1))
        done
        kill -KILL "${RAY_PIDS[@]}" 2>/dev/null || true
        wait 2>/dev/null || true
    fi
    exit "$status"
}
trap stop_ray EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

HEAD_ARGS=(--head --node-ip-address="$HEAD_IP" --port="$RAY_PORT" --num-cpus="$NUM_CPUS"
           --num-gpus="$GPUS_PER_NODE" --temp-dir="$RAY_TMPDIR")
if [ -n "${ORCHESTRATOR_DASHBOARD_PORT:-}" ]; then
    HEAD_ARGS+=(--include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$ORCHESTRATOR_DASHBOARD_PORT")
else
    HEAD_ARGS+=(--include-dashboard=false)
fi
echo "orchestrator: starting the Ray head on $HEAD_NODE ($RAY_HEAD), $NUM_NODES node(s)"
if [ "$NUM_NODES" -gt 1 ]; then
    srun --nodes=1 --ntasks=1 --cpus-per-task="$NUM_CPUS" -w "$HEAD_NODE" \
        ray start "${HEAD_ARGS[@]}" "${EXTRA_ARGS[@]}" --block &
else
    ray start "${HEAD_ARGS[@]}" "${EXTRA_ARGS[@]}" --block &
fi
RAY_PIDS+=("$!")

deadline=$((SECONDS + ${ORCHESTRATOR_RAY_TIMEOUT:-300}))
until ray status --address="$RAY_HEAD" >/dev/null 2>&1; do
    if ! kill -0 "${RAY_PIDS[0]}" 2>/dev/null; then
        echo "orchestrator: the Ray head exited; its logs are in $RAY_TMPDIR/session_latest/logs on $HEAD_NODE" >&2
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "orchestrator: the Ray head at $RAY_HEAD did not answer in time" >&2; exit 1
    fi
    sleep 2
done

for node in "${NODES[@]:1}"; do
    echo "orchestrator: starting a Ray worker on $node"
    srun --nodes=1 --ntasks=1 --cpus-per-task="$NUM_CPUS" -w "$node" \
        ray start --address="$RAY_HEAD" --num-cpus="$NUM_CPUS" --num-gpus="$GPUS_PER_NODE" \
        --temp-dir="$RAY_TMPDIR" "${EXTRA_ARGS[@]}" --block &
    RAY_PIDS+=("$!")
done
if [ "$NUM_NODES" -gt 1 ]; then
    deadline=$((SECONDS + ${ORCHESTRATOR_RAY_TIMEOUT:-300}))
    until [ "$(ray status --address="$RAY_HEAD" 2>/dev/null | grep -cE '^ *[0-9]+ node_' || true)" -ge "$NUM_NODES" ]; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "orchestrator: not every node joined in time; running the sweep on those that did" >&2; break
        fi
        sleep 5
    done
fi

echo "orchestrator: running the sweep on the Ray cluster at $RAY_HEAD"
set +e
python -m orchestrator sweep "$SWEEP_FILE" @OVERRIDES@--address "$RAY_HEAD"
status=$?
set -e
exit "$status"
"""


def slurm_script(sweep: Sweep, file: str, overrides: list[str], options: dict, workdir: str,
                 script_name: str, bindir: Optional[str] = None) -> str:
    """The batch script: every value from the user is shell-quoted (and #SBATCH values validated)."""
    workdir = os.path.realpath(workdir)
    relative = os.path.relpath(os.path.realpath(file), workdir)
    sweep_file = relative if relative.split(os.sep)[0] != os.pardir else os.path.realpath(file)
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
    bindir = bindir if bindir is not None else os.path.dirname(sys.executable)
    values = {
        "@SBATCH@": "\n".join(lines),
        "@NAME@": sweep.name,
        "@DIGEST@": sweep.digest(),
        "@SCRIPT@": shlex.quote(script_name),
        "@WORKDIR@": shlex.quote(workdir),
        "@BINDIR@": shlex.quote(bindir),
        "@FILE@": shlex.quote(sweep_file),
        "@GPUS@": str(options["gpus_per_node"]),
        "@CPUS@": str(options["cpus_per_node"] or "$(nproc)"),
        "@OVERRIDES@": "".join(shlex.quote(item) + " " for item in overrides),
    }
    # one pass, so that a value containing a token is never substituted again
    return re.sub(r"@[A-Z]+@", lambda match: values.get(match.group(0), match.group(0)), _SCRIPT)


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
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    note = None
    if not uri:
        note = ("MLFLOW_TRACKING_URI is not set: on one node the sweep starts its own MLflow server in this "
                "directory; with several nodes the script stops. Export the URI of an MLflow server the compute "
                "nodes reach before sbatch")
    elif is_loopback(urlsplit(uri).hostname if "://" in uri else None):
        note = (f"MLFLOW_TRACKING_URI ({redact(uri)}) is a loopback address: the compute nodes reach it only if "
                f"the job runs on this machine")
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
