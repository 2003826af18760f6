"""A real Ray cluster of two nodes on this machine: `ray start --head` and a second `ray start --address`,
with token authentication and custom resources. A sweep joins it with --address; trials land on both
nodes; a worker node that is stopped mid-sweep has its trial rescheduled on the remaining node, resuming
from the last checkpoint in the same MLflow run."""
import glob
import os
import secrets
import signal
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.localcluster import LocalCluster
from orchestrator.tracking import free_port
from leaks import files_holding
from smallsweep import small_sweep

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster():
    cluster = LocalCluster()
    for name in CREDENTIALS:  # the nodes never have the driver's credentials
        cluster.env.pop(name, None)
    try:
        yield cluster
    finally:
        cluster.stop()


# The driver's credentials; the cluster's nodes are started without them (LocalCluster drops MLFLOW_*).
CREDENTIALS = {"MLFLOW_TRACKING_USERNAME": "researcher", "MLFLOW_TRACKING_PASSWORD": "sentinel-password-8d2e61b7",
               "MLFLOW_TRACKING_TOKEN": "sentinel-token-3a9f04c2", "AWS_ACCESS_KEY_ID": "sentinel-key-id-71c5e0d3",
               "AWS_SECRET_ACCESS_KEY": "sentinel-secret-key-0b6a2f94"}
SENTINELS = {name: value for name, value in CREDENTIALS.items() if value.startswith("sentinel-")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An MLflow server with basic auth whose one user has the driver's credentials: trials on the cluster can
    log only if the driver handed the credentials to its workers (the nodes do not have them). The password is
    in the server's environment and, hashed, in its user store, nowhere else."""
    directory = tmp_path_factory.mktemp("mlflow")
    (directory / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{directory / 'basic_auth.db'}\n"
        f"admin_username = {CREDENTIALS['MLFLOW_TRACKING_USERNAME']}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(directory / "basic_auth.ini"), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               MLFLOW_AUTH_ADMIN_PASSWORD=CREDENTIALS["MLFLOW_TRACKING_PASSWORD"],
               MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
    command = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
               "--artifacts-destination", str(directory / "artifacts")]
    with open(directory / "server.log", "wb") as log:
        process = subprocess.Popen(command, cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, (directory / "server.log").read_text()
            try:
                urllib.request.urlopen(uri + "/health", timeout=2).close()
                break
            except OSError:
                time.sleep(0.3)
        with pytest.raises(urllib.error.HTTPError, match="401"):  # no credentials, no access
            urllib.request.urlopen(uri + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        os.environ.update(CREDENTIALS)  # this test's own MlflowClient
        yield types.SimpleNamespace(uri=uri)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def sweep_file(path, name: str, steps: int, variants: dict, checkpoint_every: int = 0) -> str:
    return small_sweep(path, name, steps, checkpoint_every, variants=variants)


def sweep(cluster: LocalCluster, path: str, cwd, uri: str) -> subprocess.Popen:
    env = {**cluster.env, **CREDENTIALS, "MLFLOW_TRACKING_URI": uri}
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", path, "--address", cluster.address],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def stage_runs(client, name: str, stage: str):
    experiment = client.get_experiment_by_name(name)
    found = client.search_runs([experiment.experiment_id], max_results=100) if experiment else []
    return [r for r in found if r.data.tags.get("stage") == stage]


def test_trials_land_on_both_nodes(tmp_path, cluster, server):
    cluster.start_node("head", 1, {"node_a": 1})
    cluster.start_node("worker", 1, {"node_b": 1})
    variants = {"a": {"seed": 0, "resources": {"custom": {"node_a": 1}}},
                "b": {"seed": 1, "resources": {"custom": {"node_b": 1}}}}
    path = sweep_file(tmp_path / "two.yaml", "two_nodes", 30, variants)
    # A resource no node of the cluster has is found against the cluster's nodes, before anything starts.
    refused = subprocess.run([sys.executable, "-m", "orchestrator", "validate", path,
                              "variants.b.resources.custom={node_c: 1}", "--address", cluster.address], cwd=tmp_path,
                             env=cluster.env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.startswith(
        "orchestrator: error: variants.b.resources.custom.node_c: invalid value 1.0; accepted: nothing: no node of "
        f"the Ray cluster at {cluster.address} has node_c"), refused.stderr[-3000:]
    proc = sweep(cluster, path, tmp_path, server.uri)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    client = MlflowClient(server.uri)
    evaluations = {r.data.tags["trial"]: r for r in stage_runs(client, "two_nodes", "evaluate")}
    assert sorted(evaluations) == ["a", "b"] and all(r.info.status == "FINISHED" for r in evaluations.values())
    trainings = {r.data.tags["trials"]: r for r in stage_runs(client, "two_nodes", "train")}
    assert trainings["a"].data.tags["ray_node"] == evaluations["a"].data.tags["ray_node"] == cluster.node_id("node_a")
    assert trainings["b"].data.tags["ray_node"] == evaluations["b"].data.tags["ray_node"] == cluster.node_id("node_b")
    for run in trainings.values():
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [10, 20, 30]
    assert not (tmp_path / "mlflow.db").exists()  # the configured server, not a local one
    # The workers logged with credentials the driver handed over, and those went into no file: not the sweep's
    # directory, not the Ray session directory of the cluster (its logs), not the driver's output.
    assert glob.glob(os.path.join(cluster.temp_dir, "session_*", "logs", "runtime_env_agent.log"))
    assert files_holding([tmp_path, cluster.temp_dir], SENTINELS) == []
    assert not any(value in output for value in SENTINELS.values())


def test_stopped_worker_node_reschedules_its_trial(tmp_path, cluster, server):
    cluster.start_node("head", 1, {"head": 1})
    cluster.start_node("worker", 1, {"worker": 1})
    head_id, worker_id = cluster.node_id("head"), cluster.node_id("worker")
    variants = {"s0": {"seed": 0}, "s1": {"seed": 1}}  # 1 CPU each: one trial per node
    path = sweep_file(tmp_path / "stop.yaml", "node_stop", 300, variants, checkpoint_every=50)
    proc = sweep(cluster, path, tmp_path, server.uri)
    client = MlflowClient(server.uri)
    deadline, moved = time.monotonic() + 300, None
    while moved is None:
        assert time.monotonic() < deadline and proc.poll() is None, "no trial reached step 100 on the worker node"
        for run in stage_runs(client, "node_stop", "train"):
            history = client.get_metric_history(run.info.run_id, "train_loss")
            if run.data.tags.get("ray_node") == worker_id and history and max(m.step for m in history) >= 100:
                moved = run
        time.sleep(0.5)
    cluster.stop_node("worker")
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-3000:]
    trainings = stage_runs(client, "node_stop", "train")
    assert len(trainings) == 2 and all(r.info.status == "FINISHED" for r in trainings)
    again = client.get_run(moved.info.run_id)
    assert again.data.tags["ray_node"] == head_id and again.data.tags["attempts"] == "2"
    assert int(again.data.tags["resumed_from_step"]) >= 100
    for run in trainings:
        logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
        assert logged == list(range(10, 301, 10))
    evaluations = stage_runs(client, "node_stop", "evaluate")
    assert sorted(r.data.tags["trial"] for r in evaluations) == ["s0", "s1"]
    assert all(r.info.status == "FINISHED" for r in evaluations)
