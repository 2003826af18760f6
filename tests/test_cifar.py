"""CIFAR-10 at real scale, as far as a CPU allows: the papers' configurations (sweeps/cifar10_*.yaml) sized by
``--dry-run``, and the CIFAR-10 model, shrunk to 32 channels and a few steps, through a real sweep (Ray Tune, an
MLflow server on loopback) on files in torchvision's CIFAR-10 format and on a folder of 32 x 32 images, with FID
against clean-fid's published CIFAR-10 statistics as the shipped sweep measures it. Nothing is downloaded: the test
writes the data set, a stand-in for clean-fid's Inception network and the statistics."""
import os
import pickle

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from diffusion.config import DataConfig
from diffusion.data import load_dataset
from diffusion.errors import ConfigError
from test_inception import _TinyInception, write_pngs
from test_orchestrator import ROOT, child_runs, orchestrator

CIFAR10_DDPM = os.path.join(ROOT, "sweeps", "cifar10_ddpm.yaml")
CIFAR10_NCSN = os.path.join(ROOT, "sweeps", "cifar10_ncsn.yaml")
LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root, per_batch: int = 8, test: int = 24, seed: int = 0) -> np.ndarray:
    """CIFAR-10's python version as torchvision reads it (``<root>/cifar-10-batches-py``: data_batch_1..5 and
    test_batch, pickled dicts of uint8 rows [N, 3072] (red plane, green, blue, each row-major) and labels, and
    batches.meta with the label names), of smooth random images. Returns the training images [N, 32, 32, 3]."""
    directory = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(directory)
    rng = np.random.default_rng(seed)

    def batch(n):
        coarse = rng.random((n, 3, 4, 4)) * 255
        images = coarse.repeat(8, axis=2).repeat(8, axis=3) + rng.normal(0, 10, (n, 3, 32, 32))
        return {"data": np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072),
                "labels": [int(label) for label in rng.integers(0, 10, n)]}

    training = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        content = batch(test if name == "test_batch" else per_batch)
        if name != "test_batch":
            training.append(content["data"])
        with open(os.path.join(directory, name), "wb") as handle:
            pickle.dump(content, handle)
    with open(os.path.join(directory, "batches.meta"), "wb") as handle:
        pickle.dump({"label_names": LABELS}, handle)
    return np.concatenate(training).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def test_cifar10_files_are_read_by_torchvision_and_checked_unless_told(tmp_path):
    pixels = write_cifar10(tmp_path, per_batch=4, test=6)
    data = load_dataset(DataConfig(name="cifar10", root=str(tmp_path), verify=False))
    assert data.train.shape == (20, 3, 32, 32) and data.test.shape == (6, 3, 32, 32) and data.num_classes == 10
    expected = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1  # uint8 -> [-1, 1]
    assert torch.allclose(data.train, expected) and data.levels == 256
    # with the published checksums (the default) these files are not CIFAR-10
    with pytest.raises(ConfigError) as info:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert info.value.key == "data.name" and "data.verify: false" in str(info.value)


def test_dry_run_sizes_the_papers_networks(tmp_path, monkeypatch, capsys):
    """``--dry-run`` prints the parameter count of Ho et al.'s CIFAR-10 model (35.7M) and the FLOPs of a
    training step, without the data set (data.download would fetch it) and without downloading anything."""
    from orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    for path in (CIFAR10_DDPM, CIFAR10_NCSN):
        assert main(["sweep", "--dry-run", path, "base.resources.cpu=1", "base.resources.gpu=0"]) == 0
        out = capsys.readouterr().out
        assert "35.7M parameters (35,746,307); 4.78TFLOP per training step of 128 x 3x32x32" in out
        assert "data cifar10: not in data yet; the sweep downloads it first" in out
    # a sweep sized for a GPU node is described even where it cannot run, then refused with status 2
    if not torch.cuda.is_available():
        assert main(["sweep", "--dry-run", CIFAR10_DDPM, "base.resources.cpu=1", "base.resources.gpu=1"]) == 2
        out, err = capsys.readouterr()
        assert "35.7M parameters" in out and err.startswith("orchestrator: error: base.resources.gpu: invalid value 1.0")
    assert os.listdir(tmp_path) == []  # nothing downloaded, nothing written
    # attention at a side the network does not have is refused before anything starts, naming the key
    assert main(["sweep", "--dry-run", CIFAR10_DDPM, "base.model.attention_resolutions=[12]"]) == 2
    assert capsys.readouterr().err.startswith(
        "orchestrator: error: base.model.attention_resolutions: invalid value [12]; accepted: sides of this U-Net's "
        "feature maps, [32, 16, 8, 4]")


def small_cifar10_sweep(tmp_path) -> str:
    """sweeps/cifar10_ddpm.yaml with 32 channels, 2 training steps and 10 sampling steps, on CIFAR-10 files and
    on a folder of PNGs written in ``tmp_path``, with a stand-in Inception network and published statistics."""
    write_cifar10(tmp_path / "data")
    write_pngs(tmp_path / "pngs", 30, seed=1, brightness=1.0)  # 16 x 16 PNGs, resized to 32 x 32 by image_folder
    inception = tmp_path / "cache" / "inception"
    (inception / "stats").mkdir(parents=True)
    torch.jit.save(torch.jit.script(_TinyInception()), str(inception / "inception-2015-12-05.pt"))
    mu, sigma = np.zeros(2048), np.eye(2048) * 1e-2  # the stand-in's features: 4 statistics, 2044 zeros
    mu[:4], sigma[:4, :4] = [0.0, 0.0, 0.0, 0.3], np.diag([0.1, 0.1, 0.1, 0.05])
    np.savez(inception / "stats" / "cifar10_clean_train_32.npz", mu=mu, sigma=sigma)

    sweep = yaml.safe_load(open(CIFAR10_DDPM))
    base = sweep["base"]
    base["data"].update(root=str(tmp_path / "data"), download=False, verify=False)
    base["model"]["channels"] = 32
    base["train"].update(steps=2, batch_size=8, warmup=0, log_every=1, checkpoint_every=0)
    base["sample"].update(n=24, batch_size=24, grid=16, steps=10)
    base["eval"].update(cache_dir=str(tmp_path / "cache"), download=False, bpd=False)
    base["resources"] = {"cpu": 1, "gpu": 0}
    # the folder's trial trains and samples through the same path; FID is measured once, on CIFAR-10 (clean-fid's
    # 2,048 x 2,048 matrix square roots are most of a trial's time here)
    sweep["variants"] = {"cifar10": {}, "folder": {"data": {"name": "image_folder", "root": str(tmp_path / "pngs"),
                                                            "image_size": 32}, "eval": {"fid": False}}}
    path = tmp_path / "cifar10_small.yaml"
    path.write_text(yaml.safe_dump({**sweep, "name": "cifar10_small"}))
    return str(path)


@pytest.mark.integration
def test_cifar10_configuration_runs_through_a_real_sweep(tmp_path, server):
    """sweeps/cifar10_ddpm.yaml with 32 channels, 2 training steps and 10 sampling steps, through Ray and MLflow:
    on CIFAR-10 files read by torchvision, with FID and its stderr against clean-fid's published CIFAR-10 training
    statistics (here: a stand-in network and statistics), and on a folder of PNGs resized to 32 x 32."""
    path = small_cifar10_sweep(tmp_path)
    result = orchestrator(["sweep", path], cwd=tmp_path, env_extra={"MLFLOW_TRACKING_URI": server.uri},
                          timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _, runs = child_runs(MlflowClient(server.uri), "cifar10_small")
    assert sorted(run.data.tags["trial"] for run in runs) == ["cifar10-seed=0", "folder-seed=0"]
    client = MlflowClient(server.uri)
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags.get("failure_reason")
        metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
        assert params["model.layout"] == "ddpm" and params["model.attention_resolutions"] == "[16]"
        assert params["model.resample"] == "conv" and params["model.channels"] == "32"
        assert tags["samples_finite"] == "True" and metrics["sample_nfe"] == 10
        assert "samples.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
        if params["data.name"] == "cifar10":
            assert metrics["fid"] > 0 and metrics["fid_stderr"] > 0
            assert tags["fid.reference"] == "cleanfid:cifar10/train/32/clean"
        else:
            assert params["data.name"] == "image_folder" and "fid" not in metrics
