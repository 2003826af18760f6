"""How sure an FID is: its standard error and its value at infinitely many samples.

- :func:`fid_jackknife`: the standard error of FID over the generated samples (what a rerun would change; the
  reference statistics are held fixed), by the delete-1 jackknife. This is ``fid_stderr``.
- :func:`fid_bootstrap`: the same by the bootstrap (rows redrawn with replacement ``resamples`` times; Efron &
  Tibshirani 1993, ch. 6). FID's bias in the sample count makes it overstate the standard error where N is not
  large against the feature dimension D: a redraw with replacement holds about 0.63 N distinct rows, so its FID
  carries a larger bias, and a more variable one. Measured against the spread of FID over 100 independent
  sample sets of Gaussian features (``tests/test_uncertainty.py``): the bootstrap gives 1.4x the true standard
  error at D = 8, N = 300, 1.9x at D = 32 and 4.8x at D = 128, N = 359 (the demo's shape); the jackknife
  0.96x, 1.35x and 1.5x. Both err on the side of caution; the jackknife less.
- :func:`fid_infinity`: FID-infinity (Chong & Forsyth 2020, "Effectively Unbiased FID and Inception Score and
  Where to Find Them", sec. 3). FID computed from N samples is biased upwards by a term that shrinks as 1/N;
  FID is computed on random subsets of ``points`` sizes from a fifth of the samples to all of them, a line is
  fitted in 1/N, and its value at 1/N = 0 is ``fid_inf``. Trials with different sample counts, and the
  real-data floor, then compare without that bias. The bias is linear in 1/N only when N is large against the
  feature dimension D (Chong & Forsyth fit 5,000 to 50,000 samples of 2,048-d features): with subsets of
  N < 2.5 D the line misses the truth by more than FID's own bias removed (``tests/test_uncertainty.py``
  measures it), so the smallest subset holds at least 2.5 D samples and the largest at least twice as many;
  fewer samples than 5 D give no ``fid_inf`` (a ValueError saying so).

Both take features and the reference's mean and covariance, and draw from their own seeded NumPy generator
(equal inputs, equal outputs; no global random state touched). Each of their many Frechet distances against
one reference goes through :class:`FrechetToReference`, which takes the reference covariance's square root
once and then needs one symmetric eigenvalue problem per distance instead of a general matrix square root: a
second way of computing clean-fid's number, equal to it to float precision (``tests/test_uncertainty.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FID_BOOTSTRAP_RESAMPLES = 100  # redraws of the samples behind fid_stderr
FID_INF_POINTS = 8  # sample counts behind fid_inf, from FID_INF_MIN_FRACTION of the samples to all of them
FID_INF_MIN_FRACTION = 0.2  # the smallest subset: a fifth of the samples (Chong & Forsyth: a tenth) ...
FID_INF_SAMPLES_PER_DIM = 2.5  # ... and at least 2.5 D samples, where the bias is linear in 1/N
UNCERTAINTY_SEED = 0


class FrechetToReference:
    """The Frechet distance of N(mu, C) to a fixed reference N(mu_r, C_r):

        d^2 = ||mu - mu_r||^2 + Tr(C) + Tr(C_r) - 2 Tr((C_r^(1/2) C C_r^(1/2))^(1/2)),

    where Tr((C C_r)^(1/2)) = Tr((C_r^(1/2) C C_r^(1/2))^(1/2)) because C C_r and C_r^(1/2) C C_r^(1/2) are
    similar; the latter is symmetric positive semi-definite, so its trace root is the sum of the square roots
    of its eigenvalues (negative round-off clipped to 0)."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray):
        self.mu = np.asarray(mu, dtype=np.float64)
        sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
        values, vectors = np.linalg.eigh((sigma + sigma.T) / 2)
        self.root = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
        self.trace = float(np.trace(sigma))

    def __call__(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        inner = self.root @ np.atleast_2d(sigma) @ self.root
        values = np.linalg.eigvalsh((inner + inner.T) / 2)
        diff = np.asarray(mu, dtype=np.float64) - self.mu
        return float(diff @ diff + np.trace(np.atleast_2d(sigma)) + self.trace - 2 * np.sqrt(np.clip(values, 0, None)).sum())

    def of(self, features: np.ndarray) -> float:
        """The distance of the Gaussian fitted to ``features`` [N, D] (mean and unbiased covariance)."""
        return self(features.mean(axis=0), np.cov(features, rowvar=False))


def fid_jackknife(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> tuple[float, np.ndarray]:
    """(standard error, the N leave-one-out FIDs) of the FID of ``features`` [N, D] against the reference
    N(mu_ref, sigma_ref): the delete-1 jackknife (Efron & Tibshirani 1993, ch. 11),
    se^2 = (N - 1) / N sum_i (FID_(i) - mean)^2, FID_(i) the FID without row i. Each leave-one-out mean and
    covariance is a rank-one downdate of the full ones, so the cost is N symmetric eigenvalue problems."""
    features = np.asarray(features, dtype=np.float64)
    n = len(features)
    if features.ndim != 2 or n < 3:
        raise ValueError(f"fid_jackknife needs features [N >= 3, D], got {features.shape}")
    distance = FrechetToReference(mu_ref, sigma_ref)
    mu = features.mean(axis=0)
    centred = features - mu
    scatter = centred.T @ centred
    values = np.empty(n)
    for i in range(n):
        # without row i: mean mu - c_i / (N - 1), scatter S - N / (N - 1) c_i c_i^T (c_i = x_i - mu)
        values[i] = distance(mu - centred[i] / (n - 1), (scatter - n / (n - 1) * np.outer(centred[i], centred[i])) / (n - 2))
    return float(np.sqrt((n - 1) / n * np.sum((values - values.mean()) ** 2))), values


def fid_bootstrap(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, *,
                  resamples: int = FID_BOOTSTRAP_RESAMPLES, seed: int = UNCERTAINTY_SEED) -> tuple[float, np.ndarray]:
    """(standard error, the ``resamples`` bootstrap FIDs) of the FID of ``features`` [N, D] against the
    reference N(mu_ref, sigma_ref): each redraw takes N rows of ``features`` with replacement."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2 or resamples < 2:
        raise ValueError(f"fid_bootstrap needs features [N >= 2, D] and resamples >= 2, got {features.shape} "
                         f"and {resamples}")
    distance = FrechetToReference(mu_ref, sigma_ref)
    rng = np.random.default_rng(seed)
    values = np.array([distance.of(features[rng.integers(0, len(features), len(features))])
                       for _ in range(resamples)])
    return float(values.std(ddof=1)), values


@dataclass
class FIDInfinity:
    """FID-infinity and its fit: ``fid_inf`` (the line's value at 1/N = 0), ``slope`` (its slope in 1/N: the
    bias of FID at N samples is about slope / N), and the ``counts`` and ``fids`` it was fitted to."""

    fid_inf: float
    slope: float
    counts: list[int]
    fids: list[float]

    def as_dict(self) -> dict:
        return {"fid_inf": self.fid_inf, "slope": self.slope, "counts": self.counts, "fids": self.fids,
                "method": "least-squares line of FID against 1/N on random subsets (Chong & Forsyth 2020)"}


def fid_infinity(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, *, points: int = FID_INF_POINTS,
                 min_fraction: float = FID_INF_MIN_FRACTION, seed: int = UNCERTAINTY_SEED) -> FIDInfinity:
    """FID-infinity of ``features`` [N, D] against N(mu_ref, sigma_ref): the FID of a random subset (without
    replacement) of each of ``points`` sizes evenly spaced from max(``min_fraction`` N, 2.5 D) to N, and the
    least-squares line through (1/size, FID) evaluated at 0. ValueError when N < 2 x 2.5 D."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"fid_infinity needs features [N, D], got {features.shape}")
    n, dim = features.shape
    lowest = max(2, round(min_fraction * n), math.ceil(FID_INF_SAMPLES_PER_DIM * dim))
    if 2 * lowest > n:
        raise ValueError(f"fid_inf needs at least {2 * math.ceil(FID_INF_SAMPLES_PER_DIM * dim)} samples of "
                         f"{dim}-d features (FID's bias is linear in 1/N only for N >> D), got {n}")
    counts = sorted({int(c) for c in np.linspace(lowest, n, points)})
    distance = FrechetToReference(mu_ref, sigma_ref)
    rng = np.random.default_rng(seed)
    fids = [distance.of(features[rng.permutation(n)[:count]]) for count in counts]
    slope, intercept = np.polyfit(1.0 / np.asarray(counts, dtype=np.float64), np.asarray(fids), 1)
    return FIDInfinity(float(intercept), float(slope), counts, [float(f) for f in fids])
