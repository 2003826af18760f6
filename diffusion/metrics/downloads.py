"""clean-fid's files on disk: the Inception-v3 weights the ``inception`` extractor loads, and the reference
statistics clean-fid publishes (an ``eval.reference`` of ``cleanfid:<set>-<resolution>-<split>``), so that an FID
compares with the numbers papers report.

Where a file is looked for: ``<cache_dir>/inception/`` first (the weights as ``inception-2015-12-05.pt``, the
statistics under ``stats/`` with clean-fid's file names, e.g. ``cifar10_clean_train_32.npz``), then where
clean-fid itself keeps it: the weights in ``INCEPTION_DIR`` (``/tmp``; only a file owned by this user, since
anyone can write there), the statistics in the installed package's ``stats`` folder. With ``download=True``
(a config's ``eval.download``) a file found in neither place is fetched from clean-fid's URL into
``<cache_dir>/inception/`` (:func:`download_file`: streamed into a temporary file in that directory, its length
checked against the server's, then renamed, so a failed or killed download leaves nothing at the final path).
Without it, :class:`MissingFile` names the path to place the file at and the URL to fetch it from.

``REFERENCES`` is the ``eval.reference`` registry: ``split`` (the data set's own split, features computed here)
and every set clean-fid publishes statistics of in its ``clean`` mode, each a :class:`PublishedStats`.
"""
from __future__ import annotations

import http.client
import os
import platform
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
from cleanfid.downloads_helper import inception_url

from ..registry import Registry
from ..storage import file_digest, write_atomic

# clean-fid's Inception-v3 torchscript file (cleanfid.downloads_helper.inception_url) and the base URL of its
# published statistics (cleanfid.features.get_reference_statistics's base_url). Read at call time: tests point
# them at a local server (patch them here, in diffusion.metrics.downloads), or pass url= / base_url=.
INCEPTION_URL = inception_url
INCEPTION_FILE = os.path.basename(inception_url)  # inception-2015-12-05.pt
CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats/"
# Where clean-fid keeps the weights: cleanfid.features.feature_extractor passes "/tmp" ("./" on Windows) to
# InceptionV3W. A file there is used when eval.cache_dir has none (and it belongs to this user).
INCEPTION_DIR = "./" if platform.system() == "Windows" else "/tmp"
DOWNLOAD_TIMEOUT = 60.0  # seconds without a byte from the server before a download is given up
DOWNLOAD_BLOCK = 1 << 20  # bytes read and written at a time


class DownloadError(OSError):
    """A download that did not complete (HTTP error, refused connection, timeout, truncated body, a file of the
    wrong content): names the URL and where it was going; nothing is left at that path."""

    def __init__(self, url: str, path: str, reason: str):
        self.url, self.path, self.reason = url, path, reason
        super().__init__(f"could not download {url} to {path}: {reason}")


class MissingFile(NamedTuple):
    """A file FID needs that is not on disk: what it is, where to place it (``path``) and where to get it."""

    what: str  # e.g. "clean-fid's Inception-v3 weights"
    path: str  # where it would be downloaded to, and where it may be placed by hand
    url: str

    def message(self) -> str:
        return f"{self.what} not found: place the file at {self.path} (from {self.url})"


class MissingFileError(FileNotFoundError):
    """Raised for a :class:`MissingFile` when downloading was not asked for."""

    def __init__(self, missing: MissingFile):
        self.missing = missing
        super().__init__(f"{missing.message()}, or pass download=True to fetch it")


def download_file(url: str, path: str, *, timeout: Optional[float] = None) -> str:
    """Fetch ``url`` (http or https) into ``path`` and return ``path``: streamed into a temporary file in the
    directory of ``path`` (:func:`diffusion.storage.write_atomic`), then renamed. The body's length must match
    the server's Content-Length (when it sends one) and be non-empty. DownloadError naming the URL otherwise,
    with nothing left behind. ``timeout``: seconds to wait for the server (default ``DOWNLOAD_TIMEOUT``)."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"url: invalid value {url!r}; accepted: an http or https URL")
    timeout = DOWNLOAD_TIMEOUT if timeout is None else timeout
    print(f"downloading {url} to {path}", file=sys.stderr, flush=True)

    def write(handle) -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                expected = response.headers.get("Content-Length")
                received = 0
                while block := response.read(DOWNLOAD_BLOCK):
                    handle.write(block)
                    received += len(block)
        except urllib.error.HTTPError as error:
            raise DownloadError(url, path, f"HTTP {error.code} {error.reason}") from None
        except urllib.error.URLError as error:
            raise DownloadError(url, path, str(error.reason)) from None
        except (OSError, http.client.HTTPException) as error:  # timeouts, resets, broken chunked bodies
            raise DownloadError(url, path, f"{type(error).__name__}: {error}") from None
        if expected is not None and received != int(expected):
            raise DownloadError(url, path, f"truncated: received {received} of {expected} bytes")
        if received == 0:
            raise DownloadError(url, path, "the server sent an empty body")

    write_atomic(path, write)
    return path


# (path, size, mtime) -> sha256 of the file: the Inception weights and statistics are hashed once per process
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, memoized while its size and modification time do not change."""
    stat = os.stat(path)
    memo_key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _FILE_DIGESTS:
        _FILE_DIGESTS[memo_key] = file_digest(path)["sha256"]
    return _FILE_DIGESTS[memo_key]


def inception_dir(cache_dir: str) -> str:
    """``<cache_dir>/inception``: where clean-fid's files are kept and downloaded to."""
    return os.path.join(os.path.expanduser(cache_dir), "inception")


# --------------------------------------------------------------------------------------------------
# The Inception weights


def inception_weights_path(cache_dir: str = "~/.cache/diffusion-orchestrator") -> str:
    """Where the Inception-v3 weights are kept (and downloaded to) under ``cache_dir``."""
    return os.path.join(inception_dir(cache_dir), INCEPTION_FILE)


def _owned_file(path: str) -> bool:
    try:
        stat = os.stat(path)
    except OSError:
        return False
    return os.path.isfile(path) and (not hasattr(os, "getuid") or stat.st_uid == os.getuid())


def find_inception_weights(cache_dir: str = "~/.cache/diffusion-orchestrator") -> Optional[str]:
    """The Inception weights file on disk: under ``cache_dir`` (:func:`inception_weights_path`), else clean-fid's
    own location (``INCEPTION_DIR``) when this user owns the file there; None when neither has it."""
    path = inception_weights_path(cache_dir)
    if os.path.isfile(path):
        return path
    legacy = os.path.join(INCEPTION_DIR, INCEPTION_FILE)
    return legacy if _owned_file(legacy) else None


def missing_inception_weights(cache_dir: str = "~/.cache/diffusion-orchestrator", *,
                              url: Optional[str] = None) -> Optional[MissingFile]:
    """The weights file as a :class:`MissingFile` when :func:`find_inception_weights` finds none, else None."""
    if find_inception_weights(cache_dir) is not None:
        return None
    return MissingFile("clean-fid's Inception-v3 weights", inception_weights_path(cache_dir), url or INCEPTION_URL)


def inception_weights(cache_dir: str = "~/.cache/diffusion-orchestrator", *, download: bool = False,
                      url: Optional[str] = None, timeout: Optional[float] = None) -> str:
    """The path of the Inception weights (:func:`find_inception_weights`); with ``download``, fetched from
    ``url`` (default ``INCEPTION_URL``, clean-fid's) into :func:`inception_weights_path` when missing.
    MissingFileError (naming the path and the URL) when missing and ``download`` is false."""
    found = find_inception_weights(cache_dir)
    if found is not None:
        return found
    missing = missing_inception_weights(cache_dir, url=url)
    if not download:
        raise MissingFileError(missing)
    return download_file(missing.url, missing.path, timeout=timeout)


# --------------------------------------------------------------------------------------------------
# Published reference statistics


@dataclass(frozen=True)
class PublishedStats:
    """One set of reference statistics clean-fid publishes: Inception pool features (mode ``clean``) of a data
    set's ``split`` at ``res`` x ``res`` RGB, as ``mu`` and ``sigma`` in an .npz (``file``)."""

    name: str  # clean-fid's dataset_name, e.g. cifar10
    res: int  # clean-fid's dataset_res
    split: str  # clean-fid's dataset_split, e.g. train, test, trainval70k
    mode: str = "clean"

    @property
    def key(self) -> str:
        """The ``eval.reference`` value naming it: ``cleanfid:<name>-<res>-<split>``."""
        return f"cleanfid:{self.name}-{self.res}-{self.split}"

    @property
    def label(self) -> str:
        """What the ``fid.reference`` tag says: ``cleanfid:<name>/<split>/<res>/<mode>``."""
        return f"cleanfid:{self.name}/{self.split}/{self.res}/{self.mode}"

    @property
    def file(self) -> str:
        """clean-fid's file name (as cleanfid.features.get_reference_statistics forms it)."""
        return f"{self.name}_{self.mode}_{self.split}_{self.res}.npz".lower()

    @property
    def shape(self) -> tuple[int, int, int]:
        """The images the statistics are of: [3, res, res]."""
        return (3, self.res, self.res)

    @property
    def local_split(self) -> str:
        """The local split that plays the published one's part: test for a test split, else train. The other
        split is held out: its examples are ``fid_reference``'s."""
        return "test" if self.split == "test" else "train"

    def url(self, base_url: Optional[str] = None) -> str:
        return (base_url or CLEANFID_STATS_URL).rstrip("/") + "/" + self.file


# eval.reference: "split" (None: the data set's own eval.reference_split) or published statistics
REFERENCES: Registry[Optional[PublishedStats]] = Registry("eval.reference")
REFERENCES.register("split")(None)

# clean-fid's precomputed statistics (its README's "Supported Precomputed Datasets"), mode clean
for _name, _res, _split in [
    ("cifar10", 32, "train"), ("cifar10", 32, "test"),
    ("ffhq", 256, "trainval"), ("ffhq", 256, "trainval70k"), ("ffhq", 1024, "trainval"), ("ffhq", 1024, "trainval70k"),
    ("lsun_church", 256, "train"), ("lsun_horse", 256, "train"), ("lsun_cat", 256, "train"),
    ("lsun_cat", 256, "trainfull"), ("afhq_cat", 512, "train"), ("afhq_dog", 512, "train"),
    ("afhq_wild", 512, "train"), ("brecahad", 512, "train"), ("metfaces", 1024, "train"),
    ("horse2zebra", 256, "test"), ("cat2dog", 256, "test"),
]:
    _stats = PublishedStats(_name, _res, _split)
    REFERENCES.register(_stats.key)(_stats)


def published_stats_path(stats: PublishedStats, cache_dir: str = "~/.cache/diffusion-orchestrator") -> str:
    """Where published statistics are kept (and downloaded to) under ``cache_dir``."""
    return os.path.join(inception_dir(cache_dir), "stats", stats.file)


def _cleanfid_stats_dir() -> str:
    import cleanfid

    return os.path.join(os.path.dirname(cleanfid.__file__), "stats")


def find_published_stats(stats: PublishedStats, cache_dir: str = "~/.cache/diffusion-orchestrator") -> Optional[str]:
    """The statistics file on disk: under ``cache_dir`` (:func:`published_stats_path`), else where clean-fid
    downloads it (its package's ``stats`` folder); None when neither has it."""
    for path in (published_stats_path(stats, cache_dir), os.path.join(_cleanfid_stats_dir(), stats.file)):
        if os.path.isfile(path):
            return path
    return None


def missing_published_stats(stats: PublishedStats, cache_dir: str = "~/.cache/diffusion-orchestrator", *,
                            base_url: Optional[str] = None) -> Optional[MissingFile]:
    """The statistics file as a :class:`MissingFile` when :func:`find_published_stats` finds none, else None."""
    if find_published_stats(stats, cache_dir) is not None:
        return None
    return MissingFile(f"clean-fid's published statistics {stats.key}", published_stats_path(stats, cache_dir),
                       stats.url(base_url))


class PublishedReference(NamedTuple):
    """Published statistics as loaded: the mean and covariance of the Inception features, and their file."""

    stats: PublishedStats
    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64
    path: str
    sha256: str


def _read_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """mu [D] and sigma [D, D] (finite, float64) of an .npz; ValueError naming the file otherwise."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            mu, sigma = np.asarray(saved["mu"], dtype=np.float64), np.asarray(saved["sigma"], dtype=np.float64)
    except Exception as error:  # noqa: BLE001 - not an npz, no mu or sigma, a pickle
        raise ValueError(f"{path} is not clean-fid statistics (an .npz of mu and sigma): {error}") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path} is not clean-fid statistics: mu {mu.shape} and sigma {sigma.shape} should be [D] "
                         "and [D, D], finite")
    return mu, sigma


def load_published_stats(stats: PublishedStats, cache_dir: str = "~/.cache/diffusion-orchestrator", *,
                         download: bool = False, base_url: Optional[str] = None,
                         timeout: Optional[float] = None) -> PublishedReference:
    """The published statistics ``stats`` (:func:`find_published_stats`); with ``download``, fetched from
    ``base_url`` (default ``CLEANFID_STATS_URL``, clean-fid's) into :func:`published_stats_path` when missing
    (a downloaded file that is not an .npz of mu [D] and sigma [D, D] is removed again: DownloadError).
    MissingFileError (naming the path and the URL) when missing and ``download`` is false."""
    path = find_published_stats(stats, cache_dir)
    if path is None:
        missing = missing_published_stats(stats, cache_dir, base_url=base_url)
        if not download:
            raise MissingFileError(missing)
        path = download_file(missing.url, missing.path, timeout=timeout)
        try:
            _read_stats(path)
        except ValueError as error:
            os.remove(path)
            raise DownloadError(missing.url, missing.path, str(error)) from None
    mu, sigma = _read_stats(path)
    return PublishedReference(stats, mu, sigma, path, file_sha256(path))


def statistics_split(reference: str = "split", reference_split: str = "train") -> str:
    """The local split FID's reference statistics stand for (its other split is held out for ``fid_reference``): for
    ``reference: split``, ``reference_split``; for published statistics, their :attr:`PublishedStats.local_split`."""
    published = REFERENCES.get(reference)
    return reference_split if published is None else published.local_split
