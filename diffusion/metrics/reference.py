"""Reference statistics: the features, mean and covariance of a whole split, as FID and KID compare
samples against.

They are computed once per (data set, split, extractor, number of examples) and kept both in this
process and on disk under ``cache_dir`` (a config's ``eval.cache_dir``;
``reference-<data set>-<split>-<key>.npz``, written through :func:`diffusion.storage.write_atomic`), so
trials sharing a cache directory do not recompute them.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from ..storage import write_atomic
from .common import Extract, _tensor_digest
from .distances import feature_stats

if TYPE_CHECKING:  # the data module only provides the Dataset type; no import cycle at run time
    from ..data import Dataset

# Bump when the content or layout of the reference cache files changes: old files are then ignored.
REFERENCE_CACHE_VERSION = 1


@dataclass(frozen=True)
class Reference:
    """Features of a whole split and their statistics, as FID and KID compare samples against."""

    features: np.ndarray  # [count, D] float64
    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64 (np.cov, rowvar=False)
    key: str  # reference_key(...)[0]
    source: str  # how this process got them: "computed" (extracted here) or "disk" (cache file)


# reference_key(...)[0] -> Reference: each split is extracted (or read from disk) once per process
_REFERENCE_STATS: dict[str, Reference] = {}


def _extractor_identity(name: str, info: dict) -> str:
    """What determines an extractor's features: for the classifier, its cache key and a digest of its
    weights (two trainings with the same key may differ in round-off, e.g. on another device); for
    Inception, a digest of the weights file."""
    if name == "classifier":
        weights = info.get("weights")
        return f"classifier-{info['key']}" + (f"-{weights[:16]}" if weights else "")
    if name == "inception":
        weights = info.get("weights")
        return f"inception-{weights[:16]}" if weights else f"inception-{info['path']}"
    return name


def _split(dataset: "Dataset", split: str) -> Tensor:
    if split not in ("train", "test"):
        raise ValueError(f"split: invalid value {split!r}; accepted: train or test")
    return dataset.train if split == "train" else dataset.test


def reference_key(dataset: "Dataset", split: str, extractor: str, count: int) -> tuple[str, dict]:
    """(key, spec) of the reference features of ``count`` examples of a split under an extractor
    identity (:func:`_extractor_identity`): the key is a sha256 of the spec, which names the data set,
    the split, a digest of the split's tensor, the extractor, the count and the cache format version."""
    spec = {
        "version": REFERENCE_CACHE_VERSION,
        "dataset": dataset.name,
        "split": split,
        "data": _tensor_digest(_split(dataset, split)),
        "extractor": extractor,
        "count": int(count),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest(), spec


def reference_path(cache_dir: str, dataset: "Dataset", split: str, key: str) -> str:
    """Cache file of the reference features with this key."""
    return os.path.join(os.path.expanduser(cache_dir), f"reference-{dataset.name}-{split}-{key[:16]}.npz")


def _save_reference(path: str, reference: Reference, spec: dict) -> None:
    """Write an .npz (no pickles) atomically (:func:`diffusion.storage.write_atomic`). Features are
    stored as float32 when that is exact (network features are float32 widened to float64)."""
    features = reference.features
    narrow = features.astype(np.float32)
    if np.array_equal(narrow.astype(np.float64), features):
        features = narrow

    def write(handle) -> None:
        np.savez(handle, features=features, mu=reference.mu, sigma=reference.sigma,
                 key=np.array(reference.key), spec=np.array(json.dumps(spec, sort_keys=True)))

    write_atomic(path, write)


def _load_reference(path: str, key: str, count: int) -> Reference | None:
    """The cached reference in ``path`` if it is readable and has this key, else None."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            if str(saved["key"]) != key:
                return None
            features = saved["features"].astype(np.float64)
            mu, sigma = saved["mu"].astype(np.float64), saved["sigma"].astype(np.float64)
    except Exception:  # missing, truncated or foreign file: recompute and overwrite it
        return None
    d = features.shape[1] if features.ndim == 2 else -1
    if features.shape != (count, d) or mu.shape != (d,) or sigma.shape != (d, d):
        return None
    return Reference(features=features, mu=mu, sigma=sigma, key=key, source="disk")


def reference_features(
    dataset: "Dataset", split: str, name: str, extract: Extract, info: dict, cache_dir: str | None = None
) -> Reference:
    """Features, mean and covariance of a whole split under an extractor (from :func:`get_extractor`).

    Looked up in this process first, then (when ``cache_dir`` is given) in the cache file
    :func:`reference_path`; extracted and written there only when neither has them.
    """
    x = _split(dataset, split)
    key, spec = reference_key(dataset, split, _extractor_identity(name, info), len(x))
    if key in _REFERENCE_STATS:
        return _REFERENCE_STATS[key]
    path = reference_path(cache_dir, dataset, split, key) if cache_dir is not None else None
    reference = _load_reference(path, key, len(x)) if path is not None else None
    if reference is None:
        features = np.asarray(extract(x), dtype=np.float64)
        reference = Reference(features, *feature_stats(features), key=key, source="computed")
        if path is not None:
            _save_reference(path, reference, spec)
    _REFERENCE_STATS[key] = reference
    return reference
