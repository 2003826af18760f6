"""Frechet and kernel distances between feature sets, with clean-fid's numerics.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", eq. 6) fits a Gaussian to the features of each image set and measures

    d^2 = ||mu_1 - mu_2||^2 + Tr(C_1 + C_2 - 2 (C_1 C_2)^(1/2)).

The matrix square root and its numerical safeguards are clean-fid's
(:func:`cleanfid.fid.frechet_distance`; Parmar et al. 2022, "On Aliased Resizing and Surprising
Subtleties in GAN Evaluation"), so numbers computed here agree with clean-fid's on the same features.

KID (Binkowski et al. 2018, "Demystifying MMD GANs") is the unbiased estimate of the squared MMD with
the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3 on the same features, averaged over random
subsets (clean-fid's :func:`cleanfid.fid.kernel_distance`: 100 subsets of at most 1,000 examples per
side). It is unbiased, so it can be slightly negative. The subsets are drawn from a fixed seed: equal
inputs, equal KID.
"""
from __future__ import annotations

import numpy as np

# KID as clean-fid computes it (cleanfid.fid.kernel_distance defaults), from a fixed seed
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 0


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (np.cov, rowvar=False) of features [N, D], float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"feature_stats needs features of shape [N >= 2, D], got {feats.shape}")
    mu = feats.mean(axis=0)
    sigma = np.atleast_2d(np.cov(feats, rowvar=False))
    return mu, sigma


def frechet_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6), with
    clean-fid's numerics (scipy sqrtm, eps on the diagonal if the product is singular)."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    return float(cleanfid_frechet(mu1, sigma1, mu2, sigma2))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N_a, D] and [N_b, D]."""
    return frechet_from_stats(*feature_stats(feats_a), *feature_stats(feats_b))


def kernel_distance(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    num_subsets: int = KID_SUBSETS,
    max_subset_size: int = KID_SUBSET_SIZE,
    seed: int = KID_SEED,
) -> float:
    """KID between feature sets [N_a, D] and [N_b, D]: clean-fid's :func:`cleanfid.fid.kernel_distance`
    (Binkowski et al. 2018), the unbiased squared MMD with k(x, y) = (x.y / D + 1)^3 averaged over
    ``num_subsets`` pairs of subsets of m = min(N_a, N_b, max_subset_size) examples, drawn without
    replacement.

    clean-fid draws the subsets from NumPy's global RNG; here it is seeded with ``seed`` for the call
    and restored afterwards, so equal inputs give equal KID and the caller's NumPy random stream is
    untouched. (Not safe against other threads drawing from the global NumPy RNG at the same time.)
    """
    from cleanfid.fid import kernel_distance as cleanfid_kernel_distance

    feats_a = np.asarray(feats_a, dtype=np.float64)
    feats_b = np.asarray(feats_b, dtype=np.float64)
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"kernel_distance needs features [N_a, D] and [N_b, D], got {feats_a.shape} and {feats_b.shape}")
    if min(feats_a.shape[0], feats_b.shape[0], max_subset_size) < 2:
        raise ValueError(f"kernel_distance needs subsets of >= 2 examples, got {feats_a.shape[0]}, "
                         f"{feats_b.shape[0]} and max_subset_size {max_subset_size}")
    if num_subsets < 1:
        raise ValueError(f"kernel_distance needs num_subsets >= 1, got {num_subsets}")
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(cleanfid_kernel_distance(feats_a, feats_b, num_subsets=num_subsets,
                                              max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)
