"""What a sweep can know before it starts is checked before MLflow starts or anything is written (a data set
whose files are missing, resources no node has, credentials in the tracking URI); a sweep that fails after it
started ends its parent run FAILED with the reason; grid values holding '/' or quotes work like any other."""
import http.server
import os
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest
from mlflow.tracking import MlflowClient

from diffusion.errors import ConfigError
from orchestrator.preflight import check_resources
from orchestrator.tuning import trial_dirname
from orchestrator.sweepfile import load_sweep
from orchestrator.tracking import LocalServer, check_tracking_access, free_port
from smallsweep import small_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def orchestrator(args, cwd, env_extra=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env.update(env_extra or {})
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def written(directory) -> set[str]:
    """What a sweep leaves in its directory (the sweep file itself aside)."""
    return {name for name in os.listdir(directory) if not name.endswith(".yaml")}


def assert_refused(result, *fragments):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orchestrator: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_data_files_are_refused_before_anything_starts(tmp_path):
    path = small_sweep(tmp_path / "mnist.yaml", "mnist_missing", 5)
    overrides = ["base.data.name=mnist", f"base.data.root={tmp_path / 'nonexistent'}"]
    for command in (["validate"], ["sweep"]):
        result = orchestrator([*command, path, *overrides], cwd=tmp_path)
        assert_refused(result, "base.data.name", "mnist")
        assert written(tmp_path) == set()  # no mlflow.db, no mlartifacts, no ray_results, no server log


def test_resources_no_node_has():
    """Against the nodes' resource dicts as Ray reports them: the first trial that no single node can hold
    names its key, what it asks and the most there is."""
    sweep = load_sweep(os.path.join(ROOT, "sweeps", "smoke.yaml"), ["base.resources.cpu=3"])
    nodes = [{"CPU": 2.0, "GPU": 0.0, "memory": 1e9}]
    with pytest.raises(ConfigError, match=r"base\.resources\.cpu: invalid value 3\.0; accepted: at most 2"):
        check_resources(sweep, nodes, "this machine")
    check_resources(sweep, [*nodes, {"CPU": 4.0}], "a cluster")  # one node is enough
    gpu = load_sweep(os.path.join(ROOT, "sweeps", "smoke.yaml"), ["base.resources.gpu=0.5"])
    with pytest.raises(ConfigError, match=r"resources\.gpu: invalid value 0\.5; accepted: nothing: no node"):
        check_resources(gpu, nodes, "this machine")
    check_resources(gpu, [{"CPU": 1.0, "GPU": 1.0}], "a cluster")  # fractions share a GPU
    custom = load_sweep(os.path.join(ROOT, "sweeps", "smoke.yaml"), ["base.resources.custom={node_a: 1}"])
    with pytest.raises(ConfigError, match=r"resources\.custom\.node_a"):
        check_resources(custom, nodes, "this machine")
    # each resource exists somewhere, but on no single node together: still pending for ever
    with pytest.raises(ConfigError, match="no single node has all of them"):
        check_resources(custom, [{"CPU": 4.0}, {"CPU": 0.0, "node_a": 1.0}], "a cluster")
    check_resources(custom, [{"CPU": 4.0}, {"CPU": 1.0, "node_a": 1.0}], "a cluster")
    # data-parallel workers, each with the trial's resources, on the nodes together
    parallel = load_sweep(os.path.join(ROOT, "sweeps", "smoke.yaml"), ["base.resources.workers=4"])
    with pytest.raises(ConfigError, match=r"base\.resources\.workers: invalid value 4; accepted: at most 2 \(the "
                                          r"workers of \{'CPU': 1\.0\} each that this machine holds"):
        check_resources(parallel, nodes, "this machine")
    check_resources(parallel, [*nodes, {"CPU": 2.5}], "a cluster")  # 2 + 2 workers on two nodes
    with pytest.raises(ConfigError, match="at most 3"):
        check_resources(parallel, [*nodes, {"CPU": 1.5}], "a cluster")


def test_workers_must_divide_the_batch():
    with pytest.raises(ConfigError, match=r"base\.resources\.workers: invalid value 3; accepted: a divisor of "
                                          r"train\.batch_size \(64\)"):
        load_sweep(os.path.join(ROOT, "sweeps", "smoke.yaml"), ["base.resources.workers=3", "base.train.batch_size=64"])
    with pytest.raises(ConfigError, match=r"resources\.workers: invalid value 0; accepted: an integer >= 1"):
        load_sweep(os.path.join(ROOT, "sweeps", "smoke.yaml"), ["base.resources.workers=0"])
    sweep = load_sweep(os.path.join(ROOT, "sweeps", "smoke.yaml"), ["base.resources.workers=2", "base.train.batch_size=64"])
    assert {t.config.resources.workers for t in sweep.trials} == {2}


def test_trial_dirname_is_safe_and_distinct():
    assert trial_dirname("ddpm-seed=1,sample.steps=20") == "ddpm-seed=1,sample.steps=20"  # safe names stay
    odd = ["base-eval.cache_dir=/tmp/a/b", "base-eval.cache_dir=/tmp/a_b", "base-x=it's", 'base-x="q"', "base-x=..",
           "base-x=" + "y" * 300]
    names = [trial_dirname(name) for name in odd]
    assert len(set(names)) == len(names)
    for name in names:
        assert "/" not in name and "'" not in name and '"' not in name and len(name) <= 120 and name not in (".", "..")


@pytest.mark.integration
def test_sweep_refuses_what_it_can_know_before_anything_starts(tmp_path, tmp_path_factory):
    """Resources beyond this machine are refused before Ray or MLflow start (the tracking server starts beside a local
    Ray instance); a credential in the tracking URI is refused before anything; once Ray is up (``start_ray``), its
    token file is readable by its owner only. (Grid values holding '/' and a quote: test_concurrency.)"""
    path = small_sweep(tmp_path / "odd.yaml", "odd_values", 20)
    home = tmp_path_factory.mktemp("home")  # where Ray keeps a local instance's token: ~/.ray/auth_token
    result = orchestrator(["sweep", path, f"base.resources.cpu={os.cpu_count() + 62}"], cwd=tmp_path,
                          env_extra={"HOME": str(home)})
    assert_refused(result, "base.resources.cpu", "at most")
    assert written(tmp_path) == set()
    started = subprocess.run(
        [sys.executable, "-c", "import sys, ray; from orchestrator.preflight import start_ray; "
         "from orchestrator.sweepfile import load_sweep; start_ray(load_sweep(sys.argv[1], []), None); ray.shutdown()",
         path], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}, "HOME": str(home),
             "PYTHONPATH": ROOT})
    assert started.returncode == 0, started.stderr[-3000:]
    token = home / ".ray" / "auth_token"
    assert token.stat().st_mode & 0o777 == 0o600  # Ray creates it 0644: other users could join the instance
    result = orchestrator(["sweep", path], cwd=tmp_path,
                          env_extra={"MLFLOW_TRACKING_URI": "http://alice:hunter2-password@127.0.0.1:9"})
    assert_refused(result, "MLFLOW_TRACKING_URI")
    assert "hunter2-password" not in result.stderr and written(tmp_path) == set()


@pytest.mark.integration
def test_a_sweep_that_fails_after_it_started_ends_its_parent_failed(tmp_path):
    """The FID feature cache cannot be made (its directory would be under a file): the sweep has started (its
    parent run exists) when that is found; the parent run ends FAILED with the reason, not RUNNING."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    path = small_sweep(tmp_path / "fails.yaml", "fails_late", 5)
    result = orchestrator(["sweep", path, "base.eval.fid=true", "base.eval.classifier_steps=1",
                           f"base.eval.cache_dir={blocker / 'cache'}"], cwd=tmp_path)
    assert result.returncode != 0
    reader = LocalServer(str(tmp_path)).start()
    try:
        client = MlflowClient(reader.uri)
        experiment = client.get_experiment_by_name("fails_late")
        (parent,) = client.search_runs([experiment.experiment_id])
        assert parent.info.status == "FAILED"
        assert "a-file" in parent.data.tags["failure_reason"]
    finally:
        reader.stop()


@contextmanager
def answering(status: int, body: bytes = b""):
    """An HTTP server on 127.0.0.1 that answers every request with ``status`` and ``body``: its URI, and the
    Authorization header of each request it got."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_tracking_server_refusals_name_what_to_set(monkeypatch, tmp_path):
    """What the sweep's preflight makes of each answer of a tracking server (the same check against a real MLflow
    server with basic auth: test_stack.py): the variable to set, never a credential's value."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials
    secret = "sentinel-password-2f8c41d6"

    def refused(uri) -> str:
        with pytest.raises(ConfigError) as caught:
            check_tracking_access(uri)
        assert secret not in str(caught.value)
        return str(caught.value)

    with answering(401, b"You are not authenticated.") as (uri, seen):
        assert refused(uri).startswith(
            f"MLFLOW_TRACKING_USERNAME: invalid value (not set); accepted: an account of the MLflow server at {uri}: "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        assert refused(uri).startswith("MLFLOW_TRACKING_PASSWORD: invalid value (not set)")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
        message = refused(uri)
        assert message.startswith(
            "MLFLOW_TRACKING_PASSWORD: invalid value (not shown; MLFLOW_TRACKING_USERNAME is 'alice'); accepted: the "
            f"password of the account 'alice' on the MLflow server at {uri}")
        assert "HTTP 401" in message and "set the right password" in message
        assert seen[-1].startswith("Basic ")  # sent as every trial's client sends it
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", secret)
        assert refused(uri).startswith("MLFLOW_TRACKING_TOKEN: invalid value (not shown); accepted: a token the MLflow "
                                       f"server at {uri} accepts")
        assert seen[-1] == f"Bearer {secret}"
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")  # no password: the token is what was sent
        assert refused(uri).startswith("MLFLOW_TRACKING_TOKEN: ") and seen[-1] == f"Bearer {secret}"
    with answering(403, b"Invalid Host header") as (uri, _):
        assert refused(uri).startswith(f"MLFLOW_TRACKING_URI: invalid value '{uri}'; accepted: a server that lets "
                                       "this account read experiments (the MLflow server at")
        assert "HTTP 403: Invalid Host header" in refused(uri)
    with answering(200, b'{"experiments": []}') as (uri, _):
        check_tracking_access(uri)
    with answering(404) as (uri, _):  # not MLflow's REST API, or an older server: left to the sweep
        check_tracking_access(uri)
    closed = f"http://127.0.0.1:{free_port()}"
    assert refused(closed).startswith(f"MLFLOW_TRACKING_URI: invalid value '{closed}'; accepted: the URI of a "
                                      "running MLflow tracking server (nothing answers there")
    check_tracking_access(None)  # a local server of the sweep's own
    check_tracking_access(f"sqlite:///{tmp_path / 'mlflow.db'}")  # no server to ask
