"""Two sweeps started at the same moment in one directory, with real Ray and real MLflow: they share the
directory's MLflow server (one server may migrate a new mlflow.db, not two) and the model they both need is
trained once (the entry's lock: the second waits, then evaluates on the first's model)."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.tracking import LocalServer
from smallsweep import small_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.integration


def start(args, cwd) -> subprocess.Popen:
    """``orchestrator ARGS`` without MLFLOW_TRACKING_URI: the sweep uses the directory's local server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_two_sweeps_started_at_once_share_the_server_and_train_once(tmp_path):
    """The same sweep file started twice at the same moment (its experiment is created by one, found by the
    other), whose two trials need one model. Their grid values hold '/' and a quote (eval.cache_dir, which no
    trial here reads): trial directories are named safely and each trial finds its own evaluation run."""
    odd = [str(tmp_path / "a/b"), str(tmp_path / "it's")]
    path = small_sweep(tmp_path / "twice.yaml", "twice", steps=60, grid={"eval.cache_dir": odd})
    started = time.monotonic()
    procs = [start(["sweep", path], tmp_path) for _ in range(2)]
    try:
        outputs = [proc.communicate(timeout=400)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
    print(f"two sweeps in {time.monotonic() - started:.0f} s")
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-5000:]
    uris = [re.search(r"parent run \w+ at (\S+)", output).group(1) for output in outputs]
    assert uris[0] == uris[1]  # one server for the directory
    assert (tmp_path / "mlflow-server.json").read_text() == ""  # and the last sweep to leave stopped it
    # the second sweep waited for the first's training and found the model (or found it in the cache)
    assert any("trained meanwhile by training run" in o or "1 reused from the cache" in o for o in outputs), outputs

    reader = LocalServer(str(tmp_path)).start()
    try:
        client = MlflowClient(reader.uri)
        experiment = client.get_experiment_by_name("twice")
        runs = client.search_runs([experiment.experiment_id], max_results=100)
        assert [r.info.status for r in runs if "mlflow.parentRunId" not in r.data.tags] == ["FINISHED", "FINISHED"]
        training = [r for r in runs if r.data.tags.get("stage") == "train"]
        evaluation = [r for r in runs if r.data.tags.get("stage") == "evaluate"]
    finally:
        reader.stop()
    assert [r.info.status for r in training] == ["FINISHED"]  # trained once, by one of the two sweeps
    [trained] = training
    assert [r.info.status for r in evaluation] == ["FINISHED"] * 4
    assert sorted(r.data.params["eval.cache_dir"] for r in evaluation) == sorted(odd * 2)
    assert {r.data.tags["training_run_id"] for r in evaluation} == {trained.info.run_id}
    key = trained.data.tags["training_hash"]
    record = json.loads((tmp_path / "ray_results" / "models" / key / "model.json").read_text())
    assert record["run_id"] == trained.info.run_id and set(record["files"]) == {"ema.pt"}


# -- damaged cache entries: what a later sweep does with them (one process, no Ray) ---------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LocalServer(str(tmp_path_factory.mktemp("mlflow"))).start()
    yield srv
    srv.stop()


def sweep_run(client, sweep, server, cache):
    """A new parent run of ``sweep`` (as run_sweep makes one) and the context of its tasks."""
    from orchestrator.trial import TrialContext

    experiment = client.get_experiment_by_name(sweep.name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(sweep.name)
    parent = client.create_run(experiment_id, tags={"sweep": sweep.name}).info.run_id
    return TrialContext(server.uri, experiment_id, parent, sweep.name, cache.root)


def task(group, train: bool) -> dict:
    """The task run_sweep gives Tune for the group's first trial (tuning._task)."""
    trial = group.trials[0]
    return {"name": trial.name, "key": group.key, "train": train, "group": [t.name for t in group.trials],
            "trials": [trial.as_dict()]}


def failure(client, context) -> str:
    runs = client.search_runs([context.experiment_id], f"tags.`mlflow.parentRunId` = '{context.parent_run_id}'")
    return "; ".join(r.data.tags.get("failure_reason", "") for r in runs)


def test_a_damaged_model_is_trained_again_by_the_next_sweep(tmp_path, server, capsys):
    """A truncated ema.pt in the cache: the next sweep reports it and trains the model again, instead of failing
    its evaluations (and those of every later sweep, until --no-cache)."""
    from test_cache import damage, tiny_sweep

    from orchestrator.cache import ModelCache
    from orchestrator.runner import plan
    from orchestrator.trial import execute_task

    sweep, cache = tiny_sweep(tmp_path), ModelCache(str(tmp_path / "models"))
    client = MlflowClient(server.uri)
    [group] = plan(sweep, cache)
    first = sweep_run(client, sweep, server, cache)
    assert execute_task(task(group, train=True), first), failure(client, first)
    trained = cache.model(group.key)["run_id"]
    damage(cache.local(group.key, "ema.pt"), "truncate")

    [group] = plan(sweep, cache)  # the next sweep
    second = sweep_run(client, sweep, server, cache)
    outcomes = execute_task(task(group, train=not group.cached), second)
    assert outcomes, failure(client, second)
    assert f"model cache entry {group.key}: ema.pt is damaged (size " in capsys.readouterr().err
    evaluation = client.get_run(outcomes[0].run_id)
    retrained = cache.model(group.key)["run_id"]
    assert evaluation.info.status == "FINISHED" and evaluation.data.tags["training_run_id"] == retrained != trained
    assert client.get_run(retrained).data.tags["mlflow.parentRunId"] == second.parent_run_id


def test_a_damaged_checkpoint_is_not_resumed(tmp_path, server, capsys):
    """A worker died while training, leaving its run RUNNING and a checkpoint that is now truncated: the retried
    task reports it and trains from step 0 in the same run, instead of failing on every retry and resume."""
    from test_cache import damage, tiny_sweep

    from orchestrator.cache import ModelCache
    from orchestrator.runner import plan
    from orchestrator.trial import execute_task

    sweep, cache = tiny_sweep(tmp_path), ModelCache(str(tmp_path / "models"))
    client = MlflowClient(server.uri)
    [group] = plan(sweep, cache)
    context = sweep_run(client, sweep, server, cache)
    assert execute_task(task(group, train=True), context), failure(client, context)
    run_id = cache.model(group.key)["run_id"]
    # as a worker that died before publishing the model leaves the cache and its training run
    cache.remove(group.key, "model.json")
    client.update_run(run_id, status="RUNNING")
    damage(cache.local(group.key, "checkpoint.pt"), "truncate")

    assert execute_task(task(group, train=True), context), failure(client, context)
    assert f"model cache entry {group.key}: checkpoint.pt is damaged (size " in capsys.readouterr().err
    training = client.get_run(run_id)
    assert training.info.status == "FINISHED" and training.data.tags["attempts"] == "2"
    assert "resumed_from_step" not in training.data.tags and "checkpoint_damaged" in training.data.tags
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == [10, 20]  # logged once
    assert cache.model(group.key)["run_id"] == run_id


def test_a_trainer_that_waits_too_long_fails_naming_the_entry_and_its_holder(tmp_path, server, monkeypatch):
    """Another process trains the model (it holds the entry's lock) for longer than $ORCHESTRATOR_CACHE_LOCK_TIMEOUT:
    the waiting task trains nothing and its trial ends FAILED, saying which entry and who holds it."""
    from test_cache import HOLD, tiny_sweep

    from orchestrator.cache import ModelCache
    from orchestrator.locks import LOCK_TIMEOUT_ENV
    from orchestrator.runner import plan
    from orchestrator.trial import execute_task

    sweep, cache = tiny_sweep(tmp_path), ModelCache(str(tmp_path / "models"))
    client = MlflowClient(server.uri)
    [group] = plan(sweep, cache)
    holder = subprocess.Popen([sys.executable, "-c", HOLD.replace('"k"', repr(group.key)), cache.root],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv(LOCK_TIMEOUT_ENV, "1")
        context = sweep_run(client, sweep, server, cache)
        assert execute_task(task(group, train=True), context) == []
    finally:
        holder.kill()
        holder.wait()
    runs = client.search_runs([context.experiment_id], f"tags.`mlflow.parentRunId` = '{context.parent_run_id}'")
    assert [r.data.tags["stage"] for r in runs] == ["evaluate"] and runs[0].info.status == "FAILED"
    reason = runs[0].data.tags["failure_reason"]
    assert reason.startswith(f"training failed: LockTimeout: model cache entry {group.key}: train.lock is held by ")
    assert f":{holder.pid} (since " in reason and "the other sweep" in reason and LOCK_TIMEOUT_ENV in reason
