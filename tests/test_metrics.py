"""Tests of diffusion.metrics: Frechet numerics, feature extractors and compute_fid (offline, < 60 s)."""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
import time

import numpy as np
import pytest
import torch

from diffusion import metrics
from diffusion.config import DataConfig, EvalConfig
from diffusion.data import Dataset, load_dataset
from diffusion.errors import ConfigError

CPU = torch.device("cpu")
TEST_CLASSIFIER_STEPS = 300  # reaches ~98% test accuracy on digits in a few seconds


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch and one BLAS thread: these small networks and 128 x 128 matrix square roots gain
    little from two, and lose a lot when other processes share the cores (threads wait for each other)."""
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


def diagonal_gaussian_fid(mu1, var1, mu2, var2) -> float:
    """Closed form for diagonal covariances: ||mu1 - mu2||^2 + sum(s1 + s2 - 2 sqrt(s1 s2))."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2)))


# --------------------------------------------------------------------------------------------------
# Frechet distance


def test_frechet_exact_statistics_match_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([2.0, 1.0, 0.25, 0.5])
    got = metrics.frechet_from_stats(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(diagonal_gaussian_fid(mu1, var1, mu2, var2), rel=1e-9, abs=1e-9)
    # identical Gaussians are at distance zero
    assert metrics.frechet_from_stats(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_large_samples_match_closed_form():
    rng = np.random.default_rng(0)
    n, mu1, mu2 = 100_000, np.array([0.0, 1.0, -1.0]), np.array([0.5, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.5]), np.array([2.0, 1.0, 0.5])
    a = mu1 + np.sqrt(var1) * rng.standard_normal((n, 3))
    b = mu2 + np.sqrt(var2) * rng.standard_normal((n, 3))
    exact = diagonal_gaussian_fid(mu1, var1, mu2, var2)
    # Delta method: the mean term ||mu1_hat - mu2_hat||^2 has standard deviation
    # sqrt(4 sum dmu^2 (s1 + s2) / n); each estimated variance has sd s sqrt(2 / n) and enters with
    # derivative (1 - sqrt(s_other / s)). Off-diagonal covariance noise and the bias
    # sum(s1 + s2) / n are O(D^2 max(s) / n). Allow 5 standard deviations plus that.
    dmu = mu1 - mu2
    var_mean_term = 4 * np.sum(dmu**2 * (var1 + var2)) / n
    var_cov_term = np.sum((1 - np.sqrt(var2 / var1)) ** 2 * 2 * var1**2 / n
                          + (1 - np.sqrt(var1 / var2)) ** 2 * 2 * var2**2 / n)
    tolerance = 5 * math.sqrt(var_mean_term + var_cov_term) + 3**2 * 4.0 / n * 10
    assert abs(metrics.frechet_distance(a, b) - exact) < tolerance
    assert tolerance < 0.05 * exact  # the check is meaningful


def test_frechet_matches_cleanfid_on_independently_computed_stats():
    from cleanfid.fid import fid_from_feats, frechet_distance as cleanfid_frechet

    rng = np.random.default_rng(1)
    mixing = rng.standard_normal((16, 16))
    a = rng.standard_normal((600, 16)) @ mixing
    b = rng.standard_normal((500, 16)) @ mixing * 1.3 + 0.2
    # mean and covariance a second way: torch, float64
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    expected = cleanfid_frechet(ta.mean(0).numpy(), torch.cov(ta.T).numpy(), tb.mean(0).numpy(), torch.cov(tb.T).numpy())
    assert metrics.frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-7)
    assert metrics.frechet_distance(a, b) == pytest.approx(float(fid_from_feats(a, b)), rel=1e-9)
    mu, sigma = metrics.feature_stats(a)
    np.testing.assert_allclose(mu, ta.mean(0).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, torch.cov(ta.T).numpy(), rtol=1e-10, atol=1e-10)


def test_same_distribution_gives_near_zero_fid():
    rng = np.random.default_rng(2)
    mixing = rng.standard_normal((8, 8)) / 3
    a = rng.standard_normal((20_000, 8)) @ mixing
    b = rng.standard_normal((20_000, 8)) @ mixing
    shifted = rng.standard_normal((20_000, 8)) @ mixing + 1.0  # ||shift||^2 = 8
    same, different = metrics.frechet_distance(a, b), metrics.frechet_distance(a, shifted)
    assert different == pytest.approx(8.0, rel=0.05)
    assert 0 <= same < 0.01 * different


def test_feature_stats_rejects_too_few_examples():
    with pytest.raises(ValueError):
        metrics.feature_stats(np.zeros((1, 3)))


# --------------------------------------------------------------------------------------------------
# classifier


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(DataConfig(name="digits"))


@pytest.fixture(scope="module")
def classifier_cfg(tmp_path_factory) -> EvalConfig:
    return EvalConfig(classifier_steps=TEST_CLASSIFIER_STEPS, cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def trained(digits, classifier_cfg):
    """The first get_extractor call: trains the classifier and writes the cache file."""
    start = time.perf_counter()
    result = metrics.get_extractor("classifier", digits, classifier_cfg, CPU)
    return result, time.perf_counter() - start


def test_classifier_trains_accurate_and_caches(digits, classifier_cfg, trained):
    (name, extract, info), first_seconds = trained
    assert name == "classifier" and not info["loaded_from_cache"]
    assert info["accuracy"] > 0.90
    path = metrics.classifier_path(digits, classifier_cfg)
    assert info["path"] == path and os.path.isfile(path)
    assert os.path.basename(path).startswith("classifier-digits-")
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp-")]  # temp file replaced
    saved = torch.load(path, weights_only=True)
    assert saved["meta"]["accuracy"] == info["accuracy"] and saved["meta"]["steps"] == TEST_CLASSIFIER_STEPS

    start = time.perf_counter()
    name2, extract2, info2 = metrics.get_extractor("classifier", digits, classifier_cfg, CPU)
    second_seconds = time.perf_counter() - start
    assert info2["loaded_from_cache"] and info2["accuracy"] == info["accuracy"]
    assert second_seconds < 0.2 * first_seconds
    features = extract(digits.test)
    assert features.shape == (len(digits.test), 128) and features.dtype == np.float64
    np.testing.assert_array_equal(features, extract2(digits.test))


def test_classifier_accuracy_is_what_the_model_scores(digits, classifier_cfg, trained):
    model, meta = metrics.load_or_train_classifier(digits, classifier_cfg, CPU)
    with torch.no_grad():
        predicted = model(digits.test).argmax(1)
    assert meta["accuracy"] == pytest.approx((predicted == digits.test_labels).double().mean().item(), abs=1e-12)


def test_classifier_cache_key_depends_on_steps_and_data(digits, classifier_cfg):
    base = metrics.classifier_path(digits, classifier_cfg)
    assert metrics.classifier_path(digits, dataclasses.replace(classifier_cfg, classifier_steps=301)) != base
    changed = dataclasses.replace(digits, train=digits.train.clone())
    changed.train[0, 0, 0, 0] += 0.5
    assert metrics.classifier_path(changed, classifier_cfg) != base


def test_classifier_training_is_deterministic_and_leaves_global_rng_alone(digits, tmp_path):
    state = torch.get_rng_state()
    models = [
        metrics.load_or_train_classifier(digits, EvalConfig(classifier_steps=15, cache_dir=str(tmp_path / d)), CPU)[0]
        for d in ("a", "b")
    ]
    assert torch.equal(state, torch.get_rng_state())
    for (key, p), (_, q) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        assert torch.equal(p, q), key


def test_classifier_requires_labelled_images(digits, tmp_path):
    cfg = EvalConfig(classifier_steps=5, cache_dir=str(tmp_path))
    unlabelled = dataclasses.replace(digits, train_labels=None, test_labels=None, num_classes=None)
    with pytest.raises(ConfigError, match="has no labels") as error:
        metrics.get_extractor("classifier", unlabelled, cfg, CPU)
    assert error.value.key == "eval.extractor" and error.value.accepted == "inception or raw"
    points = load_dataset(DataConfig(name="moons", n_points=200))
    with pytest.raises(ConfigError, match="not images"):
        metrics.get_extractor("classifier", points, cfg, CPU)
    with pytest.raises(ConfigError, match="eval.classifier_steps"):
        metrics.get_extractor("classifier", digits, dataclasses.replace(cfg, classifier_steps=0), CPU)
    assert not os.listdir(tmp_path)  # nothing was trained


# --------------------------------------------------------------------------------------------------
# compute_fid


def test_compute_fid_on_digits(digits, classifier_cfg, trained):
    result = metrics.compute_fid(digits.test, digits, classifier_cfg, CPU)
    assert result.n == len(digits.test)
    assert result.fid == pytest.approx(result.fid_reference, rel=1e-9)  # the same images
    assert result.fid_reference > 0
    accuracy = trained[0][2]["accuracy"]
    assert result.tags == {
        "fid.extractor": "classifier",
        "fid.reference_split": "train",
        "fid.n": str(len(digits.test)),
        "fid.classifier_accuracy": f"{accuracy:.4f}",
    }
    noise = torch.randn(len(digits.test), 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    noisy = metrics.compute_fid(noise, digits, classifier_cfg, CPU)
    assert noisy.fid > 20 * noisy.fid_reference
    assert noisy.fid_reference == pytest.approx(result.fid_reference, rel=1e-12)


def test_compute_fid_against_test_split(digits, classifier_cfg, trained):
    cfg = dataclasses.replace(classifier_cfg, reference_split="test", fid_n=100)
    result = metrics.compute_fid(digits.test, digits, cfg, CPU)
    assert result.n == 100 and result.tags["fid.n"] == "100" and result.tags["fid.reference_split"] == "test"
    assert result.fid_reference > 0 and result.fid > 0
    # all test images against the test statistics: zero
    full = metrics.compute_fid(digits.test, digits, dataclasses.replace(cfg, fid_n=None), CPU)
    assert full.fid == pytest.approx(0.0, abs=1e-4) and full.fid_reference > 1.0  # sqrtm round-off
    # the held-out train choice is fixed
    again = metrics.compute_fid(digits.test, digits, cfg, CPU)
    assert again.fid_reference == result.fid_reference


def test_reference_statistics_are_memoized(digits, classifier_cfg, trained, monkeypatch):
    metrics._REFERENCE_STATS.clear()
    calls = []
    original = metrics.feature_stats
    monkeypatch.setattr(metrics, "feature_stats", lambda feats: calls.append(len(feats)) or original(feats))
    metrics.compute_fid(digits.test[:50], digits, classifier_cfg, CPU)
    assert calls == [len(digits.train), 50, 50]  # reference, samples, held-out
    calls.clear()
    metrics.compute_fid(digits.test[:60], digits, classifier_cfg, CPU)
    assert calls == [60, 60]


def test_fid_n_larger_than_available_is_a_config_error(digits):
    points = load_dataset(DataConfig(name="moons", n_points=500))
    samples = points.test[:80]
    with pytest.raises(ConfigError) as error:
        metrics.compute_fid(samples, points, EvalConfig(extractor="raw", fid_n=81), CPU)
    assert error.value.key == "eval.fid_n"
    with pytest.raises(ConfigError) as error:
        metrics.compute_fid(points.train, points, EvalConfig(extractor="raw", fid_n=len(points.test) + 1), CPU)
    assert error.value.key == "eval.fid_n"
    # default n: min(samples, test split)
    assert metrics.compute_fid(samples, points, EvalConfig(extractor="raw"), CPU).n == 80
    assert metrics.compute_fid(points.train, points, EvalConfig(extractor="raw"), CPU).n == len(points.test)


# --------------------------------------------------------------------------------------------------
# raw, auto, inception


def test_raw_on_points():
    points = load_dataset(DataConfig(name="moons", n_points=2000))
    name, extract, _ = metrics.get_extractor("auto", points, EvalConfig(), CPU)
    assert name == "raw"
    np.testing.assert_array_equal(extract(points.test), points.test.double().numpy())
    result = metrics.compute_fid(points.test, points, EvalConfig(), CPU)
    assert result.tags == {"fid.extractor": "raw", "fid.reference_split": "train", "fid.n": str(len(points.test))}
    assert result.fid == pytest.approx(result.fid_reference, rel=1e-12)
    assert result.fid < 0.05
    shifted = metrics.compute_fid(points.test + 1.0, points, EvalConfig(), CPU)
    assert shifted.fid == pytest.approx(2.0, rel=0.1)  # ||(1, 1)||^2 on top of the sampling error


def test_auto_resolution(digits, classifier_cfg, trained, tmp_path, monkeypatch):
    points = load_dataset(DataConfig(name="gaussian_mixture", n_points=200))  # labelled, but points
    assert metrics.get_extractor("auto", points, classifier_cfg, CPU)[0] == "raw"
    assert metrics.get_extractor("auto", digits, classifier_cfg, CPU)[0] == "classifier"
    monkeypatch.setattr(metrics, "INCEPTION_DIR", str(tmp_path))
    unlabelled = dataclasses.replace(digits, train_labels=None, test_labels=None, num_classes=None)
    with pytest.raises(ConfigError) as error:
        metrics.get_extractor("auto", unlabelled, classifier_cfg, CPU)
    assert error.value.value == "inception"


def test_unknown_extractor_lists_names(digits):
    with pytest.raises(ConfigError, match="auto, classifier, inception, raw"):
        metrics.get_extractor("vgg", digits, EvalConfig(), CPU)


def test_inception_without_weights_names_the_path(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "INCEPTION_DIR", str(tmp_path))
    expected = os.path.join(str(tmp_path), "inception-2015-12-05.pt")
    with pytest.raises(ConfigError, match="Inception weights not found at " + expected) as error:
        metrics.get_extractor("inception", digits, EvalConfig(), CPU)
    assert error.value.key == "eval.extractor" and error.value.accepted == "classifier or raw"
    assert os.listdir(tmp_path) == []  # no download attempted


def test_inception_location_is_cleanfids():
    """Guards against a clean-fid upgrade moving its weights: the directory its feature extractor
    passes to InceptionV3W and the file name of its download URL."""
    import cleanfid.downloads_helper
    import cleanfid.features

    source = inspect.getsource(cleanfid.features.feature_extractor)
    assert f'"{metrics.INCEPTION_DIR}"' in source or metrics.INCEPTION_DIR == "./"
    assert metrics.INCEPTION_FILE == os.path.basename(cleanfid.downloads_helper.inception_url)


class _FakeInceptionLayers(torch.nn.Module):
    """Stands in for the torchscript Inception trunk: 2048 features whose first three are the
    per-channel means of the normalized input, plus the input's height."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = x.mean(dim=(2, 3))  # [N, 3]
        height = torch.full((x.shape[0], 1), float(x.shape[2]))
        return torch.cat([means, height, torch.zeros(x.shape[0], 2044)], dim=1)


class _FakeInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _FakeInceptionLayers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_inception_pipeline_with_stand_in_weights(digits, tmp_path, monkeypatch):
    """The offline path end to end with a torchscript stand-in for the weights file: grey images
    repeated to 3 channels, resized to 299x299, handed over in [0, 255] (clean-fid normalizes)."""
    torch.jit.save(torch.jit.script(_FakeInception()), str(tmp_path / metrics.INCEPTION_FILE))
    monkeypatch.setattr(metrics, "INCEPTION_DIR", str(tmp_path))
    monkeypatch.setattr(metrics, "INCEPTION_BATCH", 4)  # three batches, the last one short
    unlabelled = dataclasses.replace(digits, train_labels=None, test_labels=None, num_classes=None)
    name, extract, info = metrics.get_extractor("auto", unlabelled, EvalConfig(), CPU)
    assert name == "inception" and info["path"] == str(tmp_path / metrics.INCEPTION_FILE)
    images = digits.test[:10]
    features = extract(images)
    assert features.shape == (10, 2048)
    assert np.all(features[:, 3] == 299)
    # InceptionV3W maps [0, 255] to (x - 128) / 128, so channel means are ~ the [-1, 1] image means
    np.testing.assert_allclose(features[:, 0], features[:, 1])
    np.testing.assert_allclose(features[:, 0], features[:, 2])
    np.testing.assert_allclose(features[:, 0], images.mean(dim=(1, 2, 3)).double().numpy(), atol=0.03)


def test_cleanfid_input_of_a_constant_image():
    x = torch.full((2, 1, 8, 8), 0.5)
    converted = metrics._to_cleanfid_input(x)
    assert converted.shape == (2, 3, 299, 299) and converted.dtype == torch.float32
    torch.testing.assert_close(converted, torch.full_like(converted, 1.5 * 127.5))


def test_tensor_digest_follows_in_place_changes():
    x = torch.zeros(10)
    before = metrics._tensor_digest(x)
    assert metrics._tensor_digest(x) == before
    x[0] = 1.0
    assert metrics._tensor_digest(x) != before
    assert metrics._tensor_digest(torch.zeros(10)) == before
