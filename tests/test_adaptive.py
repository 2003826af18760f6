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
