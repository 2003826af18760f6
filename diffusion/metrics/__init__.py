"""Frechet and kernel distances between sample features and data-set statistics (FID and KID).

FID (Heusel et al. 2017, eq. 6) fits a Gaussian to the features of each image set and measures their
Frechet distance; KID (Binkowski et al. 2018) is the unbiased squared MMD with a cubic polynomial
kernel on the same features. Both use clean-fid's numerics. The package's modules:

- :mod:`~diffusion.metrics.distances`: ``feature_stats``, ``frechet_from_stats``, ``frechet_distance``,
  ``kernel_distance`` (clean-fid's, with KID's subsets drawn from a fixed seed).
- :mod:`~diffusion.metrics.extractors`: the ``eval.extractor`` registry ``EXTRACTORS`` (``inception``,
  ``classifier``, ``raw``, ``auto``), ``get_extractor``, ``resolve_extractor``, ``extractor_refusal`` and
  ``cleanfid_extract`` (any clean-fid feature network on images prepared as clean-fid's "clean" mode does).
- :mod:`~diffusion.metrics.downloads`: clean-fid's files under ``<cache_dir>/inception`` (the Inception weights
  and the published statistics of the ``eval.reference`` registry ``REFERENCES``), found on disk or fetched with
  ``download`` (``download_file``: a temporary file renamed once complete).
- :mod:`~diffusion.metrics.classifier`: the ``classifier`` extractor's CNN, its training and its
  cache file under ``cache_dir``.
- :mod:`~diffusion.metrics.reference`: the features, mean and covariance of a whole split, kept in
  this process and on disk under ``cache_dir`` (``reference-<data set>-<split>-<key>.npz``).
- :mod:`~diffusion.metrics.fid`: ``compute_fid`` (FID and KID with their ``fid_reference`` and
  ``kid_reference`` floors, against a split or published statistics), ``available_examples``,
  ``reference_refusal`` and ``missing_fid_files`` (what a config-level caller checks before it starts) and
  ``conditional_metrics`` (per-class accuracy and FID).
- :mod:`~diffusion.metrics.uncertainty`: ``fid_jackknife`` and ``fid_bootstrap`` (FID's standard error over
  the samples), ``kid_jackknife`` (KID's, over the samples and the reference features) and
  ``fid_infinity`` (FID extrapolated to infinitely many samples, Chong & Forsyth 2020).
- :mod:`~diffusion.metrics.common`: batched feature extraction and tensor digests they share.

Every function takes plain numbers and keyword options whose defaults are the eval section's
(``extractor``, ``reference``, ``reference_split``, ``n`` for ``eval.fid_n``, ``kid``, ``classifier_steps``,
``cache_dir``, ``download``; ``device`` defaults to the CPU), so nothing here reads a config. The names below
are re-exported; module-level settings that functions read at call time (``INCEPTION_BATCH`` in
``extractors``; ``INCEPTION_DIR``, ``INCEPTION_URL``, ``CLEANFID_STATS_URL``, ``DOWNLOAD_TIMEOUT`` in
``downloads``) take effect only when changed in the module that defines them.
"""
from __future__ import annotations

from .classifier import (
    CLASSIFIER_SEED,
    CLASSIFIER_VERSION,
    FeatureClassifier,
    classifier_accuracy,
    classifier_path,
    load_or_train_classifier,
    train_classifier,
)
from .common import FEATURE_BATCH, Extract
from .distances import (
    KID_SEED,
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    feature_stats,
    frechet_distance,
    frechet_from_stats,
    kernel_distance,
)
from .downloads import (
    CLEANFID_STATS_URL,
    INCEPTION_DIR,
    INCEPTION_FILE,
    INCEPTION_URL,
    REFERENCES,
    DownloadError,
    MissingFile,
    MissingFileError,
    PublishedReference,
    PublishedStats,
    download_file,
    find_inception_weights,
    find_published_stats,
    inception_weights,
    inception_weights_path,
    load_published_stats,
    published_stats_path,
    statistics_split,
)
from .extractors import (
    EXTRACTORS,
    INCEPTION_BATCH,
    ExtractorBuilder,
    Refusal,
    build_auto,
    build_classifier,
    build_inception,
    build_raw,
    cleanfid_extract,
    extractor_refusal,
    get_extractor,
    resolve_extractor,
)
from .fid import FIDResult, available_examples, compute_fid, conditional_metrics, missing_fid_files, reference_refusal
from .reference import REFERENCE_CACHE_VERSION, Reference, reference_features, reference_key, reference_path
from .uncertainty import (
    FID_BOOTSTRAP_RESAMPLES,
    FID_INF_POINTS,
    FIDInfinity,
    KID_JACKKNIFE_MAX_REFERENCE,
    FrechetToReference,
    KIDJackknife,
    fid_bootstrap,
    fid_infinity,
    fid_jackknife,
    kid_jackknife,
)

__all__ = [
    "CLEANFID_STATS_URL",
    "DownloadError",
    "MissingFile",
    "MissingFileError",
    "PublishedReference",
    "PublishedStats",
    "REFERENCES",
    "cleanfid_extract",
    "download_file",
    "find_inception_weights",
    "find_published_stats",
    "inception_weights",
    "load_published_stats",
    "missing_fid_files",
    "published_stats_path",
    "reference_refusal",
    "statistics_split",
    "CLASSIFIER_SEED",
    "CLASSIFIER_VERSION",
    "EXTRACTORS",
    "Extract",
    "ExtractorBuilder",
    "FEATURE_BATCH",
    "FIDInfinity",
    "FIDResult",
    "FID_BOOTSTRAP_RESAMPLES",
    "FID_INF_POINTS",
    "FrechetToReference",
    "FeatureClassifier",
    "INCEPTION_BATCH",
    "INCEPTION_DIR",
    "INCEPTION_FILE",
    "INCEPTION_URL",
    "KIDJackknife",
    "KID_JACKKNIFE_MAX_REFERENCE",
    "KID_SEED",
    "KID_SUBSETS",
    "KID_SUBSET_SIZE",
    "REFERENCE_CACHE_VERSION",
    "Reference",
    "Refusal",
    "available_examples",
    "build_auto",
    "build_classifier",
    "build_inception",
    "build_raw",
    "classifier_accuracy",
    "classifier_path",
    "compute_fid",
    "conditional_metrics",
    "extractor_refusal",
    "feature_stats",
    "fid_bootstrap",
    "fid_infinity",
    "fid_jackknife",
    "frechet_distance",
    "frechet_from_stats",
    "get_extractor",
    "inception_weights_path",
    "kernel_distance",
    "kid_jackknife",
    "load_or_train_classifier",
    "reference_features",
    "reference_key",
    "reference_path",
    "resolve_extractor",
    "train_classifier",
]
