"""How sure an FID is: its standard error and its value at infinitely many samples.

- :func:`fid_jackknife`: the standard error of FID over the generated samples (what a rerun would change; the
  reference statistics are held fixed), by the delete-1 jackknife, or by a grouped jackknife (50 groups or more)
  where delete-1 would cost too much (:func:`jackknife_groups`). This is ``fid_stderr``.
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

- :func:`kid_jackknife`: the standard error of KID (clean-fid's unbiased polynomial-kernel MMD^2), by the delete-1
  jackknife over both feature sets. This is ``kid_stderr``. KID averages its estimate over 100 subsets of
  min(N, 1,000) examples per side; with fewer than 1,000 samples every subset holds all of them, so the spread
  across subsets says nothing about a rerun. The jackknife is taken instead of the estimate on all examples of
  both sides, whose leave-one-out values follow in closed form from the kernel matrices' row sums (no refit).

The FID functions take features and the reference's mean and covariance, and draw from their own seeded NumPy generator
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
FID_JACKKNIFE_BUDGET = 4e10  # floating-point operations fid_jackknife's leave-out distances may cost (seconds)
FID_JACKKNIFE_MIN_GROUPS = 50  # groups fid_jackknife leaves out at least, when delete-1 costs too much
FID_INF_POINTS = 8  # sample counts behind fid_inf, from FID_INF_MIN_FRACTION of the samples to all of them
FID_INF_MIN_FRACTION = 0.2  # the smallest subset: a fifth of the samples (Chong & Forsyth: a tenth) ...
FID_INF_SAMPLES_PER_DIM = 2.5  # ... and at least 2.5 D samples, where the bias is linear in 1/N
UNCERTAINTY_SEED = 0
KID_JACKKNIFE_MAX_REFERENCE = 10_000  # reference rows kid_jackknife uses at most (a seeded subset beyond)
KID_JACKKNIFE_BLOCK = 4_000_000  # kernel entries held in memory at once by kid_jackknife


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


def jackknife_groups(n: int, dim: int, budget: float = FID_JACKKNIFE_BUDGET) -> int:
    """How many groups :func:`fid_jackknife` leaves out in turn for N samples of D-dimensional features: every
    sample alone (the delete-1 jackknife) while N leave-one-out distances cost at most ``budget`` (each about
    k^2 D, k = min(N, D) the size of its eigenvalue problem), else as many groups as the budget pays for, at least
    FID_JACKKNIFE_MIN_GROUPS (and at most N). The demo's 359 samples of 128-d features: delete-1; 50,000 of
    Inception's 2,048: 50 groups of 1,000."""
    k = min(n, dim)
    per_distance = float(k) * k * dim
    if n * per_distance <= budget:
        return n
    return int(min(n, max(FID_JACKKNIFE_MIN_GROUPS, budget // per_distance)))


def fid_jackknife(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray,
                  groups: int | None = None) -> tuple[float, np.ndarray]:
    """(standard error, the G leave-out FIDs) of the FID of ``features`` [N, D] against the reference
    N(mu_ref, sigma_ref): the jackknife (Efron & Tibshirani 1993, ch. 11) with the samples in G contiguous groups
    (sizes differing by at most one; G = N is the delete-1 jackknife), se^2 = (G - 1) / G sum_g (FID_(g) -
    mean)^2, FID_(g) the FID without group g. ``groups``: G, by default :func:`jackknife_groups` (delete-1 unless
    that is too costly: N = 50,000 Inception features would need 50,000 eigenvalue problems of size 2,048).

    Each leave-out distance reuses the full data: the kept rows' mean and covariance are a downdate of the full
    ones, and in the coordinates P = (X - mean) C_r^(1/2) the matrix C_r^(1/2) C C_r^(1/2) whose root's trace FID
    needs has the nonzero eigenvalues of the M x M Gram matrix of the M kept rows (recentred) when M <= D, else
    those of P^T P less the left-out rows' share, D x D."""
    features = np.asarray(features, dtype=np.float64)
    n = len(features)
    if features.ndim != 2 or n < 3:
        raise ValueError(f"fid_jackknife needs features [N >= 3, D], got {features.shape}")
    dim = features.shape[1]
    groups = jackknife_groups(n, dim) if groups is None else int(groups)
    if not 2 <= groups <= n or n - -(-n // groups) < 2:
        raise ValueError(f"fid_jackknife needs 2 <= groups <= N with at least 2 samples kept, got {groups} for N = {n}")
    distance = FrechetToReference(mu_ref, sigma_ref)
    mu = features.mean(axis=0)
    centred = features - mu
    projected = centred @ distance.root  # P: rows in the reference's square-root coordinates
    gram_all = projected.T @ projected if n - n // groups > dim else None  # P^T P, for the D x D route
    squares = np.einsum("ij,ij->i", centred, centred)  # ||c_i||^2, for the traces
    label = np.arange(n) * groups // n
    values = np.empty(groups)
    for g in range(groups):
        out = label == g
        kept = n - int(out.sum())
        shift = centred[out].sum(axis=0) / kept  # mean of the kept rows is mu - shift
        trace = (squares.sum() - squares[out].sum() - kept * shift @ shift) / (kept - 1)
        shift_projected = projected[out].sum(axis=0) / kept
        if kept <= dim:  # the kept rows, recentred, as an M x M Gram matrix
            rows = projected[~out] + shift_projected
            inner = rows @ rows.T / (kept - 1)
        else:
            rows = projected[out]
            inner = (gram_all - rows.T @ rows - kept * np.outer(shift_projected, shift_projected)) / (kept - 1)
        eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
        diff = mu - shift - distance.mu
        values[g] = float(diff @ diff + trace + distance.trace - 2 * np.sqrt(np.clip(eigenvalues, 0, None)).sum())
    return float(np.sqrt((groups - 1) / groups * np.sum((values - values.mean()) ** 2))), values


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


@dataclass
class KIDJackknife:
    """What :func:`kid_jackknife` returns. ``value``: the unbiased MMD^2 of all samples against the reference rows
    used (KID's subset average estimates it); ``stderr``: sqrt(``stderr_samples``^2 + ``stderr_reference``^2),
    the standard error over redraws of both sets; ``stderr_samples``: over redraws of the samples alone, the
    reference fixed (what a rerun of a trial against the same reference changes, as ``fid_stderr``);
    ``stderr_reference``: the reference side's share; ``reference_used``: the reference rows the kernel sums
    ran over (all of them, or a seeded subset of ``max_reference``)."""

    value: float
    stderr: float
    stderr_samples: float
    stderr_reference: float
    reference_used: int
    leave_out_samples: np.ndarray  # [N_samples]: the estimate without each sample
    leave_out_reference: np.ndarray  # [reference_used]: the estimate without each reference row used


def _kernel_sums(a: np.ndarray, b: np.ndarray, dim: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(row sums [N_a], column sums [N_b]) of the polynomial kernel matrix k(a_i, b_j) = (a_i.b_j / dim + 1)^3,
    computed ``block`` entries at a time."""
    rows, cols = np.empty(len(a)), np.zeros(len(b))
    step = max(1, block // max(1, len(b)))
    for start in range(0, len(a), step):
        kernel = (a[start:start + step] @ b.T / dim + 1) ** 3
        rows[start:start + step] = kernel.sum(axis=1)
        cols += kernel.sum(axis=0)
    return rows, cols


def _jackknife_se(values: np.ndarray) -> float:
    n = len(values)
    return float(np.sqrt((n - 1) / n * np.sum((values - values.mean()) ** 2)))


def kid_jackknife(reference: np.ndarray, samples: np.ndarray, *, max_reference: int = KID_JACKKNIFE_MAX_REFERENCE,
                  seed: int = UNCERTAINTY_SEED, block: int = KID_JACKKNIFE_BLOCK) -> KIDJackknife:
    """The standard error of KID between ``reference`` [N_r, D] and ``samples`` [N, D] features: the two-sample
    delete-1 jackknife (Arvesen 1969, "Jackknifing U-statistics") of the unbiased squared MMD with clean-fid's
    kernel k(x, y) = (x.y / D + 1)^3 on all examples,

        theta = S_rr / (N_r (N_r - 1)) + S_ss / (N (N - 1)) - 2 S_rs / (N_r N),

    S_rr and S_ss the sums of k over pairs of distinct rows of one set, S_rs over all pairs across. Without
    sample j, S_ss loses twice its kernel row sum b_j (diagonal excluded) and S_rs its cross column sum c_j, so
    theta_(j) = S_rr / (N_r (N_r - 1)) + (S_ss - 2 b_j) / ((N - 1)(N - 2)) - 2 (S_rs - c_j) / (N_r (N - 1)),
    and alike without reference row i: every leave-one-out value from the kernel matrices' row sums, in
    O((N_r + N)^2 D) time and ``block`` entries of memory. Each side's jackknife variance is
    (n - 1) / n sum (theta_(i) - mean)^2 over its n leave-one-out values; ``stderr`` adds both sides' variances.

    Why both sides: KID estimates the population MMD^2 from two finite samples, and the reference split is one
    of them; KID is nearly linear in each sample's empirical distribution, so the variance over redraws of both
    is the sum of the two one-sided variances (``tests/test_uncertainty.py`` checks ``stderr`` against the
    spread over independent redraws of both sets and ``stderr_samples`` against redraws of the samples with
    the reference fixed). Comparing two trials evaluated against the same reference features, the reference
    side is common to both and mostly cancels in the difference: ``stderr_samples`` is then the relevant one,
    and ``stderr`` is conservative.

    A reference of more than ``max_reference`` rows is replaced by a seeded subset of that many (its own
    NumPy generator, ``seed``; no global random state touched) and its side's variance scaled by
    max_reference / N_r, the first-order 1/N_r law of a U-statistic's variance. ValueError unless both are
    [n >= 3, D] with the same D."""
    reference = np.asarray(reference, dtype=np.float64)
    samples = np.asarray(samples, dtype=np.float64)
    if (reference.ndim != 2 or samples.ndim != 2 or reference.shape[1] != samples.shape[1]
            or len(reference) < 3 or len(samples) < 3):
        raise ValueError(f"kid_jackknife needs features [N_r >= 3, D] and [N >= 3, D], got {reference.shape} and "
                         f"{samples.shape}")
    if max_reference < 3:
        raise ValueError(f"max_reference: invalid value {max_reference!r}; accepted: an integer >= 3")
    total = len(reference)
    if total > max_reference:
        reference = reference[np.sort(np.random.default_rng(seed).choice(total, max_reference, replace=False))]
    dim, n_r, n = reference.shape[1], len(reference), len(samples)

    def pairs(x: np.ndarray) -> np.ndarray:  # kernel row sums over the other rows
        return _kernel_sums(x, x, dim, block)[0] - (np.einsum("ij,ij->i", x, x) / dim + 1) ** 3

    a, b = pairs(reference), pairs(samples)
    r, c = _kernel_sums(reference, samples, dim, block)
    s_rr, s_ss, s_rs = a.sum(), b.sum(), r.sum()
    value = s_rr / (n_r * (n_r - 1)) + s_ss / (n * (n - 1)) - 2 * s_rs / (n_r * n)
    without_sample = (s_rr / (n_r * (n_r - 1)) + (s_ss - 2 * b) / ((n - 1) * (n - 2))
                      - 2 * (s_rs - c) / (n_r * (n - 1)))
    without_reference = ((s_rr - 2 * a) / ((n_r - 1) * (n_r - 2)) + s_ss / (n * (n - 1))
                         - 2 * (s_rs - r) / ((n_r - 1) * n))
    se_samples = _jackknife_se(without_sample)
    se_reference = _jackknife_se(without_reference) * math.sqrt(n_r / total)
    return KIDJackknife(value=float(value), stderr=float(math.hypot(se_samples, se_reference)),
                        stderr_samples=se_samples, stderr_reference=se_reference, reference_used=n_r,
                        leave_out_samples=without_sample, leave_out_reference=without_reference)
