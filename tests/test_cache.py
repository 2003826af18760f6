"""Train once, evaluate many: the training key, the sweep's training plan and the model cache (no Ray); the
cache's checksums and locks, and the local MLflow server shared by the sweeps of one directory."""
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch

from diffusion.config import TrialConfig
from diffusion.errors import ConfigError
from orchestrator.cache import ModelCache, likelihood_key
from orchestrator.cli import main
from orchestrator.keys import TRAINING_SECTIONS, training_key, training_spec
from orchestrator.runner import plan
from orchestrator.schema import SweepTrialConfig
from orchestrator.sweepfile import load_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def changed(cfg: TrialConfig, section: str, name: str, value) -> TrialConfig:
    copy = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
    assert getattr(getattr(copy, section), name) == value and getattr(getattr(cfg, section), name) != value
    return copy


def test_training_key_ignores_sampling_and_evaluation():
    cfg = SweepTrialConfig()  # the sweep's config: the library's sections and the orchestrator's resources
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
    # data-parallel training: the same steps up to rounding, not the same weights; 1 worker is the default
    sweep_cfg = SweepTrialConfig()
    assert training_key(changed(sweep_cfg, "resources", "workers", 1 + 1)) != training_key(sweep_cfg) == key
    assert training_spec(changed(sweep_cfg, "resources", "workers", 4))["data_parallel_workers"] == 4


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


# -- damaged entries: checksums ------------------------------------------------------------------------------

TINY = """name: tiny
base:
  data: {name: moons, n_points: 200}
  process: {name: vp, schedule: linear, T: 10}
  model: {arch: mlp, hidden: 16, depth: 2, parameterization: eps}
  train: {steps: 20, batch_size: 16, warmup: 0, log_every: 10, checkpoint_every: 10}
  sample: {n: 16, batch_size: 16, grid: 0}
  eval: {fid: false, bpd: false}
"""


def tiny_sweep(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return load_sweep(str(path))


def publish_checked(cache: ModelCache, key: str, record: dict) -> None:
    """A finished entry as the training stage publishes it: the weights, then the record with their checksum."""
    os.makedirs(os.path.dirname(cache.local(key, "ema.pt")), exist_ok=True)
    torch.save({"network": {"w": torch.arange(3.0)}, "step": 0}, cache.local(key, "ema.pt"))
    cache.write(key, "model.json", {**record, "files": {"ema.pt": cache.publish_file(key, "ema.pt")}})


def damaged(data: bytes, how: str) -> bytes:
    """``data`` cut in half, or with one bit of its middle byte flipped (the same size)."""
    middle = len(data) // 2
    return data[:middle] if how == "truncate" else data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:]


def damage(path, how: str) -> None:
    """Damage a file in place, as a failing disk or an interrupted copy would (or delete it)."""
    if how == "delete":
        os.remove(path)
        return
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(damaged(data, how))


@pytest.mark.parametrize("how, problem", [("truncate", "size "), ("flip", "sha256 mismatch"),
                                          ("delete", "missing")])
def test_damaged_weights_are_reported_and_the_model_trained_again(tmp_path, capsys, how, problem):
    """model.json records the sha256 and size of ema.pt. An entry whose ema.pt no longer matches is not trusted
    (it would fail every later evaluation): reported naming the entry and the file, invalidated, planned for
    training again."""
    sweep = tiny_sweep(tmp_path)
    cache = ModelCache(str(tmp_path / "models"))
    key = plan(sweep, cache)[0].key
    publish_checked(cache, key, {"run_id": "r"})
    cache.write(key, "likelihood-x.json", {"metrics": {}})
    assert [g.cached for g in plan(sweep, cache)] == [True]
    assert cache.model(key)["files"]["ema.pt"]["size"] == os.path.getsize(cache.local(key, "ema.pt"))
    damage(cache.local(key, "ema.pt"), how)
    assert [g.cached for g in plan(sweep, cache)] == [False]
    err = capsys.readouterr().err
    assert f"model cache entry {key}: ema.pt is damaged ({problem}" in err and "; retraining" in err, err
    assert not cache.exists(key, "model.json") and not cache.exists(key, "likelihood-x.json")  # invalidated
    assert not cache.has(key) and capsys.readouterr().err == ""  # reported once


def test_damaged_weights_on_an_object_store(s3, tmp_path, capsys):
    """The same check on an S3 bucket: another node (its own staging copy) downloads ema.pt and checks it."""
    root = f"s3://{s3}/sweeps/models"
    cache = ModelCache(root, staging=str(tmp_path / "here"))
    publish_checked(cache, "k", {"run_id": "r"})
    other = ModelCache(root, staging=str(tmp_path / "there"))
    assert other.has("k")
    fs, remote = cache.fs[0], cache._remote("k", "ema.pt")
    with fs.open_input_stream(remote) as stream:
        data = stream.read()
    with fs.open_output_stream(remote) as stream:
        stream.write(damaged(data, "flip"))
    assert not other.has("k") and not cache.exists("k", "model.json")
    assert "model cache entry k: ema.pt is damaged (sha256 mismatch); retraining" in capsys.readouterr().err


@pytest.mark.parametrize("how, recorded", [("flip", True), ("truncate", False)])
def test_damaged_checkpoint_is_reported_and_training_starts_from_step_zero(tmp_path, capsys, how, recorded):
    """A resumed training checks the checkpoint against its checksum (checkpoint.json), or, without one, finds it
    does not load: it warns naming the entry, removes it and trains from step 0 instead of failing every attempt."""
    from diffusion.data import load_dataset
    from orchestrator.fit import resume_trainer

    cfg = tiny_sweep(tmp_path).trials[0].config
    key, cache, cpu = training_key(cfg), ModelCache(str(tmp_path / "models")), torch.device("cpu")
    dataset = load_dataset(cfg.data)
    trained, restored, problem = resume_trainer(cfg, key, cache, dataset, cpu, resume=True)
    assert (trained.step, restored, problem) == (0, False, None)  # nothing to resume from
    trained.train(on_checkpoint=lambda step: cache.save_checkpoint(key, trained.save))
    resumed, restored, problem = resume_trainer(cfg, key, cache, dataset, cpu, resume=True)
    assert (resumed.step, restored, problem) == (20, True, None)
    if not recorded:  # a checkpoint without its checksum (written before checksums were) is tried
        cache.remove(key, "checkpoint.json")
    damage(cache.local(key, "checkpoint.pt"), how)
    fresh, restored, problem = resume_trainer(cfg, key, cache, dataset, cpu, resume=True)
    expected = "sha256 mismatch" if recorded else "cannot be loaded"
    assert fresh.step == 0 and not restored and problem.startswith(expected)
    err = capsys.readouterr().err
    assert f"model cache entry {key}: checkpoint.pt is damaged ({expected}" in err and "training from step 0" in err
    assert not cache.exists(key, "checkpoint.pt") and not cache.exists(key, "checkpoint.json")
    fresh.train()  # from scratch: the same trajectory (every random state is seeded)
    for a, b in zip(trained.ema.module.state_dict().values(), fresh.ema.module.state_dict().values()):
        assert torch.equal(a, b)


def test_damaged_cached_network_is_trained_again(tmp_path, capsys):
    """A VAE or guidance classifier entry (trial._cached_stage) records its weights' checksum too."""
    from orchestrator.stages import cached_stage as _cached_stage

    cache, fits = ModelCache(str(tmp_path)), []

    def fit():
        fits.append(1)
        torch.manual_seed(len(fits))
        return torch.nn.Linear(3, 2), {"vae_loss": 1.0}

    def stage(run_id):
        return _cached_stage(cache, "vae", {"spec": 1}, run_id, fit, lambda record: torch.nn.Linear(3, 2),
                             torch.device("cpu"), "vae_seconds")

    first, _, entry = stage("run-1")
    second, record, _ = stage("run-2")
    assert len(fits) == 1 and record["computed_by_run"] == "run-1" and torch.equal(first.weight, second.weight)
    damage(cache.local(entry, "vae.pt"), "flip")
    _, record, _ = stage("run-3")
    assert len(fits) == 2 and record["computed_by_run"] == "run-3"
    assert f"model cache entry {entry}: vae.pt is damaged (sha256 mismatch); training it again" in \
        capsys.readouterr().err
    assert stage("run-4")[1]["computed_by_run"] == "run-3"


# -- locks: one training of a model at a time --------------------------------------------------------------

HOLD = """import sys, time
from orchestrator.cache import ModelCache
with ModelCache(sys.argv[1]).lock("k", "train", note="the other sweep"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_entry_lock_times_out_naming_a_live_holder_and_is_freed_by_its_death(tmp_path, monkeypatch):
    """The directory lock (flock): a waiter gives up after $ORCHESTRATOR_CACHE_LOCK_TIMEOUT with the entry and the
    holder in the message; a holder that dies (SIGKILL: no cleanup) frees it at once."""
    from orchestrator.locks import LOCK_TIMEOUT_ENV, LockTimeout

    cache = ModelCache(str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv(LOCK_TIMEOUT_ENV, "0.5")
        started = time.monotonic()
        with pytest.raises(LockTimeout) as error:
            with cache.lock("k", "train"):
                pass
        assert 0.5 <= time.monotonic() - started < 5
        message = str(error.value)
        assert "model cache entry k" in message and f"{socket.gethostname()}:{holder.pid}" in message
        assert "the other sweep" in message and LOCK_TIMEOUT_ENV in message
    finally:
        holder.kill()
        holder.wait()
    with cache.lock("k", "train", timeout=5):
        pass


def test_entry_lock_is_shared_by_threads_and_waits_for_its_holder(tmp_path):
    cache = ModelCache(str(tmp_path))
    held, release, order = threading.Event(), threading.Event(), []

    def first():
        with cache.lock("k", "train"):
            held.set()
            release.wait(10)
            order.append("first")

    thread = threading.Thread(target=first)
    thread.start()
    held.wait(10)
    threading.Timer(0.3, release.set).start()
    with cache.lock("k", "train", timeout=10):
        order.append("second")
    thread.join()
    assert order == ["first", "second"]


def plant_lock(cache: ModelCache, holder: dict) -> None:
    """Write the object-store lock of entry k as another process would have left it."""
    import json

    with cache.fs[0].open_output_stream(cache._remote("k", "train.lock")) as stream:
        stream.write(json.dumps(holder).encode())


def test_object_store_lock_is_taken_over_when_abandoned(s3, tmp_path, capsys):
    """On an object store the lock is an object with its holder and a heartbeat: a live holder's lock times the
    waiter out (naming the holder), while one whose heartbeat is older than ``stale`` seconds, or whose holder
    is a dead process of this host, is taken over; the holder's heartbeat keeps a long holding alive."""
    from orchestrator.locks import LockTimeout

    root = f"s3://{s3}/models"
    cache = ModelCache(root, staging=str(tmp_path / "here"))
    other = ModelCache(root, staging=str(tmp_path / "there"))  # another node: its own staging directory
    now = time.time()
    live = {"host": "elsewhere", "pid": 1, "since": now, "heartbeat": now, "token": "t", "note": "sweep x"}
    plant_lock(cache, live)
    held_by = r"model cache entry k: train.lock is held by elsewhere:1 \(since .*sweep x"
    with pytest.raises(LockTimeout, match=held_by):
        with cache.lock("k", "train", timeout=1.5, stale=60):
            pass
    plant_lock(cache, {**live, "heartbeat": now - 120})  # its holder stopped beating two minutes ago
    with cache.lock("k", "train", timeout=10, stale=60):
        assert cache._lock_object("k", "train")["pid"] == os.getpid()
    assert "taking over train.lock, abandoned by elsewhere:1" in capsys.readouterr().err
    assert cache._lock_object("k", "train") is None  # released
    dead = subprocess.Popen(["true"])
    dead.wait()
    plant_lock(cache, {**live, "host": socket.gethostname(), "pid": dead.pid})  # fresh heartbeat, dead process
    with cache.lock("k", "train", timeout=10, stale=600):
        pass
    # held for 8 s, longer than the waiter's ``stale`` of 6 s: only the holder's heartbeat (every 3 / 4 s) keeps it
    # held. The waiter allows 6 s since the last beat, so that a beat delayed by a loaded machine does not lapse
    # (a waiter allowing the holder's own 3 s saw it lapse once under the full suite, 1 s once before)
    with cache.lock("k", "train", stale=3.0):
        time.sleep(8)
        with pytest.raises(LockTimeout):
            with other.lock("k", "train", timeout=1.0, stale=6.0):
                pass


# -- one local MLflow server per directory ------------------------------------------------------------------

ATTACH = """import sys, time
from orchestrator.tracking import LocalServer
print(LocalServer(sys.argv[1]).start().uri, flush=True)
time.sleep(600)
"""


def answers(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def test_one_local_server_per_directory(tmp_path):
    """LocalServer: the users of one directory share one server (one mlflow.db, migrated once), which runs until
    the last of them leaves; a user that dies leaves too (the kernel drops its lock), and the server it started
    keeps serving the others."""
    from orchestrator.tracking import LocalServer

    starter = subprocess.Popen([sys.executable, "-c", ATTACH, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": ROOT}, start_new_session=True)
    users, uri = [], ""
    try:
        uri = starter.stdout.readline().strip()
        assert uri.startswith("http://127.0.0.1:")
        users = [LocalServer(str(tmp_path)).start(), LocalServer(str(tmp_path)).start()]
        assert [user.uri for user in users] == [uri, uri]
        starter.kill()
        starter.wait()
        assert answers(uri)  # its starter died: the server serves the others
        users[0].stop()
        users[0].stop()  # once is enough
        assert answers(uri)
        users[1].stop()
        assert not answers(uri)  # the last user stopped it
        assert (tmp_path / "mlflow-server.json").read_text() == "" and (tmp_path / "mlflow.db").exists()
    finally:
        if starter.poll() is None:
            starter.kill()
        for user in users:
            user.stop()
        if uri and answers(uri):  # a failed test leaves no server behind
            import json
            import signal

            os.killpg(json.loads((tmp_path / "mlflow-server.json").read_text())["pid"], signal.SIGTERM)
