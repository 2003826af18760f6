"""Faults, with real processes: a killed trial worker, a killed driver, a restarted MLflow server. Each
test ends with every trial FINISHED exactly once in MLflow and no training step lost or logged twice."""
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.tracking import LocalServer, free_port
from smallsweep import small_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LocalServer(str(tmp_path_factory.mktemp("mlflow"))).start()
    yield srv
    srv.stop()


def write_sweep(path, name: str, steps: int, seeds: list[int], max_concurrent=None) -> str:
    """A checkpoint every 50 steps, one trial per seed."""
    extra = {"max_concurrent": max_concurrent} if max_concurrent else {}
    return small_sweep(path, name, steps, checkpoint_every=50, grid={"seed": seeds}, **extra)


def start(args, cwd, uri) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def runs(client, name: str, stage: str):
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return []
    found = client.search_runs([experiment.experiment_id], max_results=1000)
    if stage == "parent":
        return [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    return [r for r in found if r.data.tags.get("stage") == stage]


def wait_for(condition, timeout: float, proc: subprocess.Popen, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended before {what}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def training_at(client, name: str, step: int):
    """The training run that has logged train_loss at ``step`` or later, if any."""
    for run in runs(client, name, "train"):
        if run.info.status == "RUNNING" and run.data.metrics and client.get_metric_history(run.info.run_id, "train_loss") \
                and max(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) >= step:
            return run
    return None


def assert_complete_history(client, run, steps: int):
    """train_loss at every logged step exactly once: nothing lost, nothing logged twice."""
    logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert logged == list(range(10, steps + 1, 10)), logged


def test_killed_worker_is_retried_and_resumes_in_the_same_run(tmp_path, server):
    path = write_sweep(tmp_path / "worker.yaml", "fault_worker", steps=250, seeds=[0])
    proc = start(["sweep", path], tmp_path, server.uri)
    client = MlflowClient(server.uri)
    run = wait_for(lambda: training_at(client, "fault_worker", 120), 300, proc, "training reached step 120")
    host, pid = run.data.tags["worker"].rsplit(":", 1)
    os.kill(int(pid), signal.SIGKILL)  # the Ray worker process of the trial
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]

    [training] = runs(client, "fault_worker", "train")
    assert training.info.run_id == run.info.run_id and training.info.status == "FINISHED"
    assert training.data.tags["attempts"] == "2" and training.data.tags["worker"] != run.data.tags["worker"]
    resumed = int(training.data.tags["resumed_from_step"])
    assert resumed >= 100 and resumed % 50 == 0  # from the last checkpoint, not from scratch
    assert_complete_history(client, training, 250)
    [evaluation] = runs(client, "fault_worker", "evaluate")
    assert evaluation.info.status == "FINISHED" and evaluation.data.tags["training_run_id"] == training.info.run_id
    assert [p.info.status for p in runs(client, "fault_worker", "parent")] == ["FINISHED"]


def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path, server):
    path = write_sweep(tmp_path / "driver.yaml", "fault_driver", steps=300, seeds=[0, 1], max_concurrent=1)
    proc = start(["sweep", path], tmp_path, server.uri)
    client = MlflowClient(server.uri)

    def first_done_second_training():
        done = [r for r in runs(client, "fault_driver", "evaluate") if r.info.status == "FINISHED"]
        return done if done and training_at(client, "fault_driver", 60) else None

    [finished] = wait_for(first_done_second_training, 400, proc, "one trial finished and the other trained 60 steps")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait(timeout=60)
    [parent] = runs(client, "fault_driver", "parent")
    assert parent.info.status == "RUNNING"  # nobody ended it

    again = start(["resume", path], tmp_path, server.uri)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output[-3000:]
    assert "resuming: 1 of 2 trial(s) already finished" in output
    [resumed_parent] = runs(client, "fault_driver", "parent")
    assert resumed_parent.info.run_id == parent.info.run_id and resumed_parent.info.status == "FINISHED"
    assert resumed_parent.data.tags["resumed"] == "1"
    evaluations = runs(client, "fault_driver", "evaluate")
    assert sorted(r.data.tags["trial"] for r in evaluations) == ["base-seed=0", "base-seed=1"]
    assert all(r.info.status == "FINISHED" for r in evaluations)
    kept = next(r for r in evaluations if r.info.run_id == finished.info.run_id)
    assert kept.info.end_time == finished.info.end_time and "attempts" not in kept.data.tags  # not rerun
    trainings = runs(client, "fault_driver", "train")
    assert len(trainings) == 2 and all(r.info.status == "FINISHED" for r in trainings)
    for training in trainings:
        assert_complete_history(client, training, 300)
    assert sum(r.data.tags.get("attempts") == "2" for r in trainings) == 1


def test_mlflow_server_restart_loses_no_metric(tmp_path):
    directory = tmp_path / "mlflow"
    directory.mkdir()
    port = free_port()
    server = LocalServer(str(directory), port=port).start()
    path = write_sweep(tmp_path / "restart.yaml", "fault_server", steps=300, seeds=[0])
    proc = start(["sweep", path], tmp_path, server.uri)
    try:
        client = MlflowClient(server.uri)
        wait_for(lambda: training_at(client, "fault_server", 100), 300, proc, "training reached step 100")
        server.stop()
        time.sleep(5)  # the trial keeps training; its logging calls retry
        server = LocalServer(str(directory), port=port).start()
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]
        [training] = runs(client, "fault_server", "train")
        assert training.info.status == "FINISHED"
        assert_complete_history(client, training, 300)
        [evaluation] = runs(client, "fault_server", "evaluate")
        assert evaluation.info.status == "FINISHED"
        assert [p.info.status for p in runs(client, "fault_server", "parent")] == ["FINISHED"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        server.stop()
