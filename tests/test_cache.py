"""Train once, evaluate many: the training key, the sweep's training plan and the model cache (no Ray)."""
import dataclasses
import os
import threading
import time

import pytest
import torch

from diffusion.config import TRAINING_SECTIONS, TrialConfig, training_key, training_spec
from diffusion.errors import ConfigError
from orchestrator.cache import ModelCache, likelihood_key
from orchestrator.cli import main
from orchestrator.runner import plan
from orchestrator.sweepfile import load_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def changed(cfg: TrialConfig, section: str, name: str, value) -> TrialConfig:
    copy = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
    assert getattr(getattr(copy, section), name) == value and getattr(getattr(cfg, section), name) != value
    return copy


def test_training_key_ignores_sampling_and_evaluation():
    cfg = TrialConfig()
    key = training_key(cfg)
    assert len(key) == 16 and training_key(TrialConfig()) == key
    for section, name, value in [("sample", "sampler", "ddim"), ("sample", "steps", 10), ("sample", "eta", 1.0),
                                 ("sample", "spacing", "karras"), ("sample", "n", 7), ("eval", "bpd_n", 3),
                                 ("eval", "ode_rtol", 1e-2), ("eval", "extractor", "raw"), ("resources", "cpu", 2.0),
                                 ("train", "log_every", 7), ("train", "checkpoint_every", 3)]:
        assert training_key(changed(cfg, section, name, value)) == key, (section, name)


def test_training_key_changes_with_everything_that_affects_training():
    cfg = TrialConfig()
    key = training_key(cfg)
    variations = [("data", "name", "moons"), ("process", "schedule", "cosine"), ("process", "T", 10),
                  ("model", "parameterization", "v"), ("model", "channels", 8), ("loss", "weighting", "elbo"),
                  ("train", "steps", 10), ("train", "lr", 1e-3), ("train", "batch_size", 7)]
    keys = {training_key(changed(cfg, *v)) for v in variations} | {training_key(dataclasses.replace(cfg, seed=1))}
    assert key not in keys and len(keys) == len(variations) + 1
    spec = training_spec(cfg)
    assert set(spec) == {*TRAINING_SECTIONS, "seed", "version"} and "log_every" not in spec["train"]


def test_plan_groups_trials_by_model_and_dry_run_shows_the_counts(tmp_path, capsys):
    sweep = load_sweep(os.path.join(ROOT, "sweeps", "samplers.yaml"))
    cache = ModelCache(str(tmp_path / "models"))
    groups = plan(sweep, cache)
    assert len(groups) == 1 and len(groups[0].trials) == len(sweep.trials) == 10 and not groups[0].cached
    sweep = load_sweep(os.path.join(ROOT, "sweeps", "ddpm_vs_ncsn.yaml"))
    groups = plan(sweep, cache)
    assert [len(g.trials) for g in groups] == [1, 1, 1, 1]
    # a finished entry is reused, unless the cache is not to be used
    key = groups[0].key
    publish(cache, key, {"run_id": "r"})
    assert [g.cached for g in plan(sweep, cache)] == [True, False, False, False]
    assert not any(g.cached for g in plan(sweep, cache, use_cache=False))

    path = tmp_path / "grid.yaml"
    path.write_text(f"name: g\nstorage: {tmp_path / 'store'}\nbase: {{train: {{steps: 10}}}}\n"
                    "grid: {sample.sampler: [ancestral, ddim, pc], seed: [0, 1]}\n")
    assert main(["sweep", "--dry-run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "training: 2 model(s) to train, 0 reused from the cache" in out and "6 evaluation(s)" in out
    assert not (tmp_path / "store").exists()  # a dry run writes nothing


def publish(cache: ModelCache, key: str, record: dict, step: int = 0) -> None:
    """A finished entry: weights first, the record last (as the training stage writes them)."""
    os.makedirs(os.path.dirname(cache.local(key, "ema.pt")), exist_ok=True)
    torch.save({"network": {"w": torch.arange(3.0)}, "step": step}, cache.local(key, "ema.pt"))
    cache.put(key, "ema.pt")
    cache.write(key, "model.json", record)


def test_credentials_in_a_storage_uri_are_refused(tmp_path, capsys):
    for storage in ("s3://bucket/runs?access_key=AKIA&secret_key=hunter2", "s3://AKIA:hunter2@bucket/runs"):
        path = tmp_path / "s3.yaml"
        path.write_text(f"name: s\nstorage: '{storage}'\nbase: {{train: {{steps: 10}}}}\n")
        assert main(["validate", str(path)]) == 2
        err = capsys.readouterr().err
        assert "storage" in err and "AWS_ACCESS_KEY_ID" in err and "hunter2" not in err and "Traceback" not in err


def test_unreachable_object_store_is_a_clear_error(tmp_path, capsys, monkeypatch):
    from orchestrator.tracking import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    path = tmp_path / "s3.yaml"
    path.write_text("name: s\nstorage: s3://bucket/runs\nbase: {train: {steps: 10}}\n")
    assert main(["sweep", "--dry-run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "storage" in err and "s3://bucket/runs" in err and "reachable" in err and "Traceback" not in err


def exercise(cache: ModelCache) -> None:
    """What the trial pipeline does with an entry, the same on every kind of storage."""
    assert not cache.has("k") and cache.model("k") is None and cache.training_run("k") is None
    cache.write("k", "run.json", {"run_id": "abc"})
    cache.write("k", "model.json", {"run_id": "abc", "steps": 5})
    assert not cache.has("k")  # no weights yet: not an entry
    publish(cache, "k", {"run_id": "abc", "steps": 5}, step=5)
    assert cache.has("k") and cache.model("k")["steps"] == 5 and cache.training_run("k") == {"run_id": "abc"}
    fetched = cache.fetch("k", "ema.pt")
    assert torch.equal(torch.load(fetched, weights_only=True)["network"]["w"], torch.arange(3.0))
    assert cache.fetch("k", "checkpoint.pt") is None and cache.read("k", "missing.json") is None
    cache.write("k", "likelihood-x.json", {"metrics": {"bpd_ode": float("nan")}})
    assert cache.read("k", "likelihood-x.json")["metrics"]["bpd_ode"] != 0  # NaN survives
    assert not [n for n in cache.names("k") if n.startswith(".tmp-")]
    assert {"ema.pt", "model.json", "run.json", "likelihood-x.json"} <= set(cache.names("k"))
    cache.invalidate("k")
    assert not cache.has("k") and cache.training_run("k") is None
    assert not cache.exists("k", "likelihood-x.json")  # what was measured on the old model goes too
    cache.invalidate("missing")  # nothing to do


def test_model_cache_entries_are_complete_or_absent(tmp_path):
    exercise(ModelCache(str(tmp_path)))
    assert ModelCache(f"file://{tmp_path}").root == str(tmp_path)


def test_model_cache_on_an_object_store(s3, tmp_path):
    """The same operations on an S3 bucket (a real S3 server on loopback, credentials from the environment)."""
    cache = ModelCache(f"s3://{s3}/sweeps/models", staging=str(tmp_path / "staging"))
    cache.check()
    exercise(cache)
    assert cache.local("k", "ema.pt").startswith(str(tmp_path / "staging"))
    # another node (its own staging directory) sees what this one published
    publish(cache, "j", {"run_id": "r", "steps": 7})
    other = ModelCache(f"s3://{s3}/sweeps/models", staging=str(tmp_path / "elsewhere"))
    assert other.model("j")["steps"] == 7 and other.fetch("j", "ema.pt").startswith(str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match="reachable"):
        ModelCache("s3://no-such-bucket/models", staging=str(tmp_path)).check()


def test_likelihood_key_follows_the_likelihood_options_only():
    cfg = TrialConfig()
    key = likelihood_key(cfg)
    assert likelihood_key(changed(cfg, "sample", "sampler", "ddim")) == key
    assert likelihood_key(changed(cfg, "eval", "fid", False)) == key
    for section, name, value in [("eval", "bpd_n", 3), ("eval", "ode_rtol", 1e-2), ("eval", "divergence", "exact"),
                                 ("eval", "dequant_draws", 2), ("sample", "batch_size", 3)]:
        assert likelihood_key(changed(cfg, section, name, value)) != key


def test_lock_serializes_evaluators_of_one_model(tmp_path):
    cache = ModelCache(str(tmp_path))
    inside, overlaps = [], []

    def worker():
        with cache.lock("k", "likelihood-x"):
            if inside:
                overlaps.append(True)
            inside.append(1)
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not overlaps


@pytest.mark.parametrize("learned", [False, True])
def test_load_ema_restores_the_trained_model(tmp_path, learned):
    from diffusion.config import DataConfig, LossConfig, ModelConfig, ProcessConfig, TrainConfig
    from diffusion.data import load_dataset
    from diffusion.training import Trainer

    process = ProcessConfig(schedule="learned", T="continuous") if learned else ProcessConfig(T=10)
    cfg = TrialConfig(data=DataConfig(name="moons", n_points=80), process=process,
                      model=ModelConfig(arch="mlp", hidden=16, depth=2), loss=LossConfig(weighting="elbo" if learned else "simple"),
                      train=TrainConfig(steps=5, batch_size=8, warmup=0, log_every=5, checkpoint_every=0))
    dataset = load_dataset(cfg.data)
    trained = Trainer(cfg, dataset, torch.device("cpu"))
    trained.train()
    trained.save_ema(str(tmp_path / "ema.pt"))
    fresh = Trainer(dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, sampler="ddim", steps=5)), dataset,
                    torch.device("cpu"))
    fresh.load_ema(str(tmp_path / "ema.pt"))
    assert fresh.step == 5
    for a, b in zip(trained.ema.module.state_dict().values(), fresh.ema.module.state_dict().values()):
        assert torch.equal(a, b)
    if learned:
        t = torch.linspace(0, 1, 5, dtype=torch.float64)
        assert torch.equal(trained.process.schedule(t), fresh.process.schedule(t))
    x, _ = fresh.sample(4, seed=1)
    assert x.shape == (4, 2) and torch.isfinite(x).all()
