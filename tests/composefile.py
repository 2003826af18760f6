"""docker-compose.yml and .env.example read as Docker Compose reads them (interpolation of ${VAR:-default} and the
like), and the compose file's MLflow service turned into a command line and environment that run here: shared by
tests/test_compose.py (SQLite and a directory for PostgreSQL and S3) and tests/test_stack.py (PostgreSQL and an S3
server)."""
import configparser
import os
import re
import secrets
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPOSE = os.path.join(ROOT, "docker-compose.yml")
ENV_EXAMPLE = os.path.join(ROOT, ".env.example")
PLACEHOLDER = "change-me"
LOOPBACK = "127.0.0.1"

# Compose interpolation: $$ (a literal $), ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
# ${VAR?error}, ${VAR:+alternative}, ${VAR+alternative}, and the bare $VAR.
REFERENCE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict) -> str:
    """What Docker Compose makes of ``text`` given the variables ``env``."""
    def replace(match):
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        op, arg = match["op"], match["arg"] or ""
        value = env.get(name)
        is_set = value is not None
        non_empty = bool(value)
        if op in (":-", "-"):
            return value if (non_empty if op == ":-" else is_set) else arg
        if op in (":?", "?"):
            if not (non_empty if op == ":?" else is_set):
                raise MissingVariable(f"{name}: {arg}")
            return value
        if op in (":+", "+"):
            return arg if (non_empty if op == ":+" else is_set) else ""
        return value or ""
    return REFERENCE.sub(replace, text)


def references(text: str) -> list[re.Match]:
    return [m for m in REFERENCE.finditer(text) if not m["escaped"]]


def strings(node):
    """Every string of a parsed YAML document, keys included."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def environment(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {str(k): (None if v is None else str(v)) for k, v in env.items()}


def read_env_example() -> tuple[dict, dict]:
    """(variables, the comment block right above each) of .env.example."""
    values, comments, block = {}, {}, []
    with open(ENV_EXAMPLE) as f:
        for line in f:
            line = line.strip()
            if not line:
                block = []
            elif line.startswith("#"):
                block.append(line)
            else:
                name, sep, value = line.partition("=")
                assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), f".env.example: bad line {line!r}"
                assert name not in values, f".env.example: {name} twice"
                values[name], comments[name] = value, list(block)
                block = []
    return values, comments



def load_compose() -> dict:
    with open(COMPOSE) as f:
        return yaml.safe_load(f)


def dot_env(**values) -> dict:
    """A .env as an operator makes it: .env.example with each placeholder replaced by a fresh random secret,
    then ``values``."""
    example, _ = read_env_example()
    variables = {name: secrets.token_urlsafe(24) if value == PLACEHOLDER else value for name, value in example.items()}
    variables.update(values)
    return variables


def option(command: list[str], flag: str):
    """The value of ``flag`` (``--flag value`` or ``--flag=value``) in ``command``, else None."""
    for i, word in enumerate(command):
        if word == flag:
            return command[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def set_option(command: list[str], flag: str, value: str) -> list[str]:
    out = list(command)
    for i, word in enumerate(out):
        if word == flag:
            out[i + 1] = value
            return out
        if word.startswith(flag + "="):
            out[i] = f"{flag}={value}"
            return out
    raise AssertionError(f"{flag} is not in the command")


def _replace(value: str, how) -> str:
    return how(value) if callable(how) else how


def mlflow_service(compose: dict, variables: dict, directory, port: int, command_options: dict = None,
                   auth_options: dict = None, env_options: dict = None) -> tuple[list, dict]:
    """The compose file's ``mlflow`` service as a process of this machine: (command, environment).

    The service's command line and environment interpolated with ``variables`` (the values of a .env), with
    ``python -m mlflow`` of this interpreter, ``--host`` LOOPBACK and ``--port`` ``port``; the compose config
    ``mlflow_auth`` (basic_auth.ini) interpolated and written to ``directory``, where MLFLOW_AUTH_CONFIG_PATH
    points. Replacements for what names a container (a host name, a path), each a string or a function of
    the compose file's value: ``command_options`` (option -> value), ``auth_options`` (key of the ini's
    [mlflow] section -> value), ``env_options`` (variable -> value). Nothing else changes: the rest is the
    compose file's own. The environment is this process's without MLFLOW_*, plus the service's."""
    service = compose["services"]["mlflow"]
    command = [interpolate(str(word), variables) for word in service["command"]]
    assert command[:2] == ["mlflow", "server"]
    command = [sys.executable, "-m", "mlflow", "server", *command[2:]]
    for flag, how in {"--host": LOOPBACK, "--port": str(port), **(command_options or {})}.items():
        command = set_option(command, flag, _replace(option(command, flag), how))

    auth = configparser.ConfigParser()
    auth.read_string(interpolate(compose["configs"]["mlflow_auth"]["content"], variables))
    for key, how in (auth_options or {}).items():
        assert key in auth["mlflow"], f"basic_auth.ini has no {key}"
        auth["mlflow"][key] = _replace(auth["mlflow"][key], how)
    ini = os.path.join(str(directory), "basic_auth.ini")
    with open(ini, "w") as f:
        auth.write(f)

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({k: interpolate(v, variables) for k, v in environment(service).items() if v is not None})
    for name, how in (env_options or {}).items():
        assert name in env, f"the mlflow service has no {name}"
        env[name] = _replace(env[name], how)
    env["MLFLOW_AUTH_CONFIG_PATH"] = ini
    return command, env


def stop(process) -> None:
    """A server started in its own process group (``start_new_session``): SIGTERM to the group, SIGKILL after 20 s."""
    import signal
    import subprocess

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
