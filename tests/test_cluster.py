"""A real Ray cluster of two nodes on this machine: `ray start --head` and a second `ray start --address`,
with token authentication and custom resources. A sweep joins it with --address; trials land on both
nodes; a worker node that is stopped mid-sweep has its trial rescheduled on the remaining node, resuming
from the last checkpoint in the same MLflow run."""
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.localcluster import LocalCluster
from orchestrator.tracking import LocalServer
from smallsweep import small_sweep

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster():
    cluster = LocalCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LocalServer(str(tmp_path_factory.mktemp("mlflow"))).start()
    yield srv
    srv.stop()


def sweep_file(path, name: str, steps: int, variants: dict, checkpoint_every: int = 0) -> str:
    return small_sweep(path, name, steps, checkpoint_every, variants=variants)


def sweep(cluster: LocalCluster, path: str, cwd, uri: str) -> subprocess.Popen:
    env = {**cluster.env, "MLFLOW_TRACKING_URI": uri}
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
    proc = sweep(cluster, sweep_file(tmp_path / "two.yaml", "two_nodes", 30, variants), tmp_path, server.uri)
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
