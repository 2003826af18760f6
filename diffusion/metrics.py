"""Frechet distances between sample features and data-set statistics (FID).

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", eq. 6) fits a Gaussian to the features of each image set and measures

    d^2 = ||mu_1 - mu_2||^2 + Tr(C_1 + C_2 - 2 (C_1 C_2)^(1/2)).

The matrix square root and its numerical safeguards are clean-fid's
(:func:`cleanfid.fid.frechet_distance`; Parmar et al. 2022, "On Aliased Resizing and Surprising
Subtleties in GAN Evaluation"), so numbers computed here agree with clean-fid's on the same features.

The features come from a registered extractor (``eval.extractor``):

- ``inception``: clean-fid's Inception-v3 pool features, mode "clean" (PIL bicubic resize to 299x299
  on float images in [0, 255]); only when its weights are already on disk, never downloaded here.
- ``classifier``: the penultimate layer of a small CNN trained on the labelled train split of the
  data set itself, cached on disk. Inception features of 8x8 grey digits say little; a classifier
  trained on the data set is the usual offline substitute (e.g. the MNIST classifiers behind
  "FID" numbers in small-scale papers). Numbers are comparable only between runs that use the same
  cached classifier (same data set, split and ``eval.classifier_steps``).
- ``raw``: the flattened coordinates (2-D toy data; pixel space for images).
- ``auto``: ``classifier`` for labelled image sets, ``inception`` for unlabelled image sets,
  ``raw`` for 2-D points.

Every FID is reported next to ``fid_reference``: the FID of as many held-out real examples against
the same reference statistics. A sample set of size n cannot be expected to beat it, since FID is
biased upwards at finite n (Binkowski et al. 2018, "Demystifying MMD GANs"; Chong & Forsyth 2020,
"Effectively Unbiased FID and Inception Score and Where to Find Them").

KID (``eval.kid``; Binkowski et al. 2018) is the unbiased estimate of the squared MMD with the cubic
polynomial kernel k(x, y) = (x.y / D + 1)^3 on the same features, averaged over random subsets
(clean-fid's :func:`cleanfid.fid.kernel_distance`: 100 subsets of at most 1,000 examples per side).
It is unbiased, so it can be slightly negative, and it needs the reference features themselves, not
only their mean and covariance. It is reported next to ``kid_reference``, the KID of the same held-out
real examples as ``fid_reference``. The subsets are drawn from a fixed seed: equal inputs, equal KID.

The reference features, mean and covariance of a split are computed once per (data set, split,
extractor, number of examples) and kept both in this process and on disk under ``eval.cache_dir``
(``reference-<data set>-<split>-<key>.npz``), so trials sharing a cache directory do not recompute them.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from cleanfid.downloads_helper import inception_url
from torch import Tensor, nn

from .config import EvalConfig
from .errors import ConfigError
from .registry import Registry
from .storage import save_atomic

if TYPE_CHECKING:  # the data module only provides the Dataset type; no import cycle at run time
    from .data import Dataset

Extract = Callable[[Tensor], np.ndarray]  # x [N, ...] -> features [N, D] (float64)
# A registered extractor: (dataset, cfg, device) -> (resolved name, extract, info)
ExtractorBuilder = Callable[["Dataset", EvalConfig, torch.device], "tuple[str, Extract, dict]"]

EXTRACTORS: Registry[ExtractorBuilder] = Registry("eval.extractor")

# Bump when the classifier's architecture or training changes: cached classifiers are then retrained.
CLASSIFIER_VERSION = 1
CLASSIFIER_SEED = 0  # the classifier is a shared yardstick: its seed is fixed, not the trial's
FEATURE_BATCH = 500  # examples per forward pass when extracting features
INCEPTION_BATCH = 50  # images per Inception pass (each is 3 x 299 x 299 floats after resizing)
# KID as clean-fid computes it (cleanfid.fid.kernel_distance defaults), from a fixed seed
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 0
# Bump when the content or layout of the reference cache files changes: old files are then ignored.
REFERENCE_CACHE_VERSION = 1

# Where clean-fid keeps the Inception-v3 torchscript weights: cleanfid.features.feature_extractor
# passes "/tmp" ("./" on Windows) to InceptionV3W, which looks for (and would download) the file named
# after cleanfid.downloads_helper.inception_url there. Module-level so tests can point it elsewhere.
INCEPTION_DIR = "./" if platform.system() == "Windows" else "/tmp"
INCEPTION_URL = inception_url
INCEPTION_FILE = os.path.basename(inception_url)  # inception-2015-12-05.pt


# --------------------------------------------------------------------------------------------------
# Frechet distance


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


# --------------------------------------------------------------------------------------------------
# Kernel distance


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


# --------------------------------------------------------------------------------------------------
# Helpers


def _batched_features(
    fn: Callable[[Tensor], Tensor], x: Tensor, device: torch.device, batch_size: int = FEATURE_BATCH
) -> np.ndarray:
    """Apply fn batch by batch under no_grad on device; return float64 numpy features [N, D]."""
    out = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            batch = x[start:start + batch_size].to(device=device, dtype=torch.float32)
            out.append(fn(batch).reshape(batch.shape[0], -1).double().cpu().numpy())
    if not out:
        return np.zeros((0, 0))
    return np.concatenate(out)


# id(tensor) -> (weak reference, tensor._version, digest): data sets are hashed once per process
_DIGESTS: dict[int, tuple[weakref.ref, int, str]] = {}


def _tensor_digest(x: Tensor | None) -> str:
    """sha256 of a tensor's dtype, shape and bytes ("none" for None), memoized while the tensor
    lives and is not modified in place."""
    if x is None:
        return "none"
    memo = _DIGESTS.get(id(x))
    if memo is not None and memo[0]() is x and memo[1] == x._version:
        return memo[2]
    data = x.detach().cpu().contiguous()
    h = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(data.numpy().tobytes())
    digest = h.hexdigest()
    _DIGESTS[id(x)] = (weakref.ref(x), x._version, digest)
    return digest


def _is_image(dataset: "Dataset") -> bool:
    return bool(dataset.is_image)


def _kind(dataset: "Dataset") -> str:
    return "images" if _is_image(dataset) else "2-D points"


def _num_classes(dataset: "Dataset") -> int:
    if dataset.num_classes is not None:
        return int(dataset.num_classes)
    return int(dataset.train_labels.max()) + 1


# --------------------------------------------------------------------------------------------------
# raw


@EXTRACTORS.register("raw")
def build_raw(dataset: "Dataset", cfg: EvalConfig, device: torch.device) -> tuple[str, Extract, dict]:
    """Features = the flattened example (2-D coordinates; for images, pixels)."""

    def extract(x: Tensor) -> np.ndarray:
        return x.detach().reshape(x.shape[0], -1).double().cpu().numpy()

    return "raw", extract, {}


# --------------------------------------------------------------------------------------------------
# classifier


class FeatureClassifier(nn.Module):
    """Small CNN: three 3x3 conv blocks (GroupNorm + ReLU; the last two halve the resolution),
    global average pooling, a penultimate linear feature layer, ReLU and a linear head. Input [N, C, H, W] in
    [-1, 1]; any H, W >= 4."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
                nn.GroupNorm(8, c_out),
                nn.ReLU(),
            )

        self.body = nn.Sequential(
            block(in_channels, width, 1),
            block(width, 2 * width, 2),
            block(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature = nn.Linear(4 * width, feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate layer [N, feature_dim], taken before its ReLU: units that are inactive on
        every input would otherwise be constant zeros and make the covariances singular."""
        return self.feature(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits [N, num_classes]."""
        return self.head(self.features(x))


def _random_shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Shift each image [N, C, H, W] by -1, 0 or +1 pixels in each direction (edge pixels replicated)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dy = torch.randint(0, 3, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 3, (n,), generator=generator).to(x.device)
    rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None])  # [N, H]
    cols = (torch.arange(w, device=x.device)[None, :] + dx[:, None])  # [N, W]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def _classifier_key(dataset: "Dataset", steps: int) -> str:
    """Short hash of everything that determines the trained classifier."""
    spec = {
        "dataset": dataset.name,
        "shape": list(dataset.train.shape[1:]),
        "n_train": int(dataset.train.shape[0]),
        "train": _tensor_digest(dataset.train),
        "train_labels": _tensor_digest(dataset.train_labels),
        "num_classes": _num_classes(dataset),
        "steps": int(steps),
        "version": CLASSIFIER_VERSION,
        "seed": CLASSIFIER_SEED,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def classifier_path(dataset: "Dataset", cfg: EvalConfig) -> str:
    """Cache file of the classifier for this data set and config."""
    key = _classifier_key(dataset, cfg.classifier_steps)
    return os.path.join(os.path.expanduser(cfg.cache_dir), f"classifier-{dataset.name}-{key}.pt")


def train_classifier(
    dataset: "Dataset", steps: int, device: torch.device, batch_size: int = 128, lr: float = 1e-3
) -> FeatureClassifier:
    """Adam + cross-entropy on the labelled train split, random 1-pixel shifts; seeded by
    CLASSIFIER_SEED (the global torch RNG is left untouched)."""
    x, y = dataset.train.to(device), dataset.train_labels.to(device)
    generator = torch.Generator().manual_seed(CLASSIFIER_SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CLASSIFIER_SEED)
        model = FeatureClassifier(x.shape[1], _num_classes(dataset)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    # cosine decay to 5% of lr: the last steps settle, so the features are stable for a given seed
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(step / max(steps, 1), 1.0)))
    )
    model.train()
    for _ in range(steps):
        index = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=generator).to(device)
        loss = F.cross_entropy(model(_random_shift(x[index], generator)), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def classifier_accuracy(model: FeatureClassifier, x: Tensor, y: Tensor, device: torch.device) -> float:
    """Share of examples whose argmax logit is the label."""
    logits = _batched_features(model, x, device)
    return float((logits.argmax(axis=1) == y.cpu().numpy()).mean())


def _state_digest(model: nn.Module) -> str:
    """sha256 of a model's parameters and buffers (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        data = tensor.detach().cpu().contiguous()
        h.update(f"{name}{data.dtype}{tuple(data.shape)}".encode())
        h.update(data.numpy().tobytes())
    return h.hexdigest()


def load_or_train_classifier(
    dataset: "Dataset", cfg: EvalConfig, device: torch.device
) -> tuple[FeatureClassifier, dict]:
    """The cached classifier for this data set, trained and cached first if absent.

    Returns the model (eval mode, on device) and its metadata: ``key``, ``path``, ``accuracy`` (test
    split), ``steps``, ``train_seconds``, ``loaded_from_cache`` and ``weights`` (digest of the weights).
    """
    path = classifier_path(dataset, cfg)
    key = _classifier_key(dataset, cfg.classifier_steps)
    if os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            meta = dict(saved["meta"])
            if meta.get("key") == key:
                model = FeatureClassifier(meta["in_channels"], meta["num_classes"])
                model.load_state_dict(saved["state_dict"])
                return model.to(device).eval(), {**meta, "path": path, "loaded_from_cache": True,
                                                 "weights": _state_digest(model)}
        except Exception:  # unreadable or stale file: retrain and overwrite it
            pass
    start = time.perf_counter()
    model = train_classifier(dataset, cfg.classifier_steps, device)
    seconds = time.perf_counter() - start
    accuracy = float("nan")
    if dataset.test_labels is not None and len(dataset.test) > 0:
        accuracy = classifier_accuracy(model, dataset.test, dataset.test_labels, device)
    meta = {
        "key": key,
        "dataset": dataset.name,
        "in_channels": int(dataset.train.shape[1]),
        "num_classes": _num_classes(dataset),
        "steps": int(cfg.classifier_steps),
        "version": CLASSIFIER_VERSION,
        "accuracy": accuracy,
        "train_seconds": seconds,
    }
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    save_atomic({"state_dict": state, "meta": meta}, path)
    return model, {**meta, "path": path, "loaded_from_cache": False, "weights": _state_digest(model)}


@EXTRACTORS.register("classifier")
def build_classifier(dataset: "Dataset", cfg: EvalConfig, device: torch.device) -> tuple[str, Extract, dict]:
    """Features = penultimate layer of a CNN trained on the data set's labelled train split."""
    if not _is_image(dataset):
        raise ConfigError("eval.extractor", "classifier", "raw",
                          detail=f"data set {dataset.name} is {_kind(dataset)}, not images")
    if dataset.train_labels is None:
        raise ConfigError("eval.extractor", "classifier", "inception or raw",
                          detail=f"data set {dataset.name} has no labels")
    if cfg.classifier_steps < 1:
        raise ConfigError("eval.classifier_steps", cfg.classifier_steps, "an integer >= 1")
    model, info = load_or_train_classifier(dataset, cfg, device)

    def extract(x: Tensor) -> np.ndarray:
        return _batched_features(lambda batch: model.features(batch.clamp(-1, 1)), x, device)

    return "classifier", extract, info


# --------------------------------------------------------------------------------------------------
# inception (clean-fid)


# (path, size, mtime) -> sha256 of the file: the Inception weights are hashed once per process
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: str) -> str:
    """sha256 of a file's bytes, memoized while its size and modification time do not change."""
    stat = os.stat(path)
    memo_key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                h.update(chunk)
        _FILE_DIGESTS[memo_key] = h.hexdigest()
    return _FILE_DIGESTS[memo_key]


def inception_weights_path() -> str:
    """Where clean-fid looks for the Inception-v3 torchscript file (see INCEPTION_DIR)."""
    return os.path.join(INCEPTION_DIR, INCEPTION_FILE)


def _to_cleanfid_input(x: Tensor) -> Tensor:
    """[-1, 1] images [N, C, H, W] -> [N, 3, 299, 299] float in [0, 255] as clean-fid's "clean" mode
    prepares them: grey repeated to 3 channels, each channel resized by PIL bicubic in float ("F")
    mode and clipped to [0, 255] (cleanfid.resize.build_resizer("clean")). Not quantized to uint8:
    samples and reference images take the same float path, as in cleanfid.fid.get_model_features."""
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")  # HWC float [0, 255] -> [299, 299, 3] float32
    images = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    elif images.shape[1] != 3:
        raise ValueError(f"inception features need 1 or 3 channels, got {images.shape[1]}")
    resized = [resize(image.permute(1, 2, 0).numpy()) for image in images]
    return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).contiguous()


@EXTRACTORS.register("inception")
def build_inception(dataset: "Dataset", cfg: EvalConfig, device: torch.device) -> tuple[str, Extract, dict]:
    """clean-fid's Inception-v3 2048-d pool features (mode "clean"), from weights already on disk."""
    if not _is_image(dataset):
        raise ConfigError("eval.extractor", "inception", "raw",
                          detail=f"data set {dataset.name} is {_kind(dataset)}, not images")
    path = inception_weights_path()
    if not os.path.isfile(path):
        raise ConfigError(
            "eval.extractor", "inception", "classifier or raw",
            detail=f"Inception weights not found at {path}; download them to that path "
                   f"(e.g. curl -L -o {path} {INCEPTION_URL}) or choose another extractor",
        )
    from cleanfid.inception_torchscript import InceptionV3W

    model = InceptionV3W(os.path.dirname(path), download=False, resize_inside=False).to(device).eval()

    def extract(x: Tensor) -> np.ndarray:  # resized batch by batch: 299 x 299 copies are large
        return _batched_features(lambda batch: model(_to_cleanfid_input(batch).to(device)), x, device,
                                 batch_size=INCEPTION_BATCH)

    return "inception", extract, {"path": path, "weights": _file_digest(path)}


# --------------------------------------------------------------------------------------------------
# auto and lookup


@EXTRACTORS.register("auto")
def build_auto(dataset: "Dataset", cfg: EvalConfig, device: torch.device) -> tuple[str, Extract, dict]:
    """classifier for labelled images, inception for unlabelled images, raw for 2-D points."""
    if not _is_image(dataset):
        return build_raw(dataset, cfg, device)
    if dataset.train_labels is not None:
        return build_classifier(dataset, cfg, device)
    return build_inception(dataset, cfg, device)


def get_extractor(name: str, dataset: "Dataset", cfg: EvalConfig, device: torch.device) -> tuple[str, Extract, dict]:
    """(resolved name, extract(x [N, ...]) -> np.ndarray [N, D], info) for extractor `name`."""
    return EXTRACTORS.get(name)(dataset, cfg, torch.device(device))


# --------------------------------------------------------------------------------------------------
# FID


@dataclass
class FIDResult:
    fid: float  # FID of the first n samples against the reference split's statistics
    fid_reference: float  # FID of n held-out real examples against the same statistics (the floor)
    n: int  # examples on each side of both distances
    tags: dict[str, str] = field(default_factory=dict)  # fid.extractor, fid.reference_split, fid.n, ...
    kid: float | None = None  # KID of the same n samples against the reference split's features (eval.kid)
    kid_reference: float | None = None  # KID of the same n held-out real examples (the floor)


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
        raise ConfigError("eval.reference_split", split, "train or test")
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
    """Write an .npz (no pickles) next to its final path, then os.replace it there. Features are
    stored as float32 when that is exact (network features are float32 widened to float64)."""
    features = reference.features
    narrow = features.astype(np.float32)
    if np.array_equal(narrow.astype(np.float64), features):
        features = narrow
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, features=features, mu=reference.mu, sigma=reference.sigma,
                     key=np.array(reference.key), spec=np.array(json.dumps(spec, sort_keys=True)))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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


def compute_fid(samples: Tensor, dataset: "Dataset", cfg: EvalConfig, device: torch.device) -> FIDResult:
    """FID (and, if ``cfg.kid``, KID) of `samples` (shaped like the data set's examples, images in
    [-1, 1]) and their floors.

    n = cfg.fid_n, or min(len(samples), len(test split)). ``fid``: the first n samples against the
    statistics of the full ``cfg.reference_split``. ``fid_reference``: n held-out real examples
    against the same statistics: the first n test examples when the reference is the train split;
    a fixed seeded choice of n train examples when it is the test split. ``kid`` and
    ``kid_reference``: the same two sets against the reference split's features (:func:`kernel_distance`).
    The reference features are cached under ``cfg.cache_dir`` (:func:`reference_features`).
    """
    if cfg.reference_split not in ("train", "test"):
        raise ConfigError("eval.reference_split", cfg.reference_split, "train or test")
    if tuple(samples.shape[1:]) != tuple(dataset.shape):
        raise ValueError(f"samples of shape {tuple(samples.shape[1:])} do not match the data set's {tuple(dataset.shape)}")
    held_out = dataset.test if cfg.reference_split == "train" else dataset.train
    available = min(len(samples), len(dataset.test), len(held_out))
    n = cfg.fid_n if cfg.fid_n is not None else available
    if n > available or n < 2:
        raise ConfigError(
            "eval.fid_n", cfg.fid_n, f"an integer in [2, {available}] or null",
            detail=f"{len(samples)} samples, {len(dataset.test)} test and {len(dataset.train)} train examples",
        )
    name, extract, info = get_extractor(cfg.extractor, dataset, cfg, device)
    reference = reference_features(dataset, cfg.reference_split, name, extract, info, cfg.cache_dir)

    if cfg.reference_split == "train":
        held_out = held_out[:n]
    else:
        generator = torch.Generator().manual_seed(0)
        held_out = held_out[torch.randperm(len(held_out), generator=generator)[:n]]
    sample_features, held_out_features = extract(samples[:n]), extract(held_out)
    fid = frechet_from_stats(*feature_stats(sample_features), reference.mu, reference.sigma)
    fid_reference = frechet_from_stats(*feature_stats(held_out_features), reference.mu, reference.sigma)

    tags = {"fid.extractor": name, "fid.reference_split": cfg.reference_split, "fid.n": str(n)}
    if name == "classifier":
        tags["fid.classifier_accuracy"] = f"{info['accuracy']:.4f}"
    kid = kid_reference = None
    if cfg.kid:
        # clean-fid's argument order (reference first); the same seed for both, so the reference
        # side of every subset pair is the same in kid and kid_reference
        kid = kernel_distance(reference.features, sample_features)
        kid_reference = kernel_distance(reference.features, held_out_features)
        tags["kid.subsets"] = str(KID_SUBSETS)
        tags["kid.subset_size"] = str(min(n, len(reference.features), KID_SUBSET_SIZE))
    return FIDResult(fid=fid, fid_reference=fid_reference, n=n, tags=tags, kid=kid, kid_reference=kid_reference)


# --------------------------------------------------------------------------------------------------
# Conditional sampling


def conditional_metrics(samples: Tensor, labels: Tensor, dataset: "Dataset", cfg: EvalConfig,
                        device: torch.device) -> tuple[dict[str, float], dict[str, str]]:
    """How well samples asked for classes ``labels [n]`` match them, on a labelled image data set.

    ``class_accuracy``: the share of samples that the data set's classifier (the network of the
    ``classifier`` FID extractor, :func:`load_or_train_classifier`) assigns to their requested class;
    ``class_accuracy_reference`` is its accuracy on the test split (the ceiling). ``fid_class_mean``: the
    mean over classes of the FID of the samples of class c against the class-c train examples (classifier
    features), with ``fid_class_reference_mean``, the same for the class-c test examples (the floor), and
    ``fid_class_<c>`` per class. Returns (metrics, tags)."""
    if not _is_image(dataset) or dataset.train_labels is None:
        raise ConfigError("data.name", dataset.name, "a labelled image data set for per-class metrics")
    model, info = load_or_train_classifier(dataset, cfg, device)
    samples = samples.clamp(-1, 1)
    predicted = torch.from_numpy(_batched_features(model, samples, device).argmax(axis=1))
    metrics = {"class_accuracy": float((predicted == labels.cpu()).float().mean()),
               "class_accuracy_reference": float(info["accuracy"])}

    def features(x: Tensor) -> np.ndarray:
        return _batched_features(lambda batch: model.features(batch.clamp(-1, 1)), x, device)

    sample_features, train_features, test_features = features(samples), features(dataset.train), features(dataset.test)
    fids, floors = [], []
    for c in range(_num_classes(dataset)):
        mine, train_c = sample_features[labels.cpu().numpy() == c], train_features[dataset.train_labels.numpy() == c]
        test_c = test_features[dataset.test_labels.numpy() == c]
        count = min(len(mine), len(test_c))
        if count < 2:
            continue
        reference = feature_stats(train_c)
        fids.append(frechet_from_stats(*feature_stats(mine[:count]), *reference))
        floors.append(frechet_from_stats(*feature_stats(test_c[:count]), *reference))
        metrics[f"fid_class_{c}"] = fids[-1]
    if fids:
        metrics["fid_class_mean"] = float(np.mean(fids))
        metrics["fid_class_reference_mean"] = float(np.mean(floors))
    tags = {"class_metrics.classifier": f"classifier-{info['key'][:16]}", "class_metrics.classes": str(len(fids))}
    return metrics, tags
