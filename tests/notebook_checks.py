"""The notebook API (orchestrator.results, diffusion.pretrained) on a real finished sweep (real Ray, real MLflow
server while it runs), read afterwards with no tracking server running: the README's notebook section, results()
against MLflow's client, load_model from a run id and from a cache path, and its errors.

Run on the smoke sweep of tests/test_orchestrator.py, which imports these tests and gives the fixture ``finished``
(the finished sweep's directory): one sweep for both modules. ``SWEEP`` is its name; the README's block, written
for the demo, is run with the demo's name replaced by it."""
import json
import os
import re
import urllib.request

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator.results import artifact_path, load_model, results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = "smoke"


def assert_no_server(directory) -> None:
    """The sweep's local server is gone: its state file is emptied and its pid (if any) dead, its port closed."""
    text = (directory / "mlflow-server.json").read_text()
    state = json.loads(text) if text.strip() else {}
    if state:
        with pytest.raises(ProcessLookupError):
            os.kill(state["pid"], 0)
        with pytest.raises(OSError):
            urllib.request.urlopen(state["uri"] + "/health", timeout=2)


@pytest.fixture
def in_sweep_dir(finished, monkeypatch):
    monkeypatch.chdir(finished)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert_no_server(finished)
    return finished


def evaluation_runs(directory) -> dict:
    client = MlflowClient(f"sqlite:///{directory}/mlflow.db")
    experiment = client.get_experiment_by_name(SWEEP)
    runs = client.search_runs([experiment.experiment_id])
    return {r.info.run_id: r for r in runs if r.data.tags.get("stage") == "evaluate"}


def test_readme_notebook_section_runs_with_no_server(in_sweep_dir, capsys):
    """The README's notebook section runs as printed in the sweep's directory, no server running: the table, 16
    samples of the ddpm trial, their grid, and the grid the evaluation logged, read from mlartifacts/."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    block = re.search(r"<!-- notebook-sweep:begin -->\n```python\n(.*?)```\n<!-- notebook-sweep:end -->", readme,
                      re.S).group(1)
    assert 'results("ddpm_vs_ncsn")' in block
    block = block.replace('results("ddpm_vs_ncsn")', f'results("{SWEEP}")')
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert "kid_stderr" in capsys.readouterr().out
    assert len(scope["df"]) == 2 and scope["x"].shape == (16, 1, 8, 8)
    assert scope["grid"].size[0] > 0 and scope["logged"].format == "PNG"
    assert scope["model"].cfg.sample.sampler == "ancestral" and scope["model"].nfe == 20
    assert str(in_sweep_dir / "mlartifacts") in scope["logged"].filename
    assert_no_server(in_sweep_dir)


def test_results_are_what_mlflow_recorded(in_sweep_dir):
    """One row per trial, every metric equal to what MLflow's client reports for its run, params as numbers."""
    frame = results(SWEEP)
    runs = evaluation_runs(in_sweep_dir)
    assert sorted(frame.run_id) == sorted(runs) and sorted(frame.trial) == sorted(frame.trial.unique())
    assert sorted(frame.variant) == ["ddpm", "ncsn"] and set(frame.status) == {"FINISHED"}
    for _, row in frame.iterrows():
        run = runs[row["run_id"]]
        for name, value in run.data.metrics.items():
            assert row[name] == value, name
        assert {"fid", "fid_stderr", "kid", "kid_stderr", "kid_reference_stderr"} <= set(run.data.metrics)
        assert row["kid_stderr"] > 0 and row["seed"] == 0 and row["train.steps"] == 30
        assert row["sample.sampler"] == run.data.params["sample.sampler"]
        assert row["training_hash"] == run.data.tags["training_hash"]
    parent = frame.parent_run_id[0]
    assert results(parent).run_id.tolist() == frame.run_id.tolist()  # by the parent run's id too


def test_load_model_from_run_and_cache_path_and_the_evaluations_samples(in_sweep_dir):
    """The evaluation run, its training run and the cache entry give the same weights; the evaluation run's model
    draws the very samples the evaluation logged (its samples.png, pixel for pixel); the cache path's model, with
    the same sample options, the same samples."""
    ddpm = next(r for r in evaluation_runs(in_sweep_dir).values() if r.data.tags["variant"] == "ddpm")
    from_run = load_model(ddpm.info.run_id, device="cpu")
    from_training = load_model(ddpm.data.tags["training_run_id"], device="cpu")
    entry = in_sweep_dir / "ray_results" / "models" / ddpm.data.tags["training_hash"]
    from_path = load_model(str(entry / "ema.pt"), device="cpu")
    assert load_model(str(entry), device="cpu").step == from_path.step == 30
    for other in (from_training, from_path):
        for (name, a), (_, b) in zip(from_run.network.state_dict().items(), other.network.state_dict().items()):
            assert torch.equal(a, b), name
    assert from_training.cfg == from_run.cfg and from_run.cfg.sample.n == 64
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trial's worker (resources.cpu: 1)
    try:
        x = from_run.sample(from_run.cfg.sample.n)
        y = from_path.sample(16, seed=3, batch_size=from_run.cfg.sample.batch_size)
        z = from_run.sample(16, seed=3)
    finally:
        torch.set_num_threads(threads)
    logged = np.asarray(Image.open(artifact_path(ddpm.info.run_id, "samples.png")).convert("RGB"))
    drawn = np.asarray(from_run.image(x[: from_run.cfg.sample.grid]).convert("RGB"))
    assert logged.shape == drawn.shape and np.array_equal(logged, drawn)
    assert torch.equal(y, z) and not torch.equal(z, x[:16])
    fewer = from_run.sample(4, steps=5)
    assert from_run.nfe == 5 and fewer.shape == (4, 1, 8, 8) and from_run.cfg.sample.steps is None


def test_errors_name_the_bad_value(in_sweep_dir, tmp_path):
    run_id = next(iter(evaluation_runs(in_sweep_dir)))
    with pytest.raises(ValueError, match=r"source: no run 'no-such-run' in sqlite:///.*mlflow\.db.*accepted: an "
                                         r"MLflow run id"):
        load_model("no-such-run")
    with pytest.raises(ValueError, match=rf"source: '{tmp_path}' is not in a complete model-cache entry"):
        load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"run .* has no artifact 'nope.png' .*accepted: .*samples\.png"):
        artifact_path(run_id, "nope.png")
    with pytest.raises(ValueError, match=r"sweep: invalid value 'nope'; accepted: a sweep's name "
                                         rf"\(.*{SWEEP}"):
        results("nope")
    with pytest.raises(TypeError, match=r"sample options \['stepz'\] do not exist; accepted: .*steps"):
        load_model(run_id, device="cpu").sample(2, stepz=3)
    with pytest.raises(FileNotFoundError, match=r"tracking store .*nothing\.db does not exist"):
        results(SWEEP, tracking_uri=f"sqlite:///{tmp_path}/nothing.db")
