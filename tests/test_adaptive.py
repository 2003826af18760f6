"""Adaptive sweeps, through a real sweep (Ray Tune, a real MLflow server): FID during training (``eval.every``), a
random search (the ``search`` section) and early stopping (the ``scheduler`` section) across a killed driver."""
import glob
import json
import os
import signal

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.cache import MODEL_FILE, ModelCache
from smallsweep import small_sweep
from test_faults import server  # noqa: F401  (the fixture: a tracking server per module)
from test_faults import runs, start, wait_for

pytestmark = pytest.mark.integration


def test_a_random_search_with_fid_during_training_logs_reports_to_tune_and_keeps_the_curve(tmp_path, server):
    """Two draws of a random search over train.lr, each trained with eval.every: FID and KID at steps 20 and 40 in
    MLflow and in Tune's results, the curve kept in the model cache's record."""
    path = small_sweep(tmp_path / "every.yaml", "every", 40)
    sweep = yaml.safe_load(open(path))
    sweep["base"]["eval"] = {"fid": True, "bpd": False, "extractor": "classifier", "classifier_steps": 30,
                             "cache_dir": str(tmp_path / "features"), "every": 20, "every_n": 32, "every_steps": 5}
    sweep["search"] = {"algorithm": "random", "num_samples": 2, "space": {"train.lr": {"loguniform": [1e-4, 3e-3]}}}
    yaml.safe_dump(sweep, open(path, "w"))
    proc = start(["sweep", path], tmp_path, server.uri)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]

    client = MlflowClient(server.uri)
    trainings = runs(client, "every", "train")
    assert sorted(t.data.tags["trials"] for t in trainings) == ["base-sample=0", "base-sample=1"]
    assert len({t.data.params["train.lr"] for t in trainings}) == 2
    for training in trainings:
        check_curve(client, training, tmp_path)
    reported = [json.loads(line) for name in glob.glob(str(tmp_path / "ray_results" / "**" / "result.json"),
                                                        recursive=True) for line in open(name)]
    # Ray Tune was told (what a scheduler stops trials on)
    assert sorted(r["step"] for r in reported if "fid" in r and r.get("phase") == "train") == [20, 20, 40, 40]
    evaluations = runs(client, "every", "evaluate")
    assert len(evaluations) == 2 and all(e.info.status == "FINISHED" and "fid" in e.data.metrics for e in evaluations)
    assert "train.lr" in output  # the summary's table shows the drawn values


def check_curve(client, training, tmp_path) -> None:
    curve = {name: sorted((m.step, m.value) for m in client.get_metric_history(training.info.run_id, name))
             for name in ("fid", "kid", "every_seconds")}
    assert [step for step, _ in curve["fid"]] == [20, 40] == [step for step, _ in curve["kid"]]
    assert all(0 < value < 1e6 for _, value in curve["fid"]) and all(v > 0 for _, v in curve["every_seconds"])
    # the cached model keeps its curve
    model = ModelCache(str(tmp_path / "ray_results" / "models")).read(training.data.tags["training_hash"], MODEL_FILE)
    assert [(p["step"], p["fid"], p["kid"]) for p in model["fid_curve"]] == \
        [(s, f, k) for (s, f), (_, k) in zip(curve["fid"], curve["kid"])]


def test_asha_stops_a_poor_training_after_the_driver_was_killed_and_resumed_and_says_so_in_mlflow(tmp_path, server):
    """ASHA on FID during training (one rung, at step 40 of 60), one training at a time: the good learning rate
    trains and is evaluated first; the driver is killed as soon as the poor one (1e-7: its network barely moves)
    starts. ``orchestrator resume`` does not run the finished trial again and gives ASHA what the good training
    reported (read back from MLflow), so the poor training is judged against it at step 40 and stopped there (a
    fresh ASHA would let the first training at a rung go on). Its training run ends FINISHED with its metrics up to
    step 40 and the tags; its two trials (two samplers share its model) are recorded stopped, not evaluated, one by
    its own task and one by the driver; its model at step 40 is cached under the key of train.steps 40."""
    from orchestrator.keys import training_key
    from orchestrator.scheduler import stopped_config
    from orchestrator.sweepfile import load_sweep

    path = small_sweep(tmp_path / "asha.yaml", "asha", 60, max_concurrent=1,
                       grid={"train.lr": [3e-3, 1e-7], "sample.sampler": ["ancestral", "ddim"]})
    sweep = yaml.safe_load(open(path))
    sweep["base"]["sample"].update(n=32, batch_size=32, steps=5)
    sweep["base"]["eval"] = {"fid": True, "bpd": False, "extractor": "classifier", "classifier_steps": 30,
                             "cache_dir": str(tmp_path / "features"), "every": 20, "every_n": 32, "every_steps": 5}
    sweep["scheduler"] = {"name": "asha", "metric": "fid", "grace_period": 40, "reduction_factor": 2}
    yaml.safe_dump(sweep, open(path, "w"))
    proc = start(["sweep", path], tmp_path, server.uri)
    client = MlflowClient(server.uri)

    def poor_started():
        return [t for t in runs(client, "asha", "train") if t.data.params.get("train.lr") == "1e-07"]

    wait_for(poor_started, 400, proc, "the poor training started")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait(timeout=60)
    [good_evaluation] = [e for e in runs(client, "asha", "evaluate") if e.info.status == "FINISHED"]
    again = start(["resume", path], tmp_path, server.uri)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output[-3000:]
    assert "resuming: 1 of 4 trial(s) already finished" in output

    trainings = {t.data.params["train.lr"]: t for t in runs(client, "asha", "train")}
    good, poor = trainings["0.003"], trainings["1e-07"]
    assert good.info.status == poor.info.status == "FINISHED" and len(trainings) == 2
    assert "stopped_by" not in good.data.tags and "attempts" not in good.data.tags  # not trained again
    assert poor.data.tags["stopped_by"] == "asha" and poor.data.tags["stopped_at_step"] == "40"
    fid_poor = {m.step: m.value for m in client.get_metric_history(poor.info.run_id, "fid")}
    fid_good = {m.step: m.value for m in client.get_metric_history(good.info.run_id, "fid")}
    assert sorted(fid_good) == [20, 40, 60] and sorted(fid_poor) == [20, 40]  # its metrics up to the stop only
    assert max(m.step for m in client.get_metric_history(poor.info.run_id, "train_loss")) == 40
    assert fid_poor[40] > fid_good[40]  # why: the rung's cutoff was the replayed good training's FID

    evaluations = {e.data.tags["trial"]: e for e in runs(client, "asha", "evaluate")}
    assert len(evaluations) == 4 and all(e.info.status == "FINISHED" for e in evaluations.values())
    kept = evaluations[good_evaluation.data.tags["trial"]]
    assert kept.info.run_id == good_evaluation.info.run_id and kept.info.end_time == good_evaluation.info.end_time
    stopped = {name for name, e in evaluations.items() if "stopped_by" in e.data.tags}
    assert stopped == {name for name in evaluations if "train.lr=1e-07" in name}
    for name in stopped:
        assert "fid" not in evaluations[name].data.metrics and evaluations[name].data.metrics["train_steps"] == 40
    assert all("fid" in evaluations[name].data.metrics for name in set(evaluations) - stopped)
    assert "STOPPED" in output and "stopped early by the scheduler" in output
    assert "stopped by asha at step 40 of 60" in output

    # the model at the stop is cached under the key its weights have: the same trial with train.steps 40
    cache = ModelCache(str(tmp_path / "ray_results" / "models"))
    trial = next(t for t in load_sweep(path).trials if t.config.train.lr == 1e-7)
    key = training_key(stopped_config(trial.config, 40))
    assert poor.data.tags["stopped_model_key"] == key and cache.has(key)
    record = cache.model(key)
    assert record["steps"] == 40 and record["stopped"]["by"] == "asha" and record["run_id"] == poor.info.run_id
    assert not cache.has(poor.data.tags["training_hash"])  # never under the key of 60 steps
