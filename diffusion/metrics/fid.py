"""FID and KID of a sample set against a split's reference statistics, with their floors, and the
per-class metrics of conditional samples.

Every FID is reported next to ``fid_reference``: the FID of as many held-out real examples against
the same reference statistics. A sample set of size n cannot be expected to beat it, since FID is
biased upwards at finite n (Binkowski et al. 2018, "Demystifying MMD GANs"; Chong & Forsyth 2020,
"Effectively Unbiased FID and Inception Score and Where to Find Them").

KID (``kid``, a config's ``eval.kid``) needs the reference features themselves, not only their mean and
covariance. It is reported next to ``kid_reference``, the KID of the same held-out real examples as
``fid_reference``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from torch import Tensor

from .classifier import load_or_train_classifier
from .common import _batched_features, _device, _is_image, _num_classes
from .distances import KID_SUBSET_SIZE, KID_SUBSETS, feature_stats, frechet_from_stats, kernel_distance
from .extractors import get_extractor
from .reference import reference_features
from .uncertainty import FID_INF_POINTS, FIDInfinity, fid_infinity, fid_jackknife, kid_jackknife

if TYPE_CHECKING:  # the data module only provides the Dataset type; no import cycle at run time
    from ..data import Dataset


@dataclass
class FIDResult:
    fid: float  # FID of the first n samples against the reference split's statistics
    fid_reference: float  # FID of n held-out real examples against the same statistics (the floor)
    n: int  # examples on each side of both distances
    tags: dict[str, str] = field(default_factory=dict)  # fid.extractor, fid.reference_split, fid.n, ...
    kid: float | None = None  # KID of the same n samples against the reference split's features (kid=True)
    kid_reference: float | None = None  # KID of the same n held-out real examples (the floor)
    fid_stderr: float | None = None  # jackknife standard error of fid over the samples (stderr=True)
    fid_reference_stderr: float | None = None  # the same for fid_reference over the held-out examples
    kid_stderr: float | None = None  # jackknife standard error of kid over the samples and the reference (kid and stderr)
    kid_reference_stderr: float | None = None  # the same for kid_reference over the held-out examples and the reference
    fid_inf: Optional[FIDInfinity] = None  # FID-infinity of the samples, with its fit (fid_inf=True)
    fid_inf_reference: Optional[FIDInfinity] = None  # FID-infinity of the held-out examples (the floor at N = inf)


def available_examples(samples: int, dataset: "Dataset", reference_split: str = "train") -> int:
    """The most examples FID can compare on each side given ``samples`` samples: min(samples, test split,
    held-out split), the held-out split being the test split when the reference is the train split and the
    train split when it is the test split."""
    held_out = dataset.test if reference_split == "train" else dataset.train
    return min(samples, len(dataset.test), len(held_out))


def compute_fid(samples: Tensor, dataset: "Dataset", *, extractor: str = "auto", reference_split: str = "train",
                n: Optional[int] = None, kid: bool = True, classifier_steps: int = 1500,
                cache_dir: str = "~/.cache/diffusion-orchestrator", device: Optional[torch.device] = None,
                stderr: bool = True, fid_inf: bool = True) -> FIDResult:
    """FID (and, if ``kid``, KID) of `samples` (shaped like the data set's examples, images in
    [-1, 1]) and their floors, in the features of ``extractor`` (:func:`get_extractor`: auto, classifier,
    inception, raw; the classifier trained for ``classifier_steps`` steps) computed on ``device`` (default:
    the CPU). The defaults are a config's eval section's (``eval.extractor``, ``eval.reference_split``,
    ``eval.fid_n``, ``eval.kid``, ``eval.classifier_steps``, ``eval.cache_dir``).

    ``n`` (default: :func:`available_examples`, min(len(samples), len(test split))) is the number of
    examples on each side, in [2, available]. ``fid``: the first n samples against the statistics of the
    full ``reference_split`` (train or test). ``fid_reference``: n held-out real examples against the same
    statistics: the first n test examples when the reference is the train split; a fixed seeded choice of
    n train examples when it is the test split. ``kid`` and ``kid_reference``: the same two sets against
    the reference split's features (:func:`kernel_distance`). With ``stderr``, ``fid_stderr`` and
    ``fid_reference_stderr``: the standard errors of both FIDs over their examples (:func:`fid_jackknife`), and
    with ``kid`` also ``kid_stderr`` and ``kid_reference_stderr``, both KIDs' over their examples and the
    reference features (:func:`kid_jackknife`, computed after both KIDs);
    with ``fid_inf``, FID-infinity of both sets (:func:`fid_infinity`; where there are too few samples for the
    feature dimension, the tag ``fid_inf.skipped`` says so instead). The reference features (and the classifier)
    are cached under ``cache_dir`` (:func:`reference_features`). ValueError naming the parameter for a
    ``reference_split`` other than train or test, an ``n`` out of range and an ``extractor`` that cannot
    serve the data set.
    """
    if reference_split not in ("train", "test"):
        raise ValueError(f"reference_split: invalid value {reference_split!r}; accepted: train or test")
    if tuple(samples.shape[1:]) != tuple(dataset.shape):
        raise ValueError(f"samples of shape {tuple(samples.shape[1:])} do not match the data set's {tuple(dataset.shape)}")
    held_out = dataset.test if reference_split == "train" else dataset.train
    available = available_examples(len(samples), dataset, reference_split)
    count = n if n is not None else available
    if count > available or count < 2:
        raise ValueError(f"n: invalid value {n!r}; accepted: an integer in [2, {available}] or None ({len(samples)} "
                         f"samples, {len(dataset.test)} test and {len(dataset.train)} train examples)")
    n = count
    name, extract, info = get_extractor(extractor, dataset, classifier_steps=classifier_steps, cache_dir=cache_dir,
                                        device=_device(device))
    reference = reference_features(dataset, reference_split, name, extract, info, cache_dir)

    if reference_split == "train":
        held_out = held_out[:n]
    else:
        generator = torch.Generator().manual_seed(0)
        held_out = held_out[torch.randperm(len(held_out), generator=generator)[:n]]
    sample_features, held_out_features = extract(samples[:n]), extract(held_out)
    fid = frechet_from_stats(*feature_stats(sample_features), reference.mu, reference.sigma)
    fid_reference = frechet_from_stats(*feature_stats(held_out_features), reference.mu, reference.sigma)

    tags = {"fid.extractor": name, "fid.reference_split": reference_split, "fid.n": str(n)}
    if name == "classifier":
        tags["fid.classifier_accuracy"] = f"{info['accuracy']:.4f}"
    kid_value = kid_reference = None
    if kid:
        # clean-fid's argument order (reference first); the same seed for both, so the reference
        # side of every subset pair is the same in kid and kid_reference
        kid_value = kernel_distance(reference.features, sample_features)
        kid_reference = kernel_distance(reference.features, held_out_features)
        tags["kid.subsets"] = str(KID_SUBSETS)
        tags["kid.subset_size"] = str(min(n, len(reference.features), KID_SUBSET_SIZE))
    result = FIDResult(fid=fid, fid_reference=fid_reference, n=n, tags=tags, kid=kid_value, kid_reference=kid_reference)
    if stderr:
        result.fid_stderr = fid_jackknife(sample_features, reference.mu, reference.sigma)[0]
        result.fid_reference_stderr = fid_jackknife(held_out_features, reference.mu, reference.sigma)[0]
        tags["fid.stderr"] = "delete-1 jackknife over the examples, reference fixed"
        if kid:
            result.kid_stderr = kid_jackknife(reference.features, sample_features).stderr
            result.kid_reference_stderr = kid_jackknife(reference.features, held_out_features).stderr
            tags["kid.stderr"] = "two-sample delete-1 jackknife of the MMD^2 of all examples: examples and reference"
    if fid_inf:
        try:
            result.fid_inf = fid_infinity(sample_features, reference.mu, reference.sigma)
            result.fid_inf_reference = fid_infinity(held_out_features, reference.mu, reference.sigma)
            tags["fid_inf.points"] = str(FID_INF_POINTS)
        except ValueError as error:  # too few samples for the feature dimension
            tags["fid_inf.skipped"] = str(error)
    return result


# --------------------------------------------------------------------------------------------------
# Conditional sampling


def conditional_metrics(samples: Tensor, labels: Tensor, dataset: "Dataset", *, classifier_steps: int = 1500,
                        cache_dir: str = "~/.cache/diffusion-orchestrator",
                        device: Optional[torch.device] = None) -> tuple[dict[str, float], dict[str, str]]:
    """How well samples asked for classes ``labels [n]`` match them, on a labelled image data set.

    ``class_accuracy``: the share of samples that the data set's classifier (the network of the
    ``classifier`` FID extractor, :func:`load_or_train_classifier`: trained for ``classifier_steps`` steps,
    cached under ``cache_dir``, a config's ``eval.classifier_steps`` and ``eval.cache_dir``; features computed
    on ``device``, default the CPU) assigns to their requested class;
    ``class_accuracy_reference`` is its accuracy on the test split (the ceiling). ``fid_class_mean``: the
    mean over classes of the FID of the samples of class c against the class-c train examples (classifier
    features), with ``fid_class_reference_mean``, the same for the class-c test examples (the floor), and
    ``fid_class_<c>`` per class. Returns (metrics, tags); ValueError naming ``dataset`` unless it holds labelled
    images."""
    if not _is_image(dataset) or dataset.train_labels is None:
        raise ValueError(f"dataset: invalid value {dataset.name!r}; accepted: a labelled image data set for "
                         "per-class metrics")
    device = _device(device)
    model, info = load_or_train_classifier(dataset, classifier_steps=classifier_steps, cache_dir=cache_dir,
                                           device=device)
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
