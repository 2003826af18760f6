"""FID's standard errors (jackknife, bootstrap) and FID-infinity (diffusion.metrics.uncertainty) against closed forms and independent
redraws, on Gaussian features whose Frechet distances are known exactly."""
import numpy as np
import pytest

from diffusion.metrics import (FrechetToReference, feature_stats, fid_bootstrap, fid_infinity, fid_jackknife,
                               frechet_distance, frechet_from_stats, kernel_distance, kid_jackknife)


def _gaussian(n: int, mean: np.ndarray, std: np.ndarray, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, len(mean))) * std + mean


def test_frechet_to_reference_is_the_closed_form_and_clean_fids_number():
    """Diagonal covariances: d^2 = ||mu_1 - mu_2||^2 + sum_i (sqrt a_i - sqrt b_i)^2 exactly; general
    covariances: the eigenvalue route equals clean-fid's matrix square root to float precision."""
    rng = np.random.default_rng(0)
    mu1, mu2, a, b = rng.normal(size=6), rng.normal(size=6), rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert FrechetToReference(mu2, np.diag(b))(mu1, np.diag(a)) == pytest.approx(exact, rel=1e-12)
    assert frechet_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(exact, rel=1e-9)
    x, y = rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20)), rng.normal(size=(500, 20)) + 0.3
    reference = FrechetToReference(*feature_stats(y))
    assert reference.of(x) == pytest.approx(frechet_distance(x, y), rel=1e-9)
    # rank-deficient sample covariance (fewer samples than dimensions), as in FID-infinity's small subsets
    assert reference.of(x[:12]) == pytest.approx(frechet_distance(x[:12], y), rel=1e-6)


def _redraw_spread(dim: int, n: int, mean: np.ndarray, std: np.ndarray, reference) -> float:
    """The standard deviation of FID over 100 independent sample sets: the standard error to be estimated."""
    distance = FrechetToReference(*reference)
    return float(np.std([distance.of(_gaussian(n, mean, std, seed)) for seed in range(100)], ddof=1))


def test_jackknife_stderr_matches_the_spread_over_independent_redraws():
    """The jackknife standard error from one sample set (mean over 4 sets) is the standard deviation of FID over
    100 independent sample sets of the same size: within 15 % for 8-d features, N = 300; conservative, and by
    less than the bootstrap, where N is not large against D (32-d); reproducible."""
    n, reference8 = 300, (np.zeros(8), np.eye(8))
    mean, std = np.full(8, 0.03), np.full(8, 1.05)
    spread = _redraw_spread(8, n, mean, std, reference8)
    sets = [_gaussian(n, mean, std, 1000 + seed) for seed in range(4)]
    jackknife = np.mean([fid_jackknife(x, *reference8)[0] for x in sets])
    assert 0.85 < jackknife / spread < 1.15, (jackknife, spread)
    se, values = fid_jackknife(sets[0], *reference8)
    assert len(values) == n and values[5] == pytest.approx(FrechetToReference(*reference8).of(np.delete(sets[0], 5, 0)))
    assert fid_jackknife(sets[0], *reference8)[0] == se
    reference32 = (np.zeros(32), np.eye(32))
    mean, std = np.full(32, 0.03), np.full(32, 1.05)
    spread = _redraw_spread(32, 359, mean, std, reference32)
    sets = [_gaussian(359, mean, std, 1000 + seed) for seed in range(2)]
    jackknife = np.mean([fid_jackknife(x, *reference32)[0] for x in sets])
    bootstrap = np.mean([fid_bootstrap(x, *reference32)[0] for x in sets])
    assert spread < jackknife < 1.6 * spread < bootstrap, (spread, jackknife, bootstrap)  # measured 1.35x, 1.9x


def test_bootstrap_is_seeded():
    x, reference = _gaussian(100, np.zeros(4), np.ones(4), 0), (np.zeros(4), np.eye(4))
    assert fid_bootstrap(x, *reference)[0] == fid_bootstrap(x, *reference)[0]
    se, values = fid_bootstrap(x, *reference, resamples=20, seed=1)
    assert len(values) == 20 and se == pytest.approx(values.std(ddof=1)) and se != fid_bootstrap(x, *reference)[0]


def test_fid_infinity_removes_the_bias_in_the_sample_count():
    """Samples of the reference distribution itself (5 sets): FID at N = 2,000 (32-d features) is clearly above
    0 (about 0.15), FID-infinity is 0 within its noise (about 0.02 per set); a shifted distribution: FID-infinity
    is the exact distance, which FID at N overshoots by its bias."""
    dim, n = 32, 2000
    reference = (np.zeros(dim), np.eye(dim))
    sets = [_gaussian(n, np.zeros(dim), np.ones(dim), seed) for seed in range(5)]
    at_n = np.mean([FrechetToReference(*reference).of(x) for x in sets])
    fid_inf = np.mean([fid_infinity(x, *reference).fid_inf for x in sets])
    assert at_n > 0.1 and abs(fid_inf) < 0.15 * at_n, (at_n, fid_inf)
    same = sets[0]
    fit = fid_infinity(same, *reference)
    assert fit.slope > 0 and fit.counts[0] == 400 and fit.counts[-1] == n and len(fit.counts) == 8
    assert fit.fids[-1] == pytest.approx(FrechetToReference(*reference).of(same), rel=1e-9)
    dim = 64  # 2,000 samples of 64-d features: FID's bias (about 0.6) is ten times its standard error
    reference = (np.zeros(dim), np.eye(dim))
    shifted = _gaussian(n, np.full(dim, 0.1), np.full(dim, 1.1), 1)
    exact = dim * 0.1**2 + dim * (np.sqrt(1.21) - 1) ** 2  # ||mu||^2 + sum (sqrt a - sqrt b)^2
    fit = fid_infinity(shifted, *reference)
    at_n, stderr = FrechetToReference(*reference).of(shifted), fid_jackknife(shifted, *reference)[0]
    assert at_n - exact > 5 * stderr and abs(fit.fid_inf - exact) < 3 * stderr, (fit.fid_inf, exact, at_n, stderr)
    assert fit.as_dict()["fid_inf"] == fit.fid_inf


def test_fid_infinity_needs_many_samples_per_dimension():
    """Below 2.5 D samples per subset the line in 1/N misses: fid_infinity refuses fewer than 5 D samples, saying
    how many it needs; at 5 D it fits from 2.5 D."""
    dim = 40
    with pytest.raises(ValueError, match="fid_inf needs at least 200 samples of 40-d features .* got 199"):
        fid_infinity(_gaussian(199, np.zeros(dim), np.ones(dim), 0), np.zeros(dim), np.eye(dim))
    fit = fid_infinity(_gaussian(200, np.zeros(dim), np.ones(dim), 0), np.zeros(dim), np.eye(dim))
    assert fit.counts[0] == 100 and fit.counts[-1] == 200


def _mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased squared MMD with k(a, b) = (a.b / D + 1)^3, from the full kernel matrices (the definition)."""
    dim, n, m = x.shape[1], len(x), len(y)
    kxx, kyy, kxy = (x @ x.T / dim + 1) ** 3, (y @ y.T / dim + 1) ** 3, (x @ y.T / dim + 1) ** 3
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.sum() / (n * m))


def test_kid_jackknife_is_the_brute_force_leave_one_out():
    """Every leave-one-out value from the row sums equals the MMD^2 recomputed without that row (both sides),
    the kernel sums taken a few entries at a time; the standard errors follow the jackknife formula."""
    rng = np.random.default_rng(0)
    reference, samples = rng.normal(size=(40, 5)), rng.normal(size=(30, 5)) + 0.3
    result = kid_jackknife(reference, samples, block=64)
    assert abs(result.value - _mmd2(reference, samples)) < 1e-10
    brute_samples = np.array([_mmd2(reference, np.delete(samples, j, 0)) for j in range(30)])
    brute_reference = np.array([_mmd2(np.delete(reference, i, 0), samples) for i in range(40)])
    assert np.abs(result.leave_out_samples - brute_samples).max() < 1e-10
    assert np.abs(result.leave_out_reference - brute_reference).max() < 1e-10
    se_samples = np.sqrt(29 / 30 * np.sum((brute_samples - brute_samples.mean()) ** 2))
    se_reference = np.sqrt(39 / 40 * np.sum((brute_reference - brute_reference.mean()) ** 2))
    assert result.stderr_samples == pytest.approx(se_samples, rel=1e-8)
    assert result.stderr == pytest.approx(np.hypot(se_samples, se_reference), rel=1e-8)
    assert result.reference_used == 40 and kid_jackknife(reference, samples).stderr == pytest.approx(result.stderr)


def test_kid_jackknife_value_is_kernel_distance_when_every_subset_holds_everything():
    """With as many samples as reference rows, fewer than KID's subset size, every one of KID's subsets is a
    permutation of all rows: KID is the MMD^2 of all examples, which kid_jackknife estimates the error of."""
    rng = np.random.default_rng(1)
    reference, samples = rng.normal(size=(120, 6)), rng.normal(size=(120, 6)) * 1.2
    assert kid_jackknife(reference, samples).value == pytest.approx(kernel_distance(reference, samples), abs=1e-12)
    # more reference rows than samples: KID's subsets of the reference average to the same MMD^2 (2,000 subsets:
    # within 0.3 % of it, where the standard error is 70 %)
    reference = rng.normal(size=(600, 6))
    result = kid_jackknife(reference, samples)
    assert result.value == pytest.approx(kernel_distance(reference, samples, num_subsets=2000), rel=0.01)
    assert result.stderr > 0.3 * result.value


def test_kid_stderr_matches_the_spread_over_independent_redraws():
    """The jackknife standard error (mean over the 200 redraws) against the standard deviation of the MMD^2 over
    200 independent redraws, 8-d Gaussian features, 300 per side, the samples shifted by 0.3: of both sets for
    ``stderr`` (measured 0.92x), of the samples alone against one fixed reference for ``stderr_samples`` (1.02x).
    Samples of the reference distribution itself (MMD^2 = 0, a degenerate U-statistic): conservative (1.26x)."""
    def draw(n, shift, seed):
        return np.random.default_rng(seed).normal(size=(n, 8)) + shift

    both = [kid_jackknife(draw(300, 0.0, 2 * s), draw(300, 0.3, 2 * s + 1)) for s in range(200)]
    ratio = np.mean([r.stderr for r in both]) / np.std([r.value for r in both], ddof=1)
    assert 0.75 < ratio < 1.33, ratio
    fixed = draw(300, 0.0, 10**6)
    one_side = [kid_jackknife(fixed, draw(300, 0.3, 2 * s + 1)) for s in range(200)]
    ratio = np.mean([r.stderr_samples for r in one_side]) / np.std([r.value for r in one_side], ddof=1)
    assert 0.75 < ratio < 1.33, ratio
    assert all(r.stderr_samples < r.stderr for r in one_side)
    null = [kid_jackknife(draw(300, 0.0, 2 * s), draw(300, 0.0, 2 * s + 1)) for s in range(200)]
    ratio = np.mean([r.stderr for r in null]) / np.std([r.value for r in null], ddof=1)
    assert 1.0 < ratio < 1.5, ratio


def test_kid_jackknife_on_a_reference_subset():
    """A reference larger than ``max_reference``: a seeded subset of that many rows (the global NumPy stream
    untouched), its side's variance scaled to the whole reference; close to the standard error on all rows."""
    rng = np.random.default_rng(2)
    reference, samples = rng.normal(size=(2000, 8)), rng.normal(size=(300, 8)) + 0.3
    full = kid_jackknife(reference, samples)
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    part = kid_jackknife(reference, samples, max_reference=500)
    assert np.array_equal(np.random.get_state()[1], before)
    assert part.reference_used == 500 and full.reference_used == 2000
    assert part.stderr == kid_jackknife(reference, samples, max_reference=500).stderr
    assert 0.8 < part.stderr / full.stderr < 1.25, (part.stderr, full.stderr)
    assert 0.6 < part.stderr_reference / full.stderr_reference < 1.6, (part.stderr_reference, full.stderr_reference)


def test_kid_jackknife_refuses_bad_shapes():
    with pytest.raises(ValueError, match=r"kid_jackknife needs features .* got \(10, 3\) and \(2, 3\)"):
        kid_jackknife(np.zeros((10, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="max_reference: invalid value 2"):
        kid_jackknife(np.zeros((10, 3)), np.zeros((5, 3)), max_reference=2)


def test_jackknife_leave_out_values_are_the_fids_of_the_kept_samples():
    """Every leave-out value equals the FID of the kept rows computed from scratch (FrechetToReference.of), by
    each route: the M x M Gram matrix when fewer samples than dimensions are kept (as with 2,048-d Inception
    features and a small sample), the D x D downdate otherwise, and for groups as for single samples."""
    rng = np.random.default_rng(3)
    mix = rng.normal(size=(40, 40)) / 6 + np.eye(40)
    reference = (rng.normal(size=40) * 0.1, mix @ mix.T)
    distance = FrechetToReference(*reference)
    few = rng.normal(size=(24, 40)) * 1.1 + 0.05  # N < D: the Gram route
    se, values = fid_jackknife(few, *reference)
    brute = np.array([distance.of(np.delete(few, i, 0)) for i in range(24)])
    # to 1e-7: from scratch, the 17 zero eigenvalues of a rank-23 40 x 40 matrix come out as round-off of about
    # 1e-16, whose square roots add about 1e-8 each; the Gram route has none
    np.testing.assert_allclose(values, brute, rtol=1e-7)
    assert se == pytest.approx(np.sqrt(23 / 24 * np.sum((brute - brute.mean()) ** 2)), rel=1e-4)
    many = rng.normal(size=(203, 40)) * 0.9  # N > D: the D x D route, 10 groups of 20 or 21
    se, values = fid_jackknife(many, *reference, groups=10)
    label = np.arange(203) * 10 // 203
    assert sorted(np.bincount(label)) == [20] * 7 + [21] * 3
    np.testing.assert_allclose(values, [distance.of(many[label != g]) for g in range(10)], rtol=1e-9)
    with pytest.raises(ValueError, match="groups"):
        fid_jackknife(many, *reference, groups=1)


def test_jackknife_groups_keep_delete_1_where_affordable():
    from diffusion.metrics.uncertainty import jackknife_groups

    assert jackknife_groups(359, 128) == 359  # the demo: delete-1, as before
    assert jackknife_groups(24, 2048) == 24  # a small sample of Inception features: 24 small Gram matrices
    assert jackknife_groups(50_000, 2048) == 50  # Ho et al.'s 50,000 samples: 50 groups of 1,000
    assert jackknife_groups(10_000, 64) == 10_000 and jackknife_groups(60, 2048) == 60


def test_grouped_jackknife_stderr_matches_the_spread_over_independent_redraws():
    """50 groups instead of 300 single samples: the same standard error on average (8-d features, N = 300),
    within 20 %."""
    n, reference = 300, (np.zeros(8), np.eye(8))
    mean, std = np.full(8, 0.03), np.full(8, 1.05)
    spread = _redraw_spread(8, n, mean, std, reference)
    grouped = np.mean([fid_jackknife(_gaussian(n, mean, std, 2000 + seed), *reference, groups=50)[0]
                       for seed in range(8)])
    assert 0.8 < grouped / spread < 1.2, (grouped, spread)
