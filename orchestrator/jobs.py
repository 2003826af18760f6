"""Submit a sweep as a Ray Job, and read a job's status and logs.

    orchestrator submit FILE [key=value ...] [--address URL] [--tracking-uri URI] [--resubmit] [--dry-run]
    orchestrator status JOB [--address URL]
    orchestrator logs JOB [--address URL] [--follow]

The job runs ``python -m orchestrator sweep FILE [key=value ...] --address auto`` on the
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
"""
from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from diffusion.errors import ConfigError

from .submit import (EXIT_OK, JOB_EXCLUDES, SubmitError, check_tracking_uri, default_address, entrypoint,
                     project_file, redact, submission_id)
from .sweepfile import Sweep, load_sweep
from .tracking import SECRET_ENV, TRACKING_ENV, check_tracking_uri_credentials

_ENDED = ("FAILED", "STOPPED", "SUCCEEDED")


# --------------------------------------------------------------------------------------------------
# the job's environment


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


# --------------------------------------------------------------------------------------------------
# the job server


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


# --------------------------------------------------------------------------------------------------
# submit


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
        _print_plan(sweep, address, base_id, entrypoint(relative, overrides), runtime_env, uri, out)
        return EXIT_OK

    client = client or connect(address)
    try:
        previous = attempts(client, base_id)
    except Exception as error:  # noqa: BLE001
        raise SubmitError(f"cannot list the jobs at {redact(address)}: {_first_line(error)}") from None
    job_id, resume = base_id, False
    if previous:
        following = _next_attempt(previous, sweep, [file, *overrides], address, resubmit, [submitter_uri, uri], out)
        if following is None:
            return EXIT_OK
        number, resume = following
        job_id = f"{base_id}-{number}"

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


def _print_plan(sweep: Sweep, address: str, base_id: str, command: str, runtime_env: dict, uri: str,
                out: Callable[[str], None]) -> None:
    """What ``submit --dry-run`` prints: the job that would be submitted."""
    out(f"sweep {sweep.name}: {len(sweep.trials)} trial(s); would be submitted to {redact(address)} as Ray job "
        f"{base_id}")
    out(f"  entrypoint:  {command}")
    out(f"  working dir: {runtime_env['working_dir']} (without {', '.join(runtime_env['excludes'])})")
    out(f"  env vars:    {', '.join(sorted(runtime_env['env_vars']))} (values not shown)")
    out(f"  MLflow:      {redact(uri)}")
    out(_credentials_note())


def _next_attempt(previous: list, sweep: Sweep, arguments: list[str], address: str, resubmit: bool,
                  uris: list[Optional[str]], out: Callable[[str], None]) -> Optional[tuple[int, bool]]:
    """The sweep was submitted before (``previous``, from ``attempts``): with ``resubmit``, (the number of the
    new attempt, whether it continues the sweep's unfinished MLflow run), or ConfigError while the latest attempt
    has not ended; without, None once that is said."""
    number, latest, job = previous[-1]
    status = str(job.status)
    if not resubmit:
        out(f"sweep {sweep.name} was already submitted as Ray job {latest}: {status}"
            + (f" ({job.message})" if job.message else ""))
        out("not submitted again" + (f"; to run it again (continuing its unfinished MLflow run, if any): "
                                     f"orchestrator submit {shlex.join(arguments)} --resubmit"
                                     if status in ("FAILED", "STOPPED") else ""))
        out(_follow_hint(latest, address))
        return None
    if status not in _ENDED:
        raise ConfigError("--resubmit", latest, "a sweep whose latest job has ended (FAILED, STOPPED or SUCCEEDED)",
                          detail=f"job {latest} is {status}; stop it first with `ray job stop {latest}`")
    return number + 1, bool(_unfinished_run(sweep, uris))


def _credentials_note() -> str:
    unsent = unsent_credentials()
    if not unsent:
        return "  credentials: none set here; the job uses the cluster's own (docs/SECURITY.md)"
    return (f"  credentials: not sent ({', '.join(unsent)}): Ray logs a job's environment; the job uses the "
            f"cluster's own (docs/SECURITY.md)")


def _follow_hint(job_id: str, address: str) -> str:
    flag = "" if address == default_address() else f" --address {shlex.quote(redact(address))}"
    return (f"follow it with: orchestrator status {job_id}{flag}    or: orchestrator logs {job_id}{flag} --follow")


# --------------------------------------------------------------------------------------------------
# status and logs


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
