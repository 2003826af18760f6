"""The feature extractors FID and KID compare in, registered under ``eval.extractor``:

- ``inception``: clean-fid's Inception-v3 pool features, mode "clean" (PIL bicubic resize to 299x299
  on float images in [0, 255]); only when its weights are already on disk, never downloaded here.
- ``classifier``: the penultimate layer of a small CNN trained on the labelled train split of the
  data set itself, cached on disk (:mod:`diffusion.metrics.classifier`).
- ``raw``: the flattened coordinates (2-D toy data; pixel space for images).
- ``auto``: ``classifier`` for labelled image sets, ``inception`` for unlabelled image sets,
  ``raw`` for 2-D points.

Each builder returns (resolved name, extract, info); ``info`` is what identifies the features in the
reference cache key (:func:`diffusion.metrics.reference._extractor_identity`).
"""
from __future__ import annotations

import os
import platform
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from cleanfid.downloads_helper import inception_url
from torch import Tensor

from ..config import EvalConfig
from ..errors import ConfigError
from ..registry import Registry
from ..storage import file_digest
from .classifier import load_or_train_classifier
from .common import Extract, _batched_features, _is_image, _kind

if TYPE_CHECKING:  # the data module only provides the Dataset type; no import cycle at run time
    from ..data import Dataset

# A registered extractor: (dataset, cfg, device) -> (resolved name, extract, info)
ExtractorBuilder = Callable[["Dataset", EvalConfig, torch.device], "tuple[str, Extract, dict]"]

EXTRACTORS: Registry[ExtractorBuilder] = Registry("eval.extractor")

INCEPTION_BATCH = 50  # images per Inception pass (each is 3 x 299 x 299 floats after resizing)

# Where clean-fid keeps the Inception-v3 torchscript weights: cleanfid.features.feature_extractor
# passes "/tmp" ("./" on Windows) to InceptionV3W, which looks for (and would download) the file named
# after cleanfid.downloads_helper.inception_url there. Module-level so tests can point it elsewhere
# (patch it here, in diffusion.metrics.extractors: the package only re-exports its value).
INCEPTION_DIR = "./" if platform.system() == "Windows" else "/tmp"
INCEPTION_URL = inception_url
INCEPTION_FILE = os.path.basename(inception_url)  # inception-2015-12-05.pt


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
        _FILE_DIGESTS[memo_key] = file_digest(path)["sha256"]
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

