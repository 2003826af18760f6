"""The feature extractors FID and KID compare in, registered under ``eval.extractor``:

- ``inception``: clean-fid's Inception-v3 pool features, mode "clean" (PIL bicubic resize to 299x299
  on float images in [0, 255]), from its weights file under ``cache_dir`` (or clean-fid's own location),
  downloaded there on first use only with ``download`` (:mod:`diffusion.metrics.downloads`).
- ``classifier``: the penultimate layer of a small CNN trained on the labelled train split of the
  data set itself, cached on disk (:mod:`diffusion.metrics.classifier`).
- ``raw``: the flattened coordinates (2-D toy data; pixel space for images).
- ``auto``: ``classifier`` for labelled image sets, ``inception`` for unlabelled image sets,
  ``raw`` for 2-D points.

Each builder takes the data set and the keyword options it reads of ``classifier_steps``, ``cache_dir`` and
``device`` (:func:`get_extractor` passes it those it declares) and returns (resolved name, extract, info);
``info`` is what identifies the features in the reference cache key
(:func:`diffusion.metrics.reference._extractor_identity`). An extractor that cannot serve a data set (the
classifier on points or unlabelled images, Inception on points) is refused with a ValueError naming
``extractor``; :func:`extractor_refusal` says why, for a config-level caller to raise it as a ``ConfigError``
naming ``eval.extractor``. Inception without its weights on disk and without ``download`` raises
:class:`~diffusion.metrics.downloads.MissingFileError` (``fid.missing_fid_files`` lists what is missing).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from ..registry import Registry, options_for
from .classifier import load_or_train_classifier
from .common import Extract, _batched_features, _device, _is_image, _kind
from .downloads import file_sha256, inception_weights

if TYPE_CHECKING:  # the data module only provides the Dataset type; no import cycle at run time
    from ..data import Dataset

# A registered extractor: (dataset, **options) -> (resolved name, extract, info), the options being those of
# classifier_steps, cache_dir, download and device it declares
ExtractorBuilder = Callable[..., "tuple[str, Extract, dict]"]

EXTRACTORS: Registry[ExtractorBuilder] = Registry("eval.extractor")

INCEPTION_BATCH = 50  # images per Inception pass (each is 3 x 299 x 299 floats after resizing)

# --------------------------------------------------------------------------------------------------
# raw


@EXTRACTORS.register("raw")
def build_raw(dataset: "Dataset") -> tuple[str, Extract, dict]:
    """Features = the flattened example (2-D coordinates; for images, pixels)."""

    def extract(x: Tensor) -> np.ndarray:
        return x.detach().reshape(x.shape[0], -1).double().cpu().numpy()

    return "raw", extract, {}


# --------------------------------------------------------------------------------------------------
# classifier


@EXTRACTORS.register("classifier")
def build_classifier(dataset: "Dataset", *, classifier_steps: int = 1500,
                     cache_dir: str = "~/.cache/diffusion-orchestrator",
                     device: Optional[torch.device] = None) -> tuple[str, Extract, dict]:
    """Features = penultimate layer of a CNN trained on the data set's labelled train split for
    ``classifier_steps`` steps on ``device`` (default: the CPU), or loaded from its file under ``cache_dir``
    (:func:`load_or_train_classifier`)."""
    _refuse("classifier", dataset)
    if classifier_steps < 1:
        raise ValueError(f"classifier_steps: invalid value {classifier_steps!r}; accepted: an integer >= 1")
    device = _device(device)
    model, info = load_or_train_classifier(dataset, classifier_steps=classifier_steps, cache_dir=cache_dir,
                                           device=device)

    def extract(x: Tensor) -> np.ndarray:
        return _batched_features(lambda batch: model.features(batch.clamp(-1, 1)), x, device)

    return "classifier", extract, info


# --------------------------------------------------------------------------------------------------
# inception (clean-fid)


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


def cleanfid_extract(network: Callable[[Tensor], Tensor], device: Optional[torch.device] = None,
                     batch_size: Optional[int] = None) -> Extract:
    """extract(x [N, C, H, W] in [-1, 1]) -> features [N, D]: ``network`` (a clean-fid feature extractor: it takes
    [B, 3, 299, 299] floats in [0, 255]) on the images as clean-fid's "clean" mode prepares them
    (:func:`_to_cleanfid_input`), ``batch_size`` (default ``INCEPTION_BATCH``) images at a time on ``device``
    (default: the CPU). The ``inception`` extractor with clean-fid's network; any other with another."""
    device = _device(device)

    def extract(x: Tensor) -> np.ndarray:  # resized batch by batch: 299 x 299 copies are large
        return _batched_features(lambda batch: network(_to_cleanfid_input(batch).to(device)), x, device,
                                 batch_size=batch_size or INCEPTION_BATCH)

    return extract


@EXTRACTORS.register("inception")
def build_inception(dataset: "Dataset", *, cache_dir: str = "~/.cache/diffusion-orchestrator", download: bool = False,
                    device: Optional[torch.device] = None) -> tuple[str, Extract, dict]:
    """clean-fid's Inception-v3 2048-d pool features (mode "clean") on ``device`` (default: the CPU), from its
    weights file under ``cache_dir`` or clean-fid's location (:func:`~diffusion.metrics.downloads.inception_weights`;
    with ``download``, fetched into ``<cache_dir>/inception`` when missing; MissingFileError otherwise)."""
    _refuse("inception", dataset)
    device = _device(device)
    path = inception_weights(cache_dir, download=download)
    from cleanfid.inception_torchscript import InceptionV3W

    try:
        model = InceptionV3W(os.path.dirname(path), download=False, resize_inside=False).to(device).eval()
    except Exception as error:  # noqa: BLE001 - a damaged or foreign file: say which, and how to replace it
        raise ValueError(f"{path} does not load as clean-fid's Inception torchscript ({type(error).__name__}: "
                         f"{str(error)[:200]}); delete it to download it again") from None
    return "inception", cleanfid_extract(model, device), {"path": path, "weights": file_sha256(path)}


# --------------------------------------------------------------------------------------------------
# auto and lookup


def resolve_extractor(extractor: str, dataset: "Dataset") -> str:
    """The extractor ``extractor`` stands for on ``dataset``: ``auto`` is classifier for labelled images,
    inception for unlabelled images, raw for 2-D points; any other name is itself."""
    if extractor != "auto":
        return extractor
    if not _is_image(dataset):
        return "raw"
    return "classifier" if dataset.train_labels is not None else "inception"


class Refusal(NamedTuple):
    """Why an extractor cannot serve a data set: the extractor (``auto`` resolved), what would be accepted, the
    reason; ``ConfigError("eval.extractor", *refusal)`` at a config-level caller."""

    value: str
    accepted: str
    detail: str


def extractor_refusal(extractor: str, dataset: "Dataset") -> Optional[Refusal]:
    """Why the extractor named ``extractor`` (``auto`` resolved by :func:`resolve_extractor`) cannot give
    features of ``dataset``, or None when it can: the classifier needs labelled images, Inception images (its
    weights file is another question: ``fid.missing_fid_files``)."""
    name = resolve_extractor(extractor, dataset)
    if name in ("classifier", "inception") and not _is_image(dataset):
        return Refusal(name, "raw", f"data set {dataset.name} is {_kind(dataset)}, not images")
    if name == "classifier" and dataset.train_labels is None:
        return Refusal(name, "inception or raw", f"data set {dataset.name} has no labels")
    return None


def _refuse(extractor: str, dataset: "Dataset") -> None:
    """ValueError naming ``extractor`` when it cannot serve the data set (:func:`extractor_refusal`)."""
    refusal = extractor_refusal(extractor, dataset)
    if refusal is not None:
        raise ValueError(f"extractor: invalid value {refusal.value!r}; accepted: {refusal.accepted} ({refusal.detail})")


@EXTRACTORS.register("auto")
def build_auto(dataset: "Dataset", *, classifier_steps: int = 1500,
               cache_dir: str = "~/.cache/diffusion-orchestrator", download: bool = False,
               device: Optional[torch.device] = None) -> tuple[str, Extract, dict]:
    """classifier for labelled images, inception for unlabelled images, raw for 2-D points
    (:func:`resolve_extractor`), built with the options it reads."""
    builder = EXTRACTORS.get(resolve_extractor("auto", dataset))
    return builder(dataset, **options_for(builder, None, classifier_steps=classifier_steps, cache_dir=cache_dir,
                                          download=download, device=device))


def get_extractor(extractor: str, dataset: "Dataset", *, classifier_steps: int = 1500,
                  cache_dir: str = "~/.cache/diffusion-orchestrator", download: bool = False,
                  device: Optional[torch.device] = None) -> tuple[str, Extract, dict]:
    """(resolved name, extract(x [N, ...]) -> np.ndarray [N, D], info) for the extractor named ``extractor``
    (``EXTRACTORS``: auto, classifier, inception, raw). ``classifier_steps``: training steps of the classifier
    extractor's network, cached under ``cache_dir`` (a config's ``eval.classifier_steps`` and ``eval.cache_dir``);
    ``download``: fetch the Inception weights into ``<cache_dir>/inception`` when missing (``eval.download``);
    ``device``: where features are computed (default: the CPU). ValueError naming ``extractor`` when it cannot
    serve the data set (:func:`extractor_refusal`); MissingFileError for Inception weights not on disk without
    ``download``."""
    builder = EXTRACTORS.get(extractor)
    return builder(dataset, **options_for(builder, None, classifier_steps=classifier_steps, cache_dir=cache_dir,
                                          download=download, device=_device(device)))

