"""MLflow: a local tracking server on loopback when none is configured, and run bookkeeping.

Concurrent trials always log through a tracking server, never by writing one SQLite file from
several processes. Credentials (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN) reach workers
through the environment only; they are never params, tags or artifacts.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Optional

from diffusion.errors import ConfigError

if TYPE_CHECKING:  # MLflow's client is imported by the functions that use it: starting the server needs none
    from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"
# Environment variables a worker needs to reach the tracking server (secrets included: they are
# passed to workers' environments, never logged).
TRACKING_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    # the object store of an ``s3://`` or ``gs://`` storage URI (model cache, Tune state) and of artifacts
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "MLFLOW_S3_ENDPOINT_URL",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "ORCHESTRATOR_CACHE_STAGING",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT",  # set by preflight.quiet_env: no "View run ... at" lines from workers
    "MLFLOW_DISABLE_TELEMETRY",  # set by preflight.quiet_env: no usage reports, no environment churn
)
# The secrets among them: never sent with a Ray Job (``orchestrator submit``), whose runtime_env Ray logs.
SECRET_ENV = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
)


def check_tracking_uri_credentials(uri: Optional[str], key: str = "MLFLOW_TRACKING_URI") -> None:
    """ConfigError when a tracking URI carries credentials (user:password@host): the URI is printed, recorded
    in Tune's state and handed to every trial, while MLflow's credential variables are not."""
    from urllib.parse import urlsplit

    if not uri or "://" not in uri:
        return
    try:
        parts = urlsplit(uri)
        has_credentials = parts.username is not None or parts.password is not None
        shown = f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"
    except ValueError:
        return
    if has_credentials:
        raise ConfigError(key, shown.replace("://", "://...@", 1), "a URI without user:password@",
                          detail="credentials go in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                                 "MLFLOW_TRACKING_TOKEN), which are never recorded")


class _Shown:
    """A value an error message describes instead of showing (a credential)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def check_tracking_access(uri: Optional[str], key: str = "MLFLOW_TRACKING_URI") -> None:
    """With ``uri`` an http(s) tracking server: one read (the first experiment) made as every trial's client makes
    it, through MLflow's own request code (basic auth from MLFLOW_TRACKING_USERNAME and _PASSWORD or
    ~/.mlflow/credentials, else MLFLOW_TRACKING_TOKEN; MLflow's TLS variables). A server that does not answer,
    that asks for credentials none are given for, or that refuses the ones given (HTTP 401, 403) is a ConfigError
    naming what to set, raised before Ray starts and before anything is created; no credential is shown. Other
    answers are left to the sweep."""
    from urllib.parse import urlsplit

    try:
        scheme = urlsplit(uri or "").scheme
    except ValueError:
        return
    if scheme not in ("http", "https"):
        return
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    server = f"the MLflow server at {uri}"
    try:
        response = http_request(creds, "/api/2.0/mlflow/experiments/search", "GET", params={"max_results": 1},
                                max_retries=2, backoff_factor=1, timeout=30, raise_on_status=False)
    except MlflowException:
        raise ConfigError(key, uri, "the URI of a running MLflow tracking server",
                          detail="nothing answers there: start the server, or correct the URI") from None
    status = response.status_code
    if status == 401:
        username_from = "MLFLOW_TRACKING_USERNAME" if os.environ.get("MLFLOW_TRACKING_USERNAME") else \
            "the username of ~/.mlflow/credentials"
        password_from = "MLFLOW_TRACKING_PASSWORD" if os.environ.get("MLFLOW_TRACKING_PASSWORD") else \
            "the password of ~/.mlflow/credentials"
        if creds.username and creds.password:
            raise ConfigError(password_from, _Shown(f"(not shown; {username_from} is {creds.username!r})"),
                              f"the password of the account {creds.username!r} on {server}",
                              detail="the server refused this user name and password (HTTP 401): set the right "
                                     "password, or ask the server's admin for an account; nothing was started")
        if creds.token:  # sent when the user name or the password is missing
            raise ConfigError("MLFLOW_TRACKING_TOKEN", _Shown("(not shown)"), f"a token {server} accepts",
                              detail="the server refused this token (HTTP 401); nothing was started")
        missing = "MLFLOW_TRACKING_PASSWORD" if creds.username else "MLFLOW_TRACKING_USERNAME"
        raise ConfigError(missing, _Shown("(not set)"),
                          f"an account of {server}: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
                          detail="the server asks for credentials (HTTP 401): set both in the environment, never in "
                                 "the URI or a sweep file; nothing was started")
    if status == 403:
        answer = " ".join(response.text.split())[:200]
        raise ConfigError(key, uri, "a server that lets this account read experiments",
                          detail=f"{server} refused it (HTTP 403: {answer}); nothing was started")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


SERVER_STATE = "mlflow-server.json"  # the directory's server (pid, port, uri); its users hold a shared flock on it
SERVER_MUTEX = "mlflow-server.lock"  # an exclusive flock held while a user attaches, starts or stops the server
_CHILDREN: dict[int, subprocess.Popen] = {}  # the servers this process started (reaped when stopped here)


class LocalServer:
    """``mlflow server`` on 127.0.0.1 with ``mlflow.db`` and ``mlartifacts/`` in ``directory``:
    the defaults of ``mlflow ui``, so ``mlflow ui`` run there later shows the same runs.

    One server per directory, shared by every user (several sweeps started there at once: two servers
    migrating one new ``mlflow.db`` would fail). :meth:`start` attaches to the directory's live server or
    starts it; :meth:`stop` detaches and stops the server when no other user is attached. The bookkeeping
    is two files in the directory: ``mlflow-server.json`` (the server's pid, port and URI), on which every
    attached user holds a shared ``flock`` (released by the kernel when a user dies, however it dies), and
    ``mlflow-server.lock``, an exclusive ``flock`` held while attaching or detaching. A detaching user stops
    the server only if it then gets the exclusive lock on ``mlflow-server.json``: nobody else uses it.
    ``port`` is the port of a server this user starts; attached to a running one, ``port`` and ``uri`` are
    that server's."""

    def __init__(self, directory: str, port: Optional[int] = None, log_path: Optional[str] = None):
        self.directory = os.path.abspath(directory)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: Optional[subprocess.Popen] = None  # the server, when this user started it
        self.pid: Optional[int] = None
        self._user = None  # the open state file on which this user holds its shared lock, while attached
        self._guard = threading.Lock()  # start/stop from two threads (InterruptWatch's hard exit)

    @property
    def database(self) -> str:
        return os.path.join(self.directory, "mlflow.db")

    def start(self, timeout: float = 120.0) -> "LocalServer":
        """Attach to the directory's server, starting it when none runs; returns self."""
        with self._guard:
            if self._user is not None:
                return self
            os.makedirs(self.directory, exist_ok=True)
            with _flock(os.path.join(self.directory, SERVER_MUTEX), timeout + 60, "the MLflow server's lock"):
                user = open(os.path.join(self.directory, SERVER_STATE), "a+")
                try:
                    state = _read_state(user)
                    if not (_server_alive(state, self.database) and self._healthy(state, timeout)):
                        self._launch(timeout)
                        state = {"pid": self.pid, "port": self.port, "uri": self.uri, "database": self.database}
                        user.seek(0)
                        user.truncate()
                        user.write(json.dumps(state))
                        user.flush()
                    self.pid, self.port, self.uri = state["pid"], state["port"], state["uri"]
                    # never blocks: an exclusive lock on it is only taken under the mutex held here
                    fcntl.flock(user, fcntl.LOCK_SH)
                except BaseException:
                    user.close()
                    raise
                self._user = user
        return self

    def _healthy(self, state: dict, timeout: float) -> bool:
        """Whether the live server of ``state`` answers (it may be busy: wait up to ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _answers(state["uri"]):
                return True
            if not _server_alive(state, self.database):
                return False
            time.sleep(0.5)
        raise RuntimeError(f"the MLflow server of {self.directory} (pid {state['pid']}, {state['uri']}) runs but "
                           f"does not answer within {timeout:.0f} s; stop it, or remove {SERVER_STATE}")

    def _launch(self, timeout: float) -> None:
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", "sqlite:///" + os.path.join(self.directory, "mlflow.db"),
            "--artifacts-destination", os.path.join(self.directory, "mlartifacts"),
            "--workers", "1",
        ]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        # MLflow's server-side job runner (GenAI evaluation jobs, periodic tasks) starts several worker
        # processes that sweeps never use: on a 2-core machine they cost the trials CPU.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        self.uri = f"http://127.0.0.1:{self.port}"
        try:
            self.process = subprocess.Popen(
                command, cwd=self.directory, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # the server has its own copy
        self.pid = self.process.pid
        _CHILDREN[self.pid] = self.process
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with status {self.process.returncode}; see {self.log_path}")
            if _answers(self.uri):
                return
            time.sleep(0.1)  # the sweep waits for it: every tenth of a second counts
        _terminate(self.pid)
        raise RuntimeError(f"mlflow server did not answer on {self.uri} within {timeout:.0f} s")

    def stop(self, timeout: float = 60.0) -> None:
        """Detach; stop the server when no other user is attached. Idempotent. Gives up (the server keeps
        running) when another thread or process holds the bookkeeping locks for ``timeout`` seconds."""
        if not self._guard.acquire(timeout=timeout):
            return
        try:
            if self._user is None:
                return
            try:
                with _flock(os.path.join(self.directory, SERVER_MUTEX), timeout, "the MLflow server's lock"):
                    self._user.close()  # our shared lock goes
                    self._user = None
                    with open(os.path.join(self.directory, SERVER_STATE), "a+") as probe:
                        try:
                            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        except BlockingIOError:
                            return  # another user is attached: the server stays
                        state = _read_state(probe)
                        if _server_alive(state, self.database):
                            _terminate(state["pid"])
                        probe.seek(0)
                        probe.truncate()
            except TimeoutError as error:  # leave anyway; the server stays for whoever comes next
                print(f"warning: {error}: left the MLflow server of {self.directory} running", file=sys.stderr,
                      flush=True)
                if self._user is not None:
                    self._user.close()
                    self._user = None
        finally:
            self._guard.release()


def _answers(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _read_state(handle) -> dict:
    handle.seek(0)
    try:
        state = json.loads(handle.read() or "{}")
    except ValueError:  # damaged: as if no server were recorded
        return {}
    return state if isinstance(state, dict) else {}


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for its parent does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _server_alive(state: dict, database: str) -> bool:
    """Whether the server ``state`` records runs: its pid is alive and (where /proc tells) still serves
    ``database``, not a later process that got the same pid."""
    pid = state.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return str(state.get("database", database)).encode() in handle.read()
    except OSError:
        return True


def _terminate(pid: int) -> None:
    """Stop the server ``pid`` and its process group (SIGTERM, SIGKILL after 20 s); reaped when it is ours."""
    child = _CHILDREN.pop(pid, None)
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        if child is not None:
            try:
                child.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if not _alive(pid):
            return


@contextmanager
def _flock(path: str, timeout: float, what: str) -> Iterator[None]:
    """An exclusive flock on ``path`` (created when missing), waited for up to ``timeout`` seconds."""
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what} ({path}) was held by another process for {timeout:.0f} s") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


ACTIVE_SERVERS: list[LocalServer] = []  # the local servers tracking_server uses (left on a hard exit: LocalServer.stop)


@contextmanager
def tracking_server(directory: str, log_path: Optional[str] = None) -> Iterator[str]:
    """Yield a tracking URI: $MLFLOW_TRACKING_URI when set, else that of the directory's local server,
    shared with the other sweeps running there (:class:`LocalServer`) and used for the duration."""
    with starting_tracking_server(directory, log_path) as tracking:
        yield tracking.uri()


class StartingServer:
    """The tracking server of :func:`starting_tracking_server`: ``start()`` starts the directory's local server in a
    background thread (idempotent; nothing to start with $MLFLOW_TRACKING_URI), ``uri()`` waits for it (starting it
    first if nobody did) and returns the tracking URI, raising what the start raised."""

    def __init__(self, directory: str, log_path: Optional[str] = None):
        self.configured = os.environ.get("MLFLOW_TRACKING_URI")
        self.server = None if self.configured else LocalServer(directory, log_path=log_path)
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None

    def start(self) -> None:
        if self.server is None or self.thread is not None:
            return
        ACTIVE_SERVERS.append(self.server)  # from now on a hard exit (progress.InterruptWatch) leaves it too

        def run() -> None:
            try:
                self.server.start()
            except BaseException as error:  # noqa: BLE001 - raised in the caller's thread by uri()
                self.error = error

        self.thread = threading.Thread(target=run, name="mlflow-server-start", daemon=True)
        self.thread.start()

    def uri(self) -> str:
        if self.server is None:
            return self.configured
        self.start()
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.server.uri

    def close(self) -> None:
        """Wait for a start under way, then leave the server (stopped when no other sweep uses it)."""
        if self.thread is None:
            return
        self.thread.join()
        ACTIVE_SERVERS.remove(self.server)
        self.server.stop()


@contextmanager
def starting_tracking_server(directory: str, log_path: Optional[str] = None) -> Iterator[StartingServer]:
    """:func:`tracking_server` whose local server starts in the background when the body calls ``start()`` (the
    sweep's driver: once its checks passed, while Ray starts) and is waited for at ``uri()``; left at the end."""
    tracking = StartingServer(directory, log_path)
    try:
        yield tracking
    finally:
        tracking.close()


def worker_env() -> dict[str, str]:
    """The variables of ``TRACKING_ENV`` set here, for the workers of a cluster the driver joined (``--address``).

    They reach those workers through Ray's object store (``tune.with_parameters``), never through a
    ``runtime_env``, whose ``env_vars`` Ray writes in plain text to its session logs. Workers of a local Ray
    instance inherit the driver's environment and are given nothing. The tracking URI is not among them:
    every task carries it in its context."""
    return {k: os.environ[k] for k in TRACKING_ENV if k in os.environ and k != "MLFLOW_TRACKING_URI"}


def end_unfinished_runs(client: MlflowClient, experiment_id: str, parent_run_id: str, status: str) -> list[str]:
    """Mark every child run of the parent that is still RUNNING with ``status``; returns their ids."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    )
    for run in runs:
        client.set_terminated(run.info.run_id, status=status)
    return [run.info.run_id for run in runs]

