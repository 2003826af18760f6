"""Data-parallel trials (``resources.workers``, ``orchestrator.parallel``) through a real sweep: Ray Tune, Ray Train's
TorchTrainer on gloo, a real MLflow server. One sweep mixes a 1-worker and a 2-worker trial of the same model; a
worker of the 2-worker training is killed mid-way (after step 60). The 2-worker training resumes from its checkpoint and still
follows the 1-worker one: the same loss at every logged step and the same EMA weights, within rounding."""
import os
import signal

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.cache import ModelCache
from smallsweep import small_sweep
from test_faults import server  # noqa: F401  (the fixture: a tracking server per module)
from test_faults import assert_complete_history, runs, start, wait_for

pytestmark = pytest.mark.integration
STEPS, NAME = 120, "parallel_mixed"


def training_of(client, workers: int):
    found = [r for r in runs(client, NAME, "train") if r.data.tags["trials"].endswith(f"workers={workers}")]
    return found[0] if found else None


def at_step(client, run, step: int) -> bool:
    return any(m.step >= step for m in client.get_metric_history(run.info.run_id, "train_loss"))


def test_a_killed_worker_of_a_two_worker_training_resumes_and_still_matches_one_worker(tmp_path, server):
    path = small_sweep(tmp_path / "mixed.yaml", NAME, STEPS, checkpoint_every=30,
                       grid={"resources.workers": [1, 2]}, max_concurrent=1)
    sweep = yaml.safe_load(open(path))
    sweep["base"]["train"]["batch_size"] = 16  # 8 rows per worker
    yaml.safe_dump(sweep, open(path, "w"))
    proc = start(["sweep", path], tmp_path, server.uri)
    client = MlflowClient(server.uri)

    def parallel_at_60():
        run = training_of(client, 2)
        return run if run is not None and "data_parallel_workers" in run.data.tags and at_step(client, run, 60) \
            else None

    run = wait_for(parallel_at_60, 600, proc, "the 2-worker training reached step 60")
    workers = run.data.tags["data_parallel_workers"].split(",")
    assert len(workers) == 2 and len(set(workers)) == 2  # two processes
    os.kill(int(workers[1].rsplit(":", 1)[1]), signal.SIGKILL)  # rank 1
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]

    one, two = training_of(client, 1), training_of(client, 2)
    assert two.info.run_id == run.info.run_id and two.info.status == "FINISHED" == one.info.status
    assert two.data.tags["worker_group_starts"] == "2"  # Ray Train started the group again
    assert two.data.tags["data_parallel_workers"] != run.data.tags["data_parallel_workers"]
    resumed = int(two.data.tags["resumed_from_step"])
    assert resumed >= 30 and resumed % 30 == 0  # from the last checkpoint, not from scratch
    assert_complete_history(client, two, STEPS)  # every step logged once, though some were trained twice
    curves = [sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "train_loss"))
              for r in (one, two)]
    assert [s for s, _ in curves[0]] == [s for s, _ in curves[1]]
    assert torch.allclose(torch.tensor([v for _, v in curves[0]]), torch.tensor([v for _, v in curves[1]]),
                          rtol=1e-4, atol=1e-6), curves
    assert one.data.tags["training_hash"] != two.data.tags["training_hash"]  # not the same weights bit for bit
    cache = ModelCache(os.path.join(tmp_path, "ray_results", "models"))
    weights = [torch.load(cache.fetch(r.data.tags["training_hash"], "ema.pt"), weights_only=True)["network"]
               for r in (one, two)]
    for name, value in weights[0].items():
        assert torch.allclose(value, weights[1][name], rtol=1e-3, atol=1e-5), name
    assert any(not torch.equal(value, weights[1][name]) for name, value in weights[0].items())  # really two runs
    evaluations = runs(client, NAME, "evaluate")
    assert sorted(e.data.tags["training_run_id"] for e in evaluations) == sorted([one.info.run_id, two.info.run_id])
    assert all(e.info.status == "FINISHED" for e in evaluations)
    assert [p.info.status for p in runs(client, NAME, "parent")] == ["FINISHED"]
