"""The team's tracking stack of docker-compose.yml, assembled from real parts on 127.0.0.1 without Docker, and a
sweep run through it.

- PostgreSQL (Debian's server, tests/postgres.py) as the compose file's ``postgres`` service: its user, password
  and database from the service's environment; MLflow's runs and its basic-auth users both in that database.
- The S3 server of tests/conftest.py (moto) as MinIO: the bucket minio-init would create.
- The compose file's ``mlflow`` service (tests/composefile.py): its own command line, environment and
  basic_auth.ini, interpolated from a .env made of .env.example with fresh secrets; only the service host names
  (postgres:5432, minio:9000) point at the local servers instead. ``--app-name basic-auth``, the admin from
  MLFLOW_AUTH_ADMIN_*, the Flask secret key, PGPASSWORD, artifacts proxied (``--serve-artifacts``).
- A researcher's account made by the admin as docs/CLUSTER.md says; the sweep runs with it in
  MLFLOW_TRACKING_USERNAME / _PASSWORD, with no S3 key (artifacts go through the server).

Checked: a wrong password stops the sweep before anything starts (exit status 2, one line naming the variable,
Ray not started, nothing created); the sweep's runs are in PostgreSQL and every artifact is an object of the
bucket; no secret is in any file (the sweep's directory, Ray's session logs, the servers' logs and data
directories), in any param or tag, in any artifact or in the sweep's output."""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
import urllib.request
import uuid
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import pytest
from mlflow.tracking import MlflowClient

from composefile import LOOPBACK, dot_env, environment, interpolate, load_compose, mlflow_service, stop
from diffusion.errors import ConfigError
from leaks import files_holding
from orchestrator.tracking import check_tracking_access, free_port
from postgres import Cluster
from smallsweep import small_sweep

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = "stack"
STEPS = 10
RESEARCHER = "researcher"


def relocate(address: str, service: str, port: int) -> str:
    """A compose service's address (postgresql://mlflow@postgres:5432/mlflow, http://minio:9000) with the service's
    host and port replaced by LOOPBACK:``port``; scheme, user and path stay the compose file's."""
    parts = urlsplit(address)
    assert parts.hostname == service and parts.password is None, address
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{user}{LOOPBACK}:{port}"))


@contextmanager
def signed_in(username: str, password: str):
    """MLflow's credential variables set in this process for the duration (MlflowClient, the auth client)."""
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME=username, MLFLOW_TRACKING_PASSWORD=password)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def serve(command: list, env: dict, directory, uri: str) -> subprocess.Popen:
    """Start ``command`` in its own process group, logging to directory/server.log; wait for ``uri``/health."""
    log_path = os.path.join(str(directory), "server.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            pytest.fail(f"the MLflow server did not start ({' '.join(command)}):\n{open(log_path).read()[-4000:]}")
        try:
            urllib.request.urlopen(uri + "/health", timeout=2).close()
            return process
        except OSError:
            time.sleep(0.3)


@pytest.fixture(scope="module")
def stack(s3_server, tmp_path_factory):
    """The stack, up: (uri, the admin's and the researcher's credentials, the bucket and an S3 client, the
    PostgreSQL cluster, every secret by name, the directories of the servers)."""
    import boto3
    from mlflow.server import get_app_client

    compose = load_compose()
    directory = tmp_path_factory.mktemp("stack")
    bucket = f"stack-{uuid.uuid4().hex[:12]}"
    # One MLflow worker (the compose file's own knob); the rest of .env as an operator makes it.
    variables = dot_env(MLFLOW_ARTIFACTS_BUCKET=bucket, MLFLOW_WORKERS="1")
    database = {name: interpolate(value, variables)
                for name, value in environment(compose["services"]["postgres"]).items()}
    cluster = Cluster(database["POSTGRES_USER"], database["POSTGRES_PASSWORD"], database["POSTGRES_DB"])
    # minio-init: the bucket, and MLflow's own keys (the S3 server takes any key)
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id=variables["MLFLOW_S3_ACCESS_KEY"],
                      aws_secret_access_key=variables["MLFLOW_S3_SECRET_KEY"])
    s3.create_bucket(Bucket=bucket)
    s3_port = urlsplit(s3_server["AWS_ENDPOINT_URL"]).port
    process = None
    try:
        cluster.start()
        port = free_port()
        command, env = mlflow_service(
            compose, variables, directory, port,
            command_options={"--backend-store-uri": lambda uri: relocate(uri, "postgres", cluster.port)},
            auth_options={"database_uri": lambda uri: relocate(uri, "postgres", cluster.port)},
            env_options={"MLFLOW_S3_ENDPOINT_URL": lambda url: relocate(url, "minio", s3_port)})
        assert env["PGPASSWORD"] == cluster.password and "--serve-artifacts" in command
        uri = f"http://{LOOPBACK}:{port}"
        process = serve(command, env, directory, uri)
        admin = (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"])
        researcher = (RESEARCHER, f"researcher-{uuid.uuid4().hex}")
        with signed_in(*admin):  # as docs/CLUSTER.md: the admin makes an account per researcher
            get_app_client("basic-auth", tracking_uri=uri).create_user(username=researcher[0], password=researcher[1])
        secrets = {name: variables[name] for name in (
            "POSTGRES_PASSWORD", "MLFLOW_S3_ACCESS_KEY", "MLFLOW_S3_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY")}
        secrets["researcher's password"] = researcher[1]
        yield types.SimpleNamespace(uri=uri, admin=admin, researcher=researcher, bucket=bucket, s3=s3,
                                    cluster=cluster, secrets=secrets, directories=[str(directory), cluster.directory])
    finally:
        if process is not None:
            stop(process)
        cluster.stop()


def orchestrator(args, cwd, env_extra, **popen) -> subprocess.Popen:
    """``python -m orchestrator ARGS`` started with no MLflow, AWS or Ray-address variable of this process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "RAY_ADDRESS"))}
    env.update(env_extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env, text=True, **popen)


def objects(stack) -> dict:
    """Every object of the bucket: key -> size."""
    found = {}
    for page in stack.s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket):
        found.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    return found


def experiments(stack) -> set[str]:
    with signed_in(*stack.admin):
        return {e.name for e in MlflowClient(stack.uri).search_experiments()}


@pytest.fixture(scope="module")
def sweep(stack, tmp_path_factory):
    """The small sweep run through the stack as the researcher, with no S3 key; started as soon as the stack is
    up, in the background (the refusal test runs meanwhile): its directory, Ray's temporary directory, the
    directory of its output, and ``wait()``, which waits for it and returns (exit status, output)."""
    workdir = tmp_path_factory.mktemp("sweep")
    output = tmp_path_factory.mktemp("sweep-output")
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's sockets live there: a short path
    path = small_sweep(workdir / "stack.yaml", SWEEP, STEPS)
    with open(output / "output.txt", "w") as log:
        process = orchestrator(["sweep", path], workdir, {
            "MLFLOW_TRACKING_URI": stack.uri, "MLFLOW_TRACKING_USERNAME": stack.researcher[0],
            "MLFLOW_TRACKING_PASSWORD": stack.researcher[1], "RAY_TMPDIR": ray_tmp},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait() -> tuple[int, str]:
        process.wait(timeout=600)
        return process.returncode, (output / "output.txt").read_text()

    try:
        yield types.SimpleNamespace(workdir=workdir, ray_tmp=ray_tmp, output=output, wait=wait)
    finally:
        if process.poll() is None:
            stop(process)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_wrong_password_is_refused_before_anything_starts(stack, sweep, tmp_path, monkeypatch):
    """While a sweep runs against the server, another with a wrong password stops before Ray starts and before
    it creates anything."""
    name = "refused"
    path = small_sweep(tmp_path / "refused.yaml", name, STEPS)
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    wrong = f"wrong-{uuid.uuid4().hex}"
    process = orchestrator(["sweep", path], tmp_path, {
        "MLFLOW_TRACKING_URI": stack.uri, "MLFLOW_TRACKING_USERNAME": RESEARCHER, "MLFLOW_TRACKING_PASSWORD": wrong,
        "RAY_TMPDIR": str(ray_tmp)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orchestrator: error: MLFLOW_TRACKING_PASSWORD: "), stderr
    for fragment in (f"the password of the account {RESEARCHER!r}", stack.uri, "HTTP 401", "set the right password"):
        assert fragment in lines[0], lines[0]
    assert wrong not in stdout + stderr and stack.researcher[1] not in stdout + stderr
    assert {p.name for p in tmp_path.iterdir()} == {"refused.yaml", "ray"}  # no ray_results, no mlflow.db
    assert os.listdir(ray_tmp) == []  # Ray was not started
    # Nothing created on the server: no experiment (a sweep's first act); the bucket holds only the other
    # sweep's artifacts (test_a_sweep_through_the_stack).
    assert name not in experiments(stack)

    # No credentials at all, against the same server: the check the sweep's preflight makes names what to set.
    for variable in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials either
    with pytest.raises(ConfigError, match=r"^MLFLOW_TRACKING_USERNAME: invalid value \(not set\); accepted: an "
                                          r"account of the MLflow server at .*MLFLOW_TRACKING_PASSWORD"):
        check_tracking_access(stack.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", stack.researcher[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack.researcher[1])
    check_tracking_access(stack.uri)  # the right password passes


def artifact_files(client, run_id: str, path: str = "") -> dict:
    """Every artifact file of a run, recursively: path -> size."""
    files = {}
    for info in client.list_artifacts(run_id, path or None):
        if info.is_dir:
            files.update(artifact_files(client, run_id, info.path))
        else:
            files[info.path] = info.file_size
    return files


def test_a_sweep_through_the_stack(stack, sweep, monkeypatch):
    import psycopg2

    returncode, output = sweep.wait()
    assert returncode == 0, output[-5000:]

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", stack.researcher[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack.researcher[1])
    client = MlflowClient(stack.uri)
    experiment = client.get_experiment_by_name(SWEEP)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    stages = sorted(r.data.tags.get("stage", "parent") for r in runs)
    assert stages == ["evaluate", "parent", "train"], stages
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    train = next(r for r in runs if r.data.tags.get("stage") == "train")
    assert [m.step for m in client.get_metric_history(train.info.run_id, "train_loss")] == [STEPS]

    # The runs are PostgreSQL's (the backend store), the accounts too (the auth app's tables in the same database).
    cluster = stack.cluster
    with psycopg2.connect(host=LOOPBACK, port=cluster.port, user=cluster.user, password=cluster.password,
                          dbname=cluster.database) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT run_uuid FROM runs WHERE experiment_id = %s", (int(experiment.experiment_id),))
        assert {row[0] for row in cursor.fetchall()} == {r.info.run_id for r in runs}
        cursor.execute("SELECT username FROM users")
        assert {row[0] for row in cursor.fetchall()} == {stack.admin[0], RESEARCHER}
    connection.close()

    # Every artifact is an object of the bucket under the artifacts destination, of the same size; nothing else is.
    expected = {}
    files = {}
    for run in runs:
        scheme, _, location = run.info.artifact_uri.partition(":")
        assert scheme == "mlflow-artifacts", run.info.artifact_uri  # proxied: the client holds no S3 key
        files[run.data.tags.get("stage", "parent")] = artifact_files(client, run.info.run_id)
        for name, size in files[run.data.tags.get("stage", "parent")].items():
            expected[f"artifacts/{location.strip('/')}/{name}"] = size
    assert "ema.pt" in files["train"] and "config.yaml" in files["evaluate"] and "sweep.yaml" in files["parent"], files
    stored = objects(stack)
    assert stored == expected
    assert experiments(stack) == {"Default", SWEEP}  # and none of the refused sweep

    # No secret anywhere: params, tags, the artifacts' bytes, the sweep's output, and every file of the sweep's
    # directory, of Ray's session (its logs) and of the servers (their logs, PostgreSQL's data directory).
    secrets = stack.secrets
    for run in runs:
        recorded = " ".join([*run.data.params, *run.data.params.values(), *run.data.tags, *run.data.tags.values()])
        assert not [name for name, value in secrets.items() if value in recorded], run.info.run_id
    for key in stored:
        data = stack.s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read()
        assert not [name for name, value in secrets.items() if value.encode() in data], key
    assert not [name for name, value in secrets.items() if value in output]
    assert glob.glob(os.path.join(sweep.ray_tmp, "ray", "session_*", "logs", "*.log"))  # Ray's logs were searched
    assert files_holding([sweep.workdir, sweep.output, sweep.ray_tmp, *stack.directories], secrets) == []
