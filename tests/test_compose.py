"""The cluster deployment (docker-compose.yml, .env.example, docker/*.Dockerfile), checked without
Docker: its structure and hygiene from the parsed YAML, and the MLflow server command line it runs,
started here for real with SQLite and a local directory standing in for PostgreSQL and S3."""
import base64
import configparser
import json
import os
import re
import secrets
import shlex
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from importlib.util import find_spec

import pytest

from composefile import (LOOPBACK, PLACEHOLDER, REFERENCE, dot_env, environment, interpolate, load_compose,
                         mlflow_service, option, read_env_example, references, strings, stop)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SERVICES = {"secrets-check", "postgres", "minio", "minio-init", "mlflow", "ray-head", "ray-worker"}
ONE_SHOT = {"secrets-check", "minio-init"}
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|KEY|CREDENTIAL", re.IGNORECASE)
CHECK_SERVICE = "secrets-check"
CHECK_SCRIPT = os.path.join(ROOT, "docker", "check-secrets.sh")
MIN_SECRET_LENGTH = 16
# What the issue names: the Ray token, the database and object-store passwords, the Flask secret
# key and the MLflow admin password.
REQUIRED_SECRETS = {"RAY_AUTH_TOKEN", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_S3_SECRET_KEY",
                    "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def test_services(services):
    assert SERVICES <= set(services), f"missing services: {SERVICES - set(services)}"


def _pinned(reference: str) -> bool:
    if "${" in reference or reference.startswith("$"):
        return False
    if "@sha256:" in reference:
        return True
    name, _, tag = reference.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def _dockerfile(service: dict) -> str:
    build = service["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    return os.path.join(ROOT, context, dockerfile)


def test_images_pinned(services):
    for name, service in services.items():
        if "image" in service:
            assert _pinned(service["image"]), f"{name}: image {service['image']!r} is not pinned"
        if "build" not in service:
            assert "image" in service, f"{name}: neither image nor build"
            continue
        path = _dockerfile(service)
        assert os.path.isfile(path), f"{name}: {path} missing"
        with open(path) as f:
            text = f.read()
        bases = re.findall(r"^\s*FROM\s+(?:--\S+\s+)*(\S+)", text, re.MULTILINE | re.IGNORECASE)
        assert bases, f"{path}: no FROM"
        for base in bases:
            assert _pinned(base), f"{path}: base image {base!r} is not pinned"
        # Every package that pip installs is pinned too (the project itself excepted).
        for command in re.findall(r"pip install((?:[^\n]*\\\n)*[^\n]*)", text):
            for word in command.replace("\\\n", " ").split():
                word = word.strip("\"'")
                if word.startswith("-") or word in (".", "&&") or word.startswith(("/", "./")):
                    continue
                assert "==" in word, f"{path}: pip install {word!r} is not pinned"


def _published(port) -> tuple[str, str]:
    """(the raw host part, the host address once interpolated with no .env)."""
    if isinstance(port, dict):
        raw = str(port.get("host_ip", ""))
        return raw, interpolate(raw, {})
    # HOST:PUBLISHED:TARGET; the host part may hold a ${VAR:-default} (with a colon of its own).
    parts = str(port).rsplit(":", 2)
    if len(parts) < 3:
        return "", ""
    return parts[0], interpolate(parts[0], {})


def test_ports_bind_loopback_by_default(services):
    seen = 0
    for name, service in services.items():
        for port in service.get("ports", []):
            raw, host = _published(port)
            assert host == LOOPBACK, f"{name}: port {port!r} is published on {host or 'every interface'!r}"
            assert raw in ("${BIND_ADDRESS:-127.0.0.1}", LOOPBACK), f"{name}: port {port!r}"
            seen += 1
    assert seen, "nothing is published"
    values, _ = read_env_example()
    assert values["BIND_ADDRESS"] == LOOPBACK


def test_published_ports(services):
    def ports(name):
        return {interpolate(str(p), {}).rsplit(":", 1)[-1] for p in services[name].get("ports", [])}
    assert ports("mlflow") == {"5000"}
    assert ports("ray-head") == {"8265", "6379", "10001"}
    for name in ("postgres", "minio", "minio-init", "ray-worker"):
        assert not services[name].get("ports"), f"{name} publishes a port"


def test_no_literal_secret(compose, services):
    for name, service in services.items():
        for key, value in environment(service).items():
            if not SECRET_NAME.search(key):
                continue
            assert value is not None and re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]*\}", value), (
                f"{name}: {key} must be a required ${{VAR:?message}} reference, not {value!r}")
    for text in strings(compose):
        # No credentials inside a URI (scheme://user:password@host), whatever the variables hold.
        bare = REFERENCE.sub("VAR", text)
        assert not re.search(r"://[^/@\s]*:[^/@\s]*@", bare), f"a URI carries a password: {text!r}"
        for option in ("--password", "--token", "--secret"):
            assert option not in text, f"a secret on a command line: {text!r}"


def test_env_example_lists_every_variable(compose):
    used, bare = set(), []
    for text in strings(compose):
        for match in references(text):
            if match["bare"]:
                bare.append(text)
            else:
                used.add(match["name"])
                assert "${" not in (match["arg"] or ""), f"nested interpolation in {text!r}"
    assert not bare, f"use ${{VAR}}, not $VAR (or $$ for the container's shell): {bare}"
    values, comments = read_env_example()
    assert used - set(values) == set(), f"not in .env.example: {sorted(used - set(values))}"
    assert set(values) - used == set(), f"in .env.example but unused: {sorted(set(values) - used)}"
    for name in values:
        assert comments[name], f".env.example: {name} has no comment"


def test_env_example_holds_no_secret():
    values, _ = read_env_example()
    secret_names = [name for name in values if SECRET_NAME.search(name)]
    assert "RAY_AUTH_TOKEN" in secret_names and "MLFLOW_AUTH_ADMIN_PASSWORD" in secret_names
    for name in secret_names:
        assert values[name] == PLACEHOLDER, f".env.example: {name} must be the placeholder {PLACEHOLDER}"


def test_env_file_is_git_ignored():
    """.env holds the real secrets: git (and `ray job submit --working-dir .`, which honours
    .gitignore) must leave it out, and must keep .env.example."""
    def ignored(path):
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0
    assert ignored(".env"), "add the line `.env` to .gitignore"
    assert not ignored(".env.example")


def test_healthchecks(services):
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", f"{name} is a one-shot service"
            continue
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        test = check["test"]
        assert test and test != ["NONE"], f"{name}: empty healthcheck"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])


def test_start_order(services):
    allowed = {"service_healthy", "service_completed_successfully"}
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for target, spec in depends.items():
            condition = (spec or {}).get("condition")
            assert condition in allowed, f"{name} -> {target}: condition {condition!r}"
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target}, which has no healthcheck"
            else:
                assert target in ONE_SHOT
    order = {"minio-init": "minio", "mlflow": "postgres", "ray-head": "mlflow", "ray-worker": "ray-head"}
    for name, target in order.items():
        assert target in services[name]["depends_on"], f"{name} does not wait for {target}"
    assert services["mlflow"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


# ---------------------------------------------------------------------------------------------
# secrets-check: the one-shot service every other service waits for, and its script, run here
# with sh as the service runs it.

def _check_arguments(services) -> tuple[list[str], list[str]]:
    """(the secrets, the user names) the secrets-check service's command checks."""
    command = [str(word) for word in services[CHECK_SERVICE]["command"]]
    if "--names" in command:
        i = command.index("--names")
        return command[:i], command[i + 1:]
    return command, []


def _marked_secret() -> set[str]:
    """The variables of .env.example whose comment says "Secret."."""
    _, comments = read_env_example()
    return {name for name, block in comments.items() if block and block[0].startswith("# Secret.")}


def run_check(arguments: list[str], variables: dict) -> subprocess.CompletedProcess:
    """docker/check-secrets.sh run with sh, in an environment of ``variables`` alone (and PATH)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **variables}
    return subprocess.run(["sh", CHECK_SCRIPT, *arguments], env=env, capture_output=True, text=True,
                          timeout=30)


@pytest.fixture(scope="module")
def check_arguments(services) -> list[str]:
    return [str(word) for word in services[CHECK_SERVICE]["command"]]


@pytest.fixture
def good_values(services) -> dict:
    """Every checked variable with an acceptable value (distinct and random, so a leak is seen)."""
    secret_names, user_names = _check_arguments(services)
    values = {name: secrets.token_hex(16) for name in secret_names}
    values.update({name: f"user-{i}-{secrets.token_hex(4)}" for i, name in enumerate(user_names)})
    return values


def _complaints(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def _named(output: str, name: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9_])", output) is not None


def _assert_no_value(output: str, variables: dict):
    for name, value in variables.items():
        assert not value or value not in output, f"the value of {name} is printed: {output!r}"


def test_secrets_check_checks_every_secret(services):
    secret_names, user_names = _check_arguments(services)
    marked = _marked_secret()
    assert REQUIRED_SECRETS <= marked, f".env.example: not marked Secret.: {REQUIRED_SECRETS - marked}"
    assert set(secret_names) == marked, "secrets-check must check exactly the variables marked Secret."
    assert len(secret_names) == len(set(secret_names))
    # Every other variable that .env.example leaves as the placeholder (the user names) is checked
    # for the placeholder.
    values, _ = read_env_example()
    placeholders = {name for name, value in values.items() if value == PLACEHOLDER}
    assert placeholders >= marked
    assert set(user_names) == placeholders - marked
    assert {"MINIO_ROOT_USER", "MLFLOW_S3_ACCESS_KEY"} <= set(user_names)


def test_secrets_check_service(compose, services):
    service = services[CHECK_SERVICE]
    secret_names, user_names = _check_arguments(services)
    env = environment(service)
    # Exactly the variables it checks, each straight from .env through ${VAR:?...}.
    assert set(env) == set(secret_names) | set(user_names)
    for name, value in env.items():
        assert value is not None and re.fullmatch(rf"\$\{{{name}:\?[^}}]*\}}", value), f"{name}: {value!r}"
    # The script of the repository, run by sh from where the config puts it.
    (config,) = service["configs"]
    assert compose["configs"][config["source"]]["file"] == "./docker/check-secrets.sh"
    assert os.path.isfile(CHECK_SCRIPT)
    assert service["entrypoint"] == ["/bin/sh", config["target"]]
    # No extra image to pull, no network, no port, and it runs once.
    others = {services[name].get("image") for name in services if name != CHECK_SERVICE}
    assert service["image"] in others, f"{service['image']} is pulled for secrets-check alone"
    assert service.get("network_mode") == "none" and "networks" not in service
    assert not service.get("ports")
    assert service.get("restart") == "no"
    assert not service.get("depends_on")


def test_services_wait_for_secrets_check(services):
    secret_names, user_names = _check_arguments(services)
    checked = set(secret_names) | set(user_names)
    waiting = set()
    for name, service in services.items():
        if name == CHECK_SERVICE:
            continue
        used = {m["name"] or m["bare"] for text in strings(service) for m in references(text)}
        if not used & checked:
            continue
        depends = service.get("depends_on") or {}
        assert CHECK_SERVICE in depends, f"{name} uses {sorted(used & checked)} but does not wait for {CHECK_SERVICE}"
        assert depends[CHECK_SERVICE]["condition"] == "service_completed_successfully", name
        waiting.add(name)
    assert waiting == SERVICES - {CHECK_SERVICE}


def test_secrets_check_accepts_good_values(check_arguments, good_values):
    result = run_check(check_arguments, good_values)
    assert result.returncode == 0, _complaints(result)
    _assert_no_value(_complaints(result), good_values)
    assert result.stderr == ""


def test_secrets_check_refuses_env_example(check_arguments, services):
    """`cp .env.example .env` and nothing else: every checked variable is named, no value printed."""
    values, _ = read_env_example()
    result = run_check(check_arguments, values)
    assert result.returncode != 0
    secret_names, user_names = _check_arguments(services)
    output = _complaints(result)
    for name in secret_names + user_names:
        assert _named(output, name), f"{name} is not named: {output!r}"
    assert PLACEHOLDER not in output


@pytest.mark.parametrize("variant", ["exact", "inside"])
def test_secrets_check_refuses_placeholder(check_arguments, good_values, variant):
    for name in good_values:
        variables = dict(good_values)
        variables[name] = PLACEHOLDER if variant == "exact" else f"{secrets.token_hex(8)}{PLACEHOLDER}"
        result = run_check(check_arguments, variables)
        output = _complaints(result)
        assert result.returncode != 0, f"{name}={variables[name]} accepted"
        named = [other for other in good_values if _named(output, other)]
        assert named == [name], f"{name}: {output!r}"
        _assert_no_value(output, variables)
        assert PLACEHOLDER not in output


def test_secrets_check_length(check_arguments, good_values, services):
    secret_names, user_names = _check_arguments(services)
    for name in secret_names:
        for length, accepted in ((MIN_SECRET_LENGTH - 1, False), (MIN_SECRET_LENGTH, True)):
            variables = dict(good_values)
            variables[name] = secrets.token_hex(MIN_SECRET_LENGTH)[:length]
            result = run_check(check_arguments, variables)
            output = _complaints(result)
            assert (result.returncode == 0) == accepted, f"{name} of {length} characters: {output!r}"
            assert _named(output, name) != accepted, f"{name} of {length} characters: {output!r}"
            _assert_no_value(output, variables)
    # A user name is no secret: a short one passes (MinIO has its own rule, 3 characters).
    for name in user_names:
        result = run_check(check_arguments, {**good_values, name: "abc"})
        assert result.returncode == 0, _complaints(result)


@pytest.mark.parametrize("how", ["unset", "empty"])
def test_secrets_check_refuses_missing(check_arguments, good_values, how):
    for name in good_values:
        variables = dict(good_values)
        if how == "unset":
            del variables[name]
        else:
            variables[name] = ""
        result = run_check(check_arguments, variables)
        output = _complaints(result)
        assert result.returncode != 0, f"{name} {how} accepted"
        assert [other for other in good_values if _named(output, other)] == [name], output
        _assert_no_value(output, variables)


def test_secrets_check_reports_every_bad_variable(check_arguments, good_values, services):
    secret_names, _ = _check_arguments(services)
    variables = dict(good_values)
    variables[secret_names[0]] = PLACEHOLDER
    variables[secret_names[1]] = "x" * (MIN_SECRET_LENGTH - 1)
    del variables[secret_names[2]]
    result = run_check(check_arguments, variables)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if any(_named(line, n) for n in good_values)]
    assert [[n for n in good_values if _named(line, n)] for line in lines] == [[n] for n in secret_names[:3]]
    _assert_no_value(_complaints(result), variables)


def test_secrets_check_values_are_data(check_arguments, good_values, tmp_path):
    """Values with quotes, $(...), backquotes, spaces and newlines are measured, not run."""
    marker = tmp_path / "ran"
    variables = dict(good_values)
    hostile = [f"$(touch {marker})-{secrets.token_hex(8)}", f"`touch {marker}`;'\"{secrets.token_hex(8)}",
               f"a b\nc\t{secrets.token_hex(8)} ${{HOME}} *"]
    for name, value in zip(variables, hostile):
        variables[name] = value
    result = run_check(check_arguments, variables)
    assert result.returncode == 0, _complaints(result)
    assert not marker.exists()
    _assert_no_value(_complaints(result), variables)


def test_secrets_check_refuses_bad_arguments(good_values):
    result = run_check([], good_values)
    assert result.returncode != 0
    result = run_check(["RAY_AUTH_TOKEN;exit 0"], good_values)
    assert result.returncode != 0 and "not a variable name" in result.stderr


def test_gpu_worker(services):
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert "deploy" not in services["ray-head"]


def _mounts(service: dict) -> dict:
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts[volume["source"]] = volume["target"]
        else:
            source, target = volume.split(":")[:2]
            mounts[source] = target
    return mounts


def test_shared_volume(compose, services):
    head, worker = _mounts(services["ray-head"]), _mounts(services["ray-worker"])
    assert "shared" in compose["volumes"]
    assert head.get("shared") == worker.get("shared") == "/shared"
    for name in ("ray-head", "ray-worker"):
        assert "/shared/ray_results" in " ".join(services[name]["command"])


def test_ray_token_auth(services):
    # The installed Ray reads its auth mode from RAY_AUTH_MODE ("token" enables it) and the token
    # from RAY_AUTH_TOKEN (or a file at RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token).
    ray_dir = os.path.dirname(find_spec("ray").origin)
    with open(os.path.join(ray_dir, "_private", "authentication", "authentication_token_setup.py")) as f:
        assert 'AUTH_MODE_ENV_VAR = "RAY_AUTH_MODE"' in f.read()
    with open(os.path.join(ray_dir, "exceptions.py")) as f:
        assert "`RAY_AUTH_TOKEN` environment variable" in f.read()
    for name in ("ray-head", "ray-worker"):
        env = environment(services[name])
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")


def test_ray_head_command(services):
    command = " ".join(services["ray-head"]["command"])
    for option in ("--head", "--block", "--port=6379", "--dashboard-host=0.0.0.0", "--dashboard-port=8265",
                   "--ray-client-server-port=10001"):
        assert option in command
    worker = " ".join(services["ray-worker"]["command"])
    assert "--address=ray-head:6379" in worker and "--block" in worker
    # Every option exists in the installed `ray start`.
    from ray.scripts.scripts import start
    known = {opt for param in start.params for opt in param.opts + param.secondary_opts}
    for text in (command, worker):
        words = shlex.split(interpolate(text.split("ray start", 1)[1], {}))
        flags = {word.split("=")[0] for word in words if word.startswith("--")}
        assert flags <= known, f"unknown ray start options: {flags - known}"




def test_mlflow_command(services):
    service = services["mlflow"]
    command = [str(word) for word in service["command"]]
    assert command[:2] == ["mlflow", "server"]
    assert option(command, "--app-name") == "basic-auth"
    assert "--serve-artifacts" in command
    assert option(command, "--artifacts-destination").startswith("s3://${MLFLOW_ARTIFACTS_BUCKET")
    values, _ = read_env_example()
    backend = interpolate(option(command, "--backend-store-uri"), values)
    # the driver the image installs, named: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3
    assert backend.startswith("postgresql+psycopg2://") and ":" not in backend.split("://", 1)[1].split("@")[0]
    with open(os.path.join(ROOT, "docker", "mlflow.Dockerfile")) as f:
        assert '"psycopg2-binary==' in f.read()
    hosts = interpolate(option(command, "--allowed-hosts"), values).split(",")
    assert "*" not in hosts and "mlflow:5000" in hosts, "workers reach MLflow as mlflow:5000"
    env = environment(service)
    assert env["MLFLOW_AUTH_CONFIG_PATH"] in [c["target"] for c in service["configs"]]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # Every option exists in the installed mlflow server command.
    from mlflow.cli import server
    known = {opt for param in server.params for opt in param.opts + param.secondary_opts}
    flags = {word.split("=")[0] for word in command[2:] if word.startswith("--")}
    assert flags <= known, f"unknown mlflow server options: {flags - known}"


def test_mlflow_auth_config(compose):
    parser = configparser.ConfigParser()
    parser.read_string(interpolate(compose["configs"]["mlflow_auth"]["content"], {}))
    section = parser["mlflow"]
    assert section["default_permission"] == "READ"
    assert section["database_uri"].startswith("postgresql+psycopg2://") and "@" in section["database_uri"]
    assert ":" not in section["database_uri"].split("://", 1)[1].split("@")[0], "a password in the auth ini"
    assert "admin_password" not in section


# ---------------------------------------------------------------------------------------------
# The MLflow server of the compose file, started for real.

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _request(url: str, auth=None, host=None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    if host:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@contextmanager
def mlflow_server(compose, tmp_path):
    """The compose file's MLflow command line and environment, with SQLite for PostgreSQL, a local
    directory for S3, 127.0.0.1 on a free port and one worker; yields (uri, admin credentials).
    The server runs in its own process group, killed on the way out."""
    port = _free_port()
    command, env = mlflow_service(
        compose, dot_env(), tmp_path, port,
        command_options={"--workers": "1", "--backend-store-uri": "sqlite:///" + str(tmp_path / "mlflow.db"),
                         "--artifacts-destination": str(tmp_path / "artifacts")},
        auth_options={"database_uri": "sqlite:///" + str(tmp_path / "basic_auth.db")})
    admin = (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"])

    log_path = tmp_path / "server.log"
    uri = f"http://{LOOPBACK}:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                text = log_path.read_text(errors="replace")
                hint = ""
                if "flask_wtf" in text.lower() or "Flask-WTF" in text:
                    hint = ("\nMLflow's basic-auth app needs Flask-WTF, which is not installed here: "
                            "install mlflow[auth] (Flask-WTF<2).")
                pytest.fail(f"mlflow server exited with status {process.returncode}{hint}\n"
                            f"command: {' '.join(command)}\n--- log (end) ---\n{text[-4000:]}")
            try:
                if _request(uri + "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health within 120 s; log:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.3)
        yield uri, admin
    finally:
        stop(process)


@pytest.mark.integration
def test_mlflow_server_of_compose_requires_auth(compose, tmp_path, monkeypatch):
    with mlflow_server(compose, tmp_path) as (uri, admin):
        _check_server(uri, admin, monkeypatch)


def _check_server(uri, admin, monkeypatch):
    search = uri + "/api/2.0/mlflow/experiments/search?max_results=1"

    assert _request(uri + "/health")[0] == 200  # no credentials needed for the healthcheck
    status, _ = _request(search)
    assert status == 401, f"an unauthenticated call answered {status}"
    status, _ = _request(search, auth=(admin[0], admin[1] + "x"))
    assert status == 401, f"a wrong password answered {status}"
    status, body = _request(search, auth=admin)
    assert status == 200, body[:500]
    assert "experiments" in json.loads(body)
    # --allowed-hosts: a Host header that is not listed is refused.
    status, _ = _request(search, auth=admin, host="attacker.example.com")
    assert status == 403, f"an unlisted Host header answered {status}"

    # What a researcher does: credentials in the environment only, artifacts through the proxy.
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
    client = MlflowClient(uri)
    experiment = client.create_experiment("compose-smoke")
    run = client.create_run(experiment)
    client.log_dict(run.info.run_id, {"ok": True}, "check.json")
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["check.json"]
