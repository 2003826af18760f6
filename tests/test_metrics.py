"""Tests of diffusion.metrics: Frechet and kernel distances, feature extractors, the reference cache
and compute_fid (offline, < 60 s)."""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import time

import numpy as np
import pytest
import torch

from diffusion import metrics, registry
from diffusion.metrics import common, downloads, extractors, fid, reference
from diffusion.config import DataConfig, EvalConfig
from diffusion.data import Dataset, load_dataset
from diffusion.errors import ConfigError

CPU = torch.device("cpu")
TEST_CLASSIFIER_STEPS = 300  # reaches ~98% test accuracy on digits in a few seconds


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch and one BLAS thread: these small networks and 128 x 128 matrix square roots gain
    little from two, and lose a lot when other processes share the cores (threads wait for each other)."""
    import scipy.linalg  # noqa: F401  scipy's own OpenBLAS (sqrtm): threadpool_limits only limits loaded libraries
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
# Kernel distance (KID)


def direct_unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD of two sets of m examples with the kernel k(a, b) = (a.b / d + 1)^3, pair by
    pair with exactly rounded sums: the within-set terms averaged over i != j, the cross term over all
    m^2 pairs (both averages are unbiased because x and y are independent)."""
    m, d = x.shape
    assert y.shape == (m, d)

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (math.fsum(float(p) * float(q) for p, q in zip(a, b)) / d + 1) ** 3

    xx = math.fsum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = math.fsum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = math.fsum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / (m * m)


def test_kernel_distance_equals_direct_unbiased_mmd():
    from cleanfid.fid import kernel_distance as cleanfid_kernel_distance

    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, 4))
    y = 0.8 * rng.standard_normal((20, 4)) + 0.5
    expected = direct_unbiased_mmd2(x, y)
    assert expected > 0.1  # a distance worth comparing
    # subsets of min(20, 20, 1000) examples drawn without replacement: each subset is the whole set
    assert metrics.kernel_distance(x, y, num_subsets=3) == pytest.approx(expected, rel=1e-12)
    assert metrics.kernel_distance(y, x, num_subsets=1) == pytest.approx(expected, rel=1e-12)
    state = np.random.get_state()
    try:  # clean-fid's own function agrees whatever its random state
        np.random.seed(99)
        assert cleanfid_kernel_distance(x, y, num_subsets=2) == pytest.approx(expected, rel=1e-12)
    finally:
        np.random.set_state(state)
    # the same examples on both sides: the unbiased estimate is not zero, but it is what it should be
    assert metrics.kernel_distance(x, x, num_subsets=1) == pytest.approx(direct_unbiased_mmd2(x, x), rel=1e-12)


def test_kernel_distance_subsets_are_seeded_and_numpy_rng_is_left_alone():
    rng = np.random.default_rng(6)
    a = rng.standard_normal((30, 3))
    b = rng.standard_normal((50, 3)) + 0.3
    np.random.seed(123)
    before = np.random.get_state()
    got = metrics.kernel_distance(a, b, num_subsets=4, max_subset_size=10)
    after = np.random.get_state()
    assert after[0] == before[0] and np.array_equal(after[1], before[1]) and after[2:] == before[2:]
    assert metrics.kernel_distance(a, b, num_subsets=4, max_subset_size=10) == got
    assert metrics.kernel_distance(a, b, num_subsets=4, max_subset_size=10, seed=1) != got
    # clean-fid's draws in its order (a subset of the second argument, then of the first), from the
    # legacy RandomState that np.random.seed(KID_SEED) sets up, then the direct computation
    draws = np.random.RandomState(metrics.KID_SEED)
    terms = []
    for _ in range(4):
        from_b = b[draws.choice(len(b), 10, replace=False)]
        from_a = a[draws.choice(len(a), 10, replace=False)]
        terms.append(direct_unbiased_mmd2(from_a, from_b))
    assert got == pytest.approx(math.fsum(terms) / 4, rel=1e-10, abs=1e-12)


def test_kernel_distance_rejects_unusable_input():
    with pytest.raises(ValueError):
        metrics.kernel_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError):
        metrics.kernel_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError):
        metrics.kernel_distance(np.zeros((5, 3)), np.zeros((5, 3)), num_subsets=0)


def test_same_distribution_gives_near_zero_kid():
    rng = np.random.default_rng(7)
    mixing = rng.standard_normal((16, 16)) / 4
    a = rng.standard_normal((500, 16)) @ mixing
    b = rng.standard_normal((500, 16)) @ mixing
    other = rng.standard_normal((500, 16)) @ mixing * 1.3 + 0.5
    same, different = metrics.kernel_distance(a, b), metrics.kernel_distance(a, other)
    # KID is unbiased: zero in expectation for equal distributions; its standard deviation here is
    # about 0.007 (20 independent repetitions), so 0.05 is 7 standard deviations
    assert abs(same) < 0.05
    assert different > 1.0 and abs(same) < 0.05 * different


# --------------------------------------------------------------------------------------------------
# classifier


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(DataConfig(name="digits"))


@pytest.fixture(scope="module")
def classifier_cfg(tmp_path_factory) -> dict:
    """The classifier's keyword options: its training steps and its cache directory."""
    return {"classifier_steps": TEST_CLASSIFIER_STEPS, "cache_dir": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def trained(digits, classifier_cfg):
    """The first get_extractor call: trains the classifier and writes the cache file."""
    start = time.perf_counter()
    result = metrics.get_extractor("classifier", digits, **classifier_cfg, device=CPU)
    return result, time.perf_counter() - start


def test_defaults_are_the_eval_sections():
    """Every keyword option of the package defaults to the eval section's field of its name (n: eval.fid_n)."""
    defaults = EvalConfig()
    functions = (metrics.compute_fid, metrics.conditional_metrics, metrics.get_extractor, metrics.build_classifier,
                 metrics.build_auto, metrics.classifier_path, metrics.load_or_train_classifier)
    checked = set()
    for function in functions:
        for name, parameter in inspect.signature(function).parameters.items():
            field = {"n": "fid_n"}.get(name, name)
            if parameter.kind is parameter.KEYWORD_ONLY and hasattr(defaults, field):
                assert parameter.default == getattr(defaults, field), (function.__name__, name)
                checked.add(field)
    assert checked == {"extractor", "reference", "reference_split", "fid_n", "kid", "classifier_steps", "cache_dir",
                       "download"}


def test_config_level_calls_match_the_plain_ones():
    """options_for reads each keyword option from the eval section (n from eval.fid_n), device given apart."""
    cfg = EvalConfig(extractor="raw", reference_split="test", fid_n=7, kid=False, classifier_steps=3, cache_dir="x",
                     download=True)
    assert registry.options_for(metrics.compute_fid, cfg, renames={"n": "fid_n"}, device=CPU) == {
        "extractor": "raw", "reference": "split", "reference_split": "test", "n": 7, "kid": False,
        "classifier_steps": 3, "cache_dir": "x", "download": True, "device": CPU}
    assert registry.options_for(metrics.get_extractor, cfg, device=CPU) == {
        "classifier_steps": 3, "cache_dir": "x", "download": True, "device": CPU}


def test_classifier_trains_accurate_and_caches(digits, classifier_cfg, trained):
    (name, extract, info), first_seconds = trained
    assert name == "classifier" and not info["loaded_from_cache"]
    assert info["accuracy"] > 0.90
    path = metrics.classifier_path(digits, **classifier_cfg)
    assert info["path"] == path and os.path.isfile(path)
    assert os.path.basename(path).startswith("classifier-digits-")
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp-")]  # temp file replaced
    saved = torch.load(path, weights_only=True)
    assert saved["meta"]["accuracy"] == info["accuracy"] and saved["meta"]["steps"] == TEST_CLASSIFIER_STEPS

    start = time.perf_counter()
    name2, extract2, info2 = metrics.get_extractor("classifier", digits, **classifier_cfg, device=CPU)
    second_seconds = time.perf_counter() - start
    assert info2["loaded_from_cache"] and info2["accuracy"] == info["accuracy"]
    assert second_seconds < 0.2 * first_seconds
    features = extract(digits.test)
    assert features.shape == (len(digits.test), 128) and features.dtype == np.float64
    np.testing.assert_array_equal(features, extract2(digits.test))


def test_classifier_accuracy_is_what_the_model_scores(digits, classifier_cfg, trained):
    model, meta = metrics.load_or_train_classifier(digits, **classifier_cfg, device=CPU)
    with torch.no_grad():
        predicted = model(digits.test).argmax(1)
    assert meta["accuracy"] == pytest.approx((predicted == digits.test_labels).double().mean().item(), abs=1e-12)


def test_classifier_cache_key_depends_on_steps_and_data(digits, classifier_cfg):
    base = metrics.classifier_path(digits, **classifier_cfg)
    assert metrics.classifier_path(digits, **{**classifier_cfg, "classifier_steps": 301}) != base
    changed = dataclasses.replace(digits, train=digits.train.clone())
    changed.train[0, 0, 0, 0] += 0.5
    assert metrics.classifier_path(changed, **classifier_cfg) != base


def test_classifier_training_is_deterministic_and_leaves_global_rng_alone(digits, tmp_path):
    state = torch.get_rng_state()
    models = [
        metrics.load_or_train_classifier(digits, classifier_steps=15, cache_dir=str(tmp_path / d))[0]
        for d in ("a", "b")
    ]
    assert torch.equal(state, torch.get_rng_state())
    for (key, p), (_, q) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        assert torch.equal(p, q), key


def test_classifier_requires_labelled_images(digits, tmp_path):
    options = {"classifier_steps": 5, "cache_dir": str(tmp_path)}
    unlabelled = dataclasses.replace(digits, train_labels=None, test_labels=None, num_classes=None)
    with pytest.raises(ValueError, match=r"^extractor: invalid value 'classifier'; accepted: inception or raw "
                                         r"\(data set digits has no labels\)$"):
        metrics.get_extractor("classifier", unlabelled, **options)
    assert metrics.extractor_refusal("classifier", unlabelled) == ("classifier", "inception or raw",
                                                                   "data set digits has no labels")
    points = load_dataset(DataConfig(name="moons", n_points=200))
    with pytest.raises(ValueError, match="not images"):
        metrics.get_extractor("classifier", points, **options)
    assert metrics.extractor_refusal("classifier", points).accepted == "raw"
    with pytest.raises(ValueError, match=r"^classifier_steps: invalid value 0"):
        metrics.get_extractor("classifier", digits, **{**options, "classifier_steps": 0})
    assert not os.listdir(tmp_path)  # nothing was trained
    assert metrics.extractor_refusal("classifier", digits) is None


# --------------------------------------------------------------------------------------------------
# compute_fid


def test_compute_fid_on_digits(digits, classifier_cfg, trained):
    result = metrics.compute_fid(digits.test, digits, **classifier_cfg, device=CPU)
    assert result.n == len(digits.test)
    assert result.fid == pytest.approx(result.fid_reference, rel=1e-9)  # the same images
    assert result.fid_reference > 0
    accuracy = trained[0][2]["accuracy"]
    assert result.tags == {
        "fid.extractor": "classifier",
        "fid.reference": "split:train",
        "fid.reference_split": "train",
        "fid.n": str(len(digits.test)),
        "fid.classifier_accuracy": f"{accuracy:.4f}",
        "kid.subsets": "100",
        "kid.subset_size": str(len(digits.test)),  # min(n, reference examples, 1000)
        "fid.stderr": "delete-1 jackknife over the examples, reference fixed",
        "kid.stderr": "two-sample delete-1 jackknife of the MMD^2 of all examples: examples and reference",
        # 359 samples of 128-d classifier features: too few for FID-infinity's line in 1/N
        "fid_inf.n": str(len(digits.test)),
        "fid_inf.skipped": "fid_inf needs at least 640 samples of 128-d features (FID's bias is linear in 1/N "
                           f"only for N >> D), got {len(digits.test)}",
        "fid_inf_reference.skipped": "fid_inf needs at least 640 samples of 128-d features (FID's bias is linear in "
                                     f"1/N only for N >> D), got {len(digits.test)}",
    }
    assert result.kid == result.kid_reference  # the same images and the same subsets
    assert result.fid_stderr == result.fid_reference_stderr > 0 and result.fid_inf is None
    noise = torch.randn(len(digits.test), 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    noisy = metrics.compute_fid(noise, digits, **classifier_cfg)  # device: the CPU by default
    assert noisy.fid > 20 * noisy.fid_reference
    assert noisy.fid_reference == pytest.approx(result.fid_reference, rel=1e-12)
    # KID of real test images against the train features is zero up to its sampling error (here
    # about -0.05; disjoint halves of the train split give 0.01 +- 0.03), far below that of noise
    assert noisy.kid > 20 * abs(noisy.kid_reference) and noisy.kid_reference == result.kid_reference
    # KID's standard error: the jackknife's on the same features, computed after KID, which it leaves unchanged
    name, extract, info = trained[0]
    reference = metrics.reference_features(digits, "train", name, extract, info, classifier_cfg["cache_dir"])
    jackknife = metrics.kid_jackknife(reference.features, extract(digits.test))
    assert result.kid_stderr == result.kid_reference_stderr == pytest.approx(jackknife.stderr, rel=1e-9)
    assert 0 < jackknife.stderr_samples < result.kid_stderr
    assert noisy.kid_reference_stderr == result.kid_reference_stderr and noisy.kid_stderr > 0
    plain = metrics.compute_fid(noise, digits, **classifier_cfg, stderr=False, fid_inf=False)
    assert (plain.kid, plain.kid_reference, plain.kid_stderr) == (noisy.kid, noisy.kid_reference, None)


def test_compute_fid_against_test_split(digits, classifier_cfg, trained):
    options = {**classifier_cfg, "reference_split": "test", "n": 100}
    result = metrics.compute_fid(digits.test, digits, **options, device=CPU)
    assert result.n == 100 and result.tags["fid.n"] == "100" and result.tags["fid.reference_split"] == "test"
    assert result.fid_reference > 0 and result.fid > 0
    # all test images against the test statistics: zero
    full = metrics.compute_fid(digits.test, digits, **{**options, "n": None}, device=CPU)
    assert full.fid == pytest.approx(0.0, abs=1e-4) and full.fid_reference > 1.0  # sqrtm round-off
    # the held-out train choice is fixed
    again = metrics.compute_fid(digits.test, digits, **options, device=CPU)
    assert again.fid_reference == result.fid_reference


def test_compute_fid_equals_cleanfid_on_the_same_features(digits, classifier_cfg, trained):
    from cleanfid.fid import fid_from_feats, kernel_distance as cleanfid_kernel_distance

    samples = digits.train[:200].flip(-1)  # mirrored digits: another distribution
    result = metrics.compute_fid(samples, digits, **classifier_cfg, n=200, device=CPU)
    extract = trained[0][1]
    sample_feats, reference_feats, held_out_feats = extract(samples), extract(digits.train), extract(digits.test[:200])
    assert result.fid == pytest.approx(float(fid_from_feats(sample_feats, reference_feats)), rel=1e-12)
    assert result.fid_reference == pytest.approx(float(fid_from_feats(held_out_feats, reference_feats)), rel=1e-12)
    state = np.random.get_state()
    try:  # clean-fid's KID with its global random state seeded as kernel_distance seeds it
        np.random.seed(metrics.KID_SEED)
        kid = cleanfid_kernel_distance(reference_feats, sample_feats)
        np.random.seed(metrics.KID_SEED)
        kid_reference = cleanfid_kernel_distance(reference_feats, held_out_feats)
    finally:
        np.random.set_state(state)
    assert result.kid == pytest.approx(kid, rel=1e-12)
    assert result.kid_reference == pytest.approx(kid_reference, rel=1e-12)
    assert result.fid > 2 * result.fid_reference and result.kid > 2 * abs(result.kid_reference)
    assert result.tags["kid.subset_size"] == "200"


def _counting_extractors(monkeypatch) -> list[int]:
    """Make compute_fid get the real extractors, wrapped to record the examples of each call."""
    calls: list[int] = []
    original = metrics.get_extractor

    def get_extractor(extractor, dataset, **options):
        resolved, extract, info = original(extractor, dataset, **options)

        def counted(x):
            calls.append(len(x))
            return extract(x)

        return resolved, counted, info

    monkeypatch.setattr(fid, "get_extractor", get_extractor)
    return calls


def _reference_files(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("reference-"))


def test_reference_features_are_cached_in_memory_and_on_disk(digits, classifier_cfg, trained, monkeypatch):
    directory = os.path.expanduser(classifier_cfg["cache_dir"])
    reference._REFERENCE_STATS.clear()
    for name in _reference_files(directory):
        os.remove(os.path.join(directory, name))
    calls = _counting_extractors(monkeypatch)

    first = metrics.compute_fid(digits.test[:50], digits, **classifier_cfg, device=CPU)
    assert calls == [len(digits.train), 50, 50]  # reference, samples, held-out
    [computed] = reference._REFERENCE_STATS.values()
    assert computed.source == "computed" and computed.features.shape == (len(digits.train), 128)
    [name] = _reference_files(directory)
    path = os.path.join(directory, name)
    assert path == metrics.reference_path(directory, digits, "train", computed.key)
    assert name.startswith("reference-digits-train-") and name.endswith(".npz")
    assert not [f for f in os.listdir(directory) if f.startswith(".tmp-")]  # temp file replaced
    with np.load(path, allow_pickle=False) as saved:
        assert sorted(saved.files) == ["features", "key", "mu", "sigma", "spec"]
        assert str(saved["key"]) == computed.key
        assert saved["features"].dtype == np.float32  # float32 network features, stored exactly
        np.testing.assert_array_equal(saved["features"].astype(np.float64), computed.features)
        np.testing.assert_array_equal(saved["sigma"], computed.sigma)
        spec = json.loads(str(saved["spec"]))
    assert spec == metrics.reference_key(digits, "train", spec["extractor"], len(digits.train))[1]
    assert spec["extractor"] == reference._extractor_identity("classifier", trained[0][2])
    mtime = os.stat(path).st_mtime_ns

    calls.clear()  # the same process: the split is not extracted again
    metrics.compute_fid(digits.test[:60], digits, **classifier_cfg, device=CPU)
    assert calls == [60, 60]

    reference._REFERENCE_STATS.clear()  # as in a fresh process: the file is read instead
    calls.clear()
    second = metrics.compute_fid(digits.test[:50], digits, **classifier_cfg, device=CPU)
    assert calls == [50, 50]
    loaded = reference._REFERENCE_STATS[computed.key]
    assert loaded.source == "disk" and os.stat(path).st_mtime_ns == mtime
    for attribute in ("features", "mu", "sigma"):
        np.testing.assert_array_equal(getattr(loaded, attribute), getattr(computed, attribute))
    assert (second.fid, second.fid_reference, second.kid, second.kid_reference) == \
        (first.fid, first.fid_reference, first.kid, first.kid_reference)

    with open(path, "wb") as handle:  # a damaged file is recomputed and replaced
        handle.write(b"not an npz file")
    reference._REFERENCE_STATS.clear()
    calls.clear()
    third = metrics.compute_fid(digits.test[:50], digits, **classifier_cfg, device=CPU)
    assert calls == [len(digits.train), 50, 50] and third.fid == first.fid and third.kid == first.kid
    with np.load(path, allow_pickle=False) as saved:
        np.testing.assert_array_equal(saved["features"].astype(np.float64), computed.features)


def test_reference_keys_differ_by_split_extractor_count_and_data(digits, trained, tmp_path):
    _, extract, info = trained[0]
    classifier = reference._extractor_identity("classifier", info)
    count = len(digits.train)
    key, spec = metrics.reference_key(digits, "train", classifier, count)
    assert metrics.reference_key(digits, "train", classifier, count) == (key, spec)  # stable
    changed = dataclasses.replace(digits, train=digits.train.clone())
    changed.train[0, 0, 0, 0] += 0.5
    retrained = reference._extractor_identity("classifier", {**info, "weights": "0" * 64})  # same key, other weights
    others = [
        metrics.reference_key(digits, "test", classifier, count)[0],
        metrics.reference_key(digits, "train", "raw", count)[0],
        metrics.reference_key(digits, "train", retrained, count)[0],
        metrics.reference_key(digits, "train", classifier, count - 1)[0],
        metrics.reference_key(changed, "train", classifier, count)[0],
    ]
    assert retrained != classifier
    assert len({key, *others}) == 1 + len(others)
    assert len({metrics.reference_path(str(tmp_path), digits, "train", k) for k in (key, *others)}) == 1 + len(others)
    # one file per split and extractor in a shared cache directory
    reference._REFERENCE_STATS.clear()
    _, raw, raw_info = metrics.get_extractor("raw", digits)
    references = [
        metrics.reference_features(digits, "train", "raw", raw, raw_info, str(tmp_path)),
        metrics.reference_features(digits, "test", "raw", raw, raw_info, str(tmp_path)),
        metrics.reference_features(digits, "train", "classifier", extract, info, str(tmp_path)),
    ]
    assert [r.features.shape for r in references] == [(count, 64), (len(digits.test), 64), (count, 128)]
    assert len(_reference_files(tmp_path)) == 3
    # without a cache directory: kept in this process only
    reference._REFERENCE_STATS.clear()
    assert metrics.reference_features(digits, "test", "raw", raw, raw_info, None).source == "computed"
    assert len(_reference_files(tmp_path)) == 3


def test_n_larger_than_available_is_refused(digits, tmp_path):
    points = load_dataset(DataConfig(name="moons", n_points=500))
    samples = points.test[:80]
    options = {"extractor": "raw", "kid": False, "cache_dir": str(tmp_path)}
    with pytest.raises(ValueError, match=r"^n: invalid value 81; accepted: an integer in \[2, 80\] or None "
                                         r"\(80 samples, 100 test and 400 train examples\)$"):
        metrics.compute_fid(samples, points, **options, n=81)
    with pytest.raises(ValueError, match=r"^n: invalid value 101; accepted: an integer in \[2, 100\]"):
        metrics.compute_fid(points.train, points, **options, n=len(points.test) + 1)
    with pytest.raises(ValueError, match=r"^n: invalid value None; accepted: an integer in \[2, 1\]"):
        metrics.compute_fid(samples[:1], points, **options)
    with pytest.raises(ValueError, match=r"^reference_split: invalid value 'val'; accepted: train or test$"):
        metrics.compute_fid(samples, points, **options, reference_split="val")
    # default n: min(samples, test split), which available_examples gives
    assert metrics.compute_fid(samples, points, **options).n == 80 == metrics.available_examples(80, points)
    assert metrics.compute_fid(points.train, points, **options).n == len(points.test)
    assert metrics.available_examples(len(points.train), points, "test") == len(points.test)


def test_evaluate_names_the_config_keys_of_fid_errors(tmp_path, monkeypatch):
    """The config-level caller (diffusion.evaluation) refuses eval.fid_n and eval.extractor as ConfigErrors naming
    them, before any features are extracted."""
    from diffusion.config import SampleConfig, TrialConfig
    from diffusion.evaluation import _sample_quality, Report

    points = load_dataset(DataConfig(name="moons", n_points=500))
    cfg = TrialConfig(data=DataConfig(name="moons", n_points=500), sample=SampleConfig(n=80),
                      eval=EvalConfig(extractor="raw", fid_n=81, kid=False, cache_dir=str(tmp_path)))
    with pytest.raises(ConfigError) as error:
        _sample_quality(points.test[:80], None, points, cfg, CPU, Report())
    assert error.value.key == "eval.fid_n" and error.value.value == 81 and error.value.accepted == \
        "an integer in [2, 80] or null" and error.value.detail == "80 samples, 100 test and 400 train examples"
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, fid_n=None, extractor="classifier"))
    with pytest.raises(ConfigError) as error:
        _sample_quality(points.test[:80], None, points, cfg, CPU, Report())
    assert (error.value.key, error.value.value, error.value.accepted) == ("eval.extractor", "classifier", "raw")
    assert "not images" in error.value.detail
    report = Report()
    _sample_quality(points.test[:80], None, points, dataclasses.replace(cfg, eval=dataclasses.replace(
        cfg.eval, extractor="raw")), CPU, report)
    assert report.tags["fid.n"] == "80"


# --------------------------------------------------------------------------------------------------
# raw, auto, inception


def test_raw_on_points(tmp_path):
    points = load_dataset(DataConfig(name="moons", n_points=2000))
    options = {"cache_dir": str(tmp_path), "kid": False}
    name, extract, _ = metrics.get_extractor("auto", points, cache_dir=str(tmp_path))
    assert name == "raw"
    np.testing.assert_array_equal(extract(points.test), points.test.double().numpy())
    result = metrics.compute_fid(points.test, points, **options, device=CPU)
    assert result.tags == {"fid.extractor": "raw", "fid.reference": "split:train", "fid.reference_split": "train",
                           "fid.n": str(len(points.test)),
                           "fid.stderr": "delete-1 jackknife over the examples, reference fixed",
                           "fid_inf.points": "8", "fid_inf.n": str(len(points.test))}
    assert result.kid is None and result.kid_reference is None  # eval.kid = false
    assert result.fid == pytest.approx(result.fid_reference, rel=1e-12)
    assert result.fid < 0.05
    assert result.fid_inf.counts == [80, 125, 171, 217, 262, 308, 354, 400] and result.fid_inf.counts[-1] == result.n
    shifted = metrics.compute_fid(points.test + 1.0, points, **options, device=CPU)
    assert shifted.fid == pytest.approx(2.0, rel=0.1)  # ||(1, 1)||^2 on top of the sampling error
    # the shift is the whole distance: FID-infinity and FID agree within their standard error (FID's bias in n
    # is tiny for 2-d features), and the standard error is small against the distance
    assert abs(shifted.fid_inf.fid_inf - shifted.fid) < 3 * shifted.fid_stderr < 0.25 * shifted.fid
    assert shifted.fid_inf.fids[-1] == pytest.approx(shifted.fid, rel=1e-9)  # the last subset is every sample
    without = metrics.compute_fid(points.test + 1.0, points, **options, stderr=False, fid_inf=False)
    assert without.fid == shifted.fid and without.fid_stderr is None and without.fid_inf is None
    assert "fid.stderr" not in without.tags and "fid_inf.points" not in without.tags
    # more samples than the floor's count: FID, its stderr and KID on the first n, FID-infinity on every sample
    more = torch.cat([points.test, points.train[:800]]) + 1.0
    beyond = metrics.compute_fid(more, points, **options, device=CPU)
    assert (beyond.n, beyond.fid, beyond.fid_stderr) == (shifted.n, shifted.fid, shifted.fid_stderr)
    assert beyond.fid_inf.counts[-1] == len(more) and beyond.tags["fid_inf.n"] == str(len(more))
    everything = metrics.frechet_distance(more.double().numpy(), points.train.double().numpy())
    assert beyond.fid_inf.fids[-1] == pytest.approx(everything, rel=1e-9)
    assert beyond.fid_inf_reference.counts == shifted.fid_inf_reference.counts  # the held-out side: n examples
    with_kid = metrics.compute_fid(points.test + 1.0, points, **{**options, "kid": True}, device=CPU)
    assert with_kid.fid == shifted.fid and with_kid.kid > 20 * abs(with_kid.kid_reference)
    assert with_kid.tags["kid.subsets"] == "100" and with_kid.tags["kid.subset_size"] == str(len(points.test))


def test_auto_resolution(digits, classifier_cfg, trained, tmp_path, monkeypatch):
    points = load_dataset(DataConfig(name="gaussian_mixture", n_points=200))  # labelled, but points
    assert metrics.get_extractor("auto", points, **classifier_cfg, device=CPU)[0] == "raw"
    assert metrics.get_extractor("auto", digits, **classifier_cfg, device=CPU)[0] == "classifier"
    monkeypatch.setattr(downloads, "INCEPTION_DIR", str(tmp_path))
    unlabelled = dataclasses.replace(digits, train_labels=None, test_labels=None, num_classes=None)
    with pytest.raises(metrics.MissingFileError, match="Inception-v3 weights not found"):  # no weights on disk
        metrics.get_extractor("auto", unlabelled, **classifier_cfg, device=CPU)
    assert metrics.extractor_refusal("auto", unlabelled) is None
    assert [m.path for m in metrics.missing_fid_files(unlabelled, cache_dir=classifier_cfg["cache_dir"])] == \
        [metrics.inception_weights_path(classifier_cfg["cache_dir"])]
    assert [metrics.resolve_extractor("auto", d) for d in (points, digits, unlabelled)] == \
        ["raw", "classifier", "inception"]


def test_unknown_extractor_lists_names(digits):
    with pytest.raises(ConfigError, match="auto, classifier, inception, raw"):
        metrics.get_extractor("vgg", digits)


def test_inception_without_weights_names_the_path(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(downloads, "INCEPTION_DIR", str(tmp_path / "legacy"))
    cache_dir = str(tmp_path / "cache")
    expected = os.path.join(cache_dir, "inception", "inception-2015-12-05.pt")
    with pytest.raises(metrics.MissingFileError, match=r"place the file at " + expected + r" \(from https://"):
        metrics.get_extractor("inception", digits, cache_dir=cache_dir)
    (missing,) = metrics.missing_fid_files(digits, extractor="inception", cache_dir=cache_dir)
    assert missing == (missing.what, expected, metrics.INCEPTION_URL)
    assert metrics.missing_fid_files(digits, extractor="inception", cache_dir=cache_dir, download=True) == []
    assert metrics.extractor_refusal("inception", digits) is None  # the data set is not the problem
    assert not os.path.exists(tmp_path / "cache") and not os.path.exists(tmp_path / "legacy")  # nothing fetched


def test_inception_location_is_cleanfids():
    """Guards against a clean-fid upgrade moving its weights or its statistics: the directory its feature
    extractor passes to InceptionV3W, the file name of its download URL, the base URL and file names of its
    published statistics."""
    import cleanfid.downloads_helper
    import cleanfid.features

    source = inspect.getsource(cleanfid.features.feature_extractor)
    assert f'"{metrics.INCEPTION_DIR}"' in source or metrics.INCEPTION_DIR == "./"
    assert metrics.INCEPTION_FILE == os.path.basename(cleanfid.downloads_helper.inception_url)
    source = inspect.getsource(cleanfid.features.get_reference_statistics)
    assert f'base_url = "{metrics.CLEANFID_STATS_URL}"' in source
    assert 'rel_path = (f"{name}_{mode}{model_modifier}_{split}_{res}.npz").lower()' in source
    assert metrics.REFERENCES.get("cleanfid:cifar10-32-train").file == "cifar10_clean_train_32.npz"


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
    monkeypatch.setattr(downloads, "INCEPTION_DIR", str(tmp_path))  # clean-fid's location, used when the cache has none
    monkeypatch.setattr(extractors, "INCEPTION_BATCH", 4)  # three batches, the last one short
    unlabelled = dataclasses.replace(digits, train_labels=None, test_labels=None, num_classes=None)
    name, extract, info = metrics.get_extractor("auto", unlabelled, cache_dir=str(tmp_path / "cache"))
    assert name == "inception" and info["path"] == str(tmp_path / metrics.INCEPTION_FILE)
    # the reference cache is keyed by the weights' content, not their location
    assert info["weights"] == hashlib.sha256((tmp_path / metrics.INCEPTION_FILE).read_bytes()).hexdigest()
    assert reference._extractor_identity(name, info) == "inception-" + info["weights"][:16]
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
    converted = extractors._to_cleanfid_input(x)
    assert converted.shape == (2, 3, 299, 299) and converted.dtype == torch.float32
    torch.testing.assert_close(converted, torch.full_like(converted, 1.5 * 127.5))


def test_tensor_digest_follows_in_place_changes():
    x = torch.zeros(10)
    before = common._tensor_digest(x)
    assert common._tensor_digest(x) == before
    x[0] = 1.0
    assert common._tensor_digest(x) != before
    assert common._tensor_digest(torch.zeros(10)) == before
