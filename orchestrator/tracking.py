"""MLflow: a local tracking server on loopback when none is configured, and run bookkeeping.

Concurrent trials always log through a tracking server, never by writing one SQLite file from
several processes. Credentials (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN) reach workers
through the environment only; they are never params, tags or artifacts.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator, Optional

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
)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalServer:
    """``mlflow server`` on 127.0.0.1 with ``mlflow.db`` and ``mlartifacts/`` in ``directory``:
    the defaults of ``mlflow ui``, so ``mlflow ui`` run there later shows the same runs."""

    def __init__(self, directory: str, port: Optional[int] = None, log_path: Optional[str] = None):
        self.directory = os.path.abspath(directory)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 120.0) -> "LocalServer":
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
        self.process = subprocess.Popen(
            command, cwd=self.directory, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with status {self.process.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.uri} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()


ACTIVE_SERVERS: list[LocalServer] = []  # the local servers tracking_server has running (stopped on a hard exit)


@contextmanager
def tracking_server(directory: str, log_path: Optional[str] = None) -> Iterator[str]:
    """Yield a tracking URI: $MLFLOW_TRACKING_URI when set, else a local server's for the duration."""
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        yield configured
        return
    server = LocalServer(directory, log_path=log_path).start()
    ACTIVE_SERVERS.append(server)
    try:
        yield server.uri
    finally:
        ACTIVE_SERVERS.remove(server)
        server.stop()


def worker_env(tracking_uri: str) -> dict[str, str]:
    """The environment variables a trial worker needs (passed through Ray's runtime_env)."""
    env = {k: os.environ[k] for k in TRACKING_ENV if k in os.environ}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def end_unfinished_runs(client: MlflowClient, experiment_id: str, parent_run_id: str, status: str) -> list[str]:
    """Mark every child run of the parent that is still RUNNING with ``status``; returns their ids."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    )
    for run in runs:
        client.set_terminated(run.info.run_id, status=status)
    return [run.info.run_id for run in runs]

