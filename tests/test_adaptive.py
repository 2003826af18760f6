"""Adaptive sweeps, through a real sweep (Ray Tune, a real MLflow server): FID during training (``eval.every``) and
a random search (the ``search`` section)."""
import glob
import json

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.cache import MODEL_FILE, ModelCache
from smallsweep import small_sweep
from test_faults import server  # noqa: F401  (the fixture: a tracking server per module)
from test_faults import runs, start

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


def test_an_asha_sweep_stops_a_poor_training_at_its_rung_and_says_so_in_mlflow(tmp_path, server):
    """ASHA on FID during training (rungs at steps 20 and 40 of 60, reduction factor 2), one trial at a time: the
    good learning rate trains first and sets each rung; the learning rate of 1e-7 (its network barely moves) is
    stopped at the first rung where its FID is worse than the good one's (at step 20 both are nearly untrained, so 20
    or 40). Its training run ends FINISHED with its metrics up to that step and the tags; its two trials (two samplers
    share the model) are recorded stopped, not evaluated, one by its own task and one by the driver; its model at
    that step is cached under the key of that config with train.steps at the step, and found there by it."""
    from orchestrator.keys import training_key
    from orchestrator.scheduler import stopped_config
    from orchestrator.sweepfile import load_sweep

    path = small_sweep(tmp_path / "asha.yaml", "asha", 60, max_concurrent=1,
                       grid={"train.lr": [2e-3, 1e-7], "sample.sampler": ["ancestral", "ddim"]})
    sweep = yaml.safe_load(open(path))
    sweep["base"]["sample"].update(n=32, batch_size=32, steps=5)
    sweep["base"]["eval"] = {"fid": True, "bpd": False, "extractor": "classifier", "classifier_steps": 30,
                             "cache_dir": str(tmp_path / "features"), "every": 20, "every_n": 32, "every_steps": 5}
    sweep["scheduler"] = {"name": "asha", "metric": "fid", "grace_period": 20, "reduction_factor": 2}
    yaml.safe_dump(sweep, open(path, "w"))
    proc = start(["sweep", path], tmp_path, server.uri)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]

    client = MlflowClient(server.uri)
    trainings = {t.data.params["train.lr"]: t for t in runs(client, "asha", "train")}
    good, poor = trainings["0.002"], trainings["1e-07"]
    assert good.info.status == poor.info.status == "FINISHED"
    assert "stopped_by" not in good.data.tags
    assert [m.step for m in sorted(client.get_metric_history(good.info.run_id, "fid"), key=lambda m: m.step)] == \
        [20, 40, 60]
    assert poor.data.tags["stopped_by"] == "asha" and poor.data.tags["stopped_at_step"] in ("20", "40")
    at = int(poor.data.tags["stopped_at_step"])
    fid_poor = {m.step: m.value for m in client.get_metric_history(poor.info.run_id, "fid")}
    assert sorted(fid_poor) == list(range(20, at + 1, 20))  # its metrics up to the stop, none after
    assert max(m.step for m in client.get_metric_history(poor.info.run_id, "train_loss")) == at
    fid_good = {m.step: m.value for m in client.get_metric_history(good.info.run_id, "fid")}
    assert fid_poor[at] > fid_good[at]  # why it was stopped: the rung's cutoff was the good trial's FID
    assert all(fid_poor[step] <= fid_good[step] for step in fid_poor if step < at)  # and why not before

    evaluations = {e.data.tags["trial"]: e for e in runs(client, "asha", "evaluate")}
    assert len(evaluations) == 4 and all(e.info.status == "FINISHED" for e in evaluations.values())
    stopped = {name for name, e in evaluations.items() if "stopped_by" in e.data.tags}
    assert stopped == {name for name in evaluations if "train.lr=1e-07" in name}
    for name in stopped:
        assert "fid" not in evaluations[name].data.metrics and evaluations[name].data.metrics["train_steps"] == at
    assert all("fid" in evaluations[name].data.metrics for name in set(evaluations) - stopped)
    assert "STOPPED" in output and "stopped early by the scheduler" in output
    assert f"stopped by asha at step {at} of 60" in output

    # the model at the stop is cached under the key its weights have: the same trial with train.steps at the stop
    cache = ModelCache(str(tmp_path / "ray_results" / "models"))
    trial = next(t for t in load_sweep(path).trials if t.config.train.lr == 1e-7)
    key = training_key(stopped_config(trial.config, at))
    assert poor.data.tags["stopped_model_key"] == key and cache.has(key)
    record = cache.model(key)
    assert record["steps"] == at and record["stopped"]["by"] == "asha" and record["run_id"] == poor.info.run_id
    assert not cache.has(poor.data.tags["training_hash"])  # never under the key of 60 steps
