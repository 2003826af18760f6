"""FID and KID of a sample set against a split's reference statistics, with their floors, and the
per-class metrics of conditional samples.

Every FID is reported next to ``fid_reference``: the FID of as many held-out real examples against
the same reference statistics. A sample set of size n cannot be expected to beat it, since FID is
biased upwards at finite n (Binkowski et al. 2018, "Demystifying MMD GANs"; Chong & Forsyth 2020,
"Effectively Unbiased FID and Inception Score and Where to Find Them").

KID (``kid``, a config's ``eval.kid``) needs the reference features themselves, not only their mean and
covariance. It is reported next to ``kid_reference``, the KID of the same held-out real examples as
``fid_reference``.

The reference statistics (``reference``, a config's ``eval.reference``) are the data set's own split
(``split``: its features computed here, :mod:`~diffusion.metrics.reference`) or statistics clean-fid publishes
(``cleanfid:<set>-<res>-<split>``, :mod:`~diffusion.metrics.downloads`): the mean and covariance of Inception
features of the whole published split, the number papers report. Those hold no features, so no KID.
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
from .downloads import REFERENCES, MissingFile, load_published_stats, missing_inception_weights, missing_published_stats
from .extractors import Refusal, get_extractor, resolve_extractor
from .reference import reference_features
from .uncertainty import FID_INF_POINTS, FIDInfinity, fid_infinity, fid_jackknife, kid_jackknife

if TYPE_CHECKING:  # the data module only provides the Dataset type; no import cycle at run time
    from ..data import Dataset


@dataclass
class FIDResult:
    fid: float  # FID of the first n samples against the reference split's statistics
    fid_reference: float  # FID of n held-out real examples against the same statistics (the floor)
    n: int  # examples on each side of both distances
    tags: dict[str, str] = field(default_factory=dict)  # fid.extractor, fid.reference, fid.n, ...
    kid: float | None = None  # KID of the same n samples against the reference split's features (kid=True; not
    # with published statistics)
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


def reference_refusal(reference: str, dataset: "Dataset", extractor: str = "inception") -> Optional[tuple[str, Refusal]]:
    """Why ``reference`` (an ``eval.reference`` value) cannot serve ``dataset`` with ``extractor``, as (the config
    key to name, :class:`Refusal`), or None when it can: published statistics are of clean-fid's Inception
    features (``extractor`` must resolve to inception) of [3, res, res] images (the data set's must match)."""
    published = REFERENCES.get(reference)
    if published is None:
        return None
    name = resolve_extractor(extractor, dataset)
    if name != "inception":
        return "eval.extractor", Refusal(extractor, "inception",
                                         f"eval.reference {reference} holds clean-fid's Inception statistics; "
                                         f"{name} features do not compare with them")
    if tuple(dataset.shape) != published.shape:
        matching = [key for key in REFERENCES.names() if REFERENCES.get(key) is not None and
                    REFERENCES.get(key).shape == tuple(dataset.shape)]
        return "eval.reference", Refusal(reference, ", ".join(["split", *matching]),
                                         f"{reference} is of {published.res}x{published.res} RGB images; data set "
                                         f"{dataset.name} holds images of shape {tuple(dataset.shape)}")
    return None


def missing_fid_files(dataset: "Dataset", *, extractor: str = "auto", reference: str = "split",
                      cache_dir: str = "~/.cache/diffusion-orchestrator", download: bool = False) -> list[MissingFile]:
    """The files FID on ``dataset`` needs that are not on disk and would not be downloaded (``download`` false):
    clean-fid's Inception weights when ``extractor`` resolves to inception, and the published statistics a
    ``cleanfid:...`` ``reference`` names (:mod:`~diffusion.metrics.downloads`). Empty with ``download``."""
    if download:
        return []
    missing = []
    if resolve_extractor(extractor, dataset) == "inception":
        missing.append(missing_inception_weights(cache_dir))
    published = REFERENCES.get(reference)
    if published is not None:
        missing.append(missing_published_stats(published, cache_dir))
    return [item for item in missing if item is not None]


def compute_fid(samples: Tensor, dataset: "Dataset", *, extractor: str = "auto", reference: str = "split",
                reference_split: str = "train", n: Optional[int] = None, kid: bool = True, classifier_steps: int = 1500,
                cache_dir: str = "~/.cache/diffusion-orchestrator", download: bool = False,
                device: Optional[torch.device] = None, stderr: bool = True, fid_inf: bool = True) -> FIDResult:
    """FID (and, if ``kid``, KID) of `samples` (shaped like the data set's examples, images in
    [-1, 1]) and their floors, in the features of ``extractor`` (:func:`get_extractor`: auto, classifier,
    inception, raw; the classifier trained for ``classifier_steps`` steps) computed on ``device`` (default:
    the CPU). The defaults are a config's eval section's (``eval.extractor``, ``eval.reference``,
    ``eval.reference_split``, ``eval.fid_n``, ``eval.kid``, ``eval.classifier_steps``, ``eval.cache_dir``,
    ``eval.download``).

    ``reference``: ``split`` compares against the statistics of the full ``reference_split`` (train or test) of
    the data set, in features computed here; a ``cleanfid:<set>-<res>-<split>`` name against clean-fid's
    published statistics of that split (:data:`~diffusion.metrics.downloads.REFERENCES`; inception features of
    [3, res, res] images only, :func:`reference_refusal`), read from ``cache_dir`` or fetched with ``download``;
    the local split that plays its part is the test split for a published test split, else the train split, and
    ``reference_split`` is not read.

    ``n`` (default: :func:`available_examples`, min(len(samples), len(test split))) is the number of
    examples on each side, in [2, available]. ``fid``: the first n samples against the reference statistics.
    ``fid_reference``: n held-out real examples against the same statistics: the first n test examples when the
    reference is the train split; a fixed seeded choice of n train examples when it is the test split (with
    published statistics of another data set than ``dataset``, the tag ``fid.reference_floor`` says it is no
    floor). ``kid`` and ``kid_reference``: the same two sets against the reference split's features
    (:func:`kernel_distance`; published statistics hold none: tag ``kid.skipped``). With ``stderr``,
    ``fid_stderr`` and ``fid_reference_stderr``: the standard errors of both FIDs over their examples
    (:func:`fid_jackknife`), and with ``kid`` also ``kid_stderr`` and ``kid_reference_stderr``, both KIDs' over
    their examples and the reference features (:func:`kid_jackknife`, computed after both KIDs); with ``fid_inf``, FID-infinity of every sample (all of ``samples``, not
    only the first n: it removes the bias in the count) and of the held-out examples (:func:`fid_infinity`; where
    there are too few for the feature dimension, the tag ``fid_inf.skipped`` or ``fid_inf_reference.skipped``
    says so instead; ``fid_inf.n``: the samples it used). The reference
    features (and the classifier, and clean-fid's files) are kept under ``cache_dir``
    (:func:`reference_features`). ValueError naming the parameter for a ``reference_split`` other than train or
    test, an ``n`` out of range, an ``extractor`` that cannot serve the data set and a ``reference`` that cannot
    serve it; MissingFileError for clean-fid's files not on disk without ``download``.
    """
    if reference_split not in ("train", "test"):
        raise ValueError(f"reference_split: invalid value {reference_split!r}; accepted: train or test")
    if tuple(samples.shape[1:]) != tuple(dataset.shape):
        raise ValueError(f"samples of shape {tuple(samples.shape[1:])} do not match the data set's {tuple(dataset.shape)}")
    published = REFERENCES.get(reference)
    refusal = reference_refusal(reference, dataset, extractor)
    if refusal is not None:
        key, (value, accepted, detail) = refusal
        raise ValueError(f"{key.split('.')[-1]}: invalid value {value!r}; accepted: {accepted} ({detail})")
    if published is not None:
        reference_split = published.local_split
    held_out = dataset.test if reference_split == "train" else dataset.train
    available = available_examples(len(samples), dataset, reference_split)
    count = n if n is not None else available
    if count > available or count < 2:
        raise ValueError(f"n: invalid value {n!r}; accepted: an integer in [2, {available}] or None ({len(samples)} "
                         f"samples, {len(dataset.test)} test and {len(dataset.train)} train examples)")
    n = count
    name, extract, info = get_extractor(extractor, dataset, classifier_steps=classifier_steps, cache_dir=cache_dir,
                                        download=download, device=_device(device))
    tags = {"fid.extractor": name}
    if name == "inception":
        tags["fid.extractor_weights"] = f"{info['path']} sha256:{info['weights'][:16]}"
    if published is None:
        split_reference = reference_features(dataset, reference_split, name, extract, info, cache_dir)
        mu_ref, sigma_ref, reference_feats = split_reference.mu, split_reference.sigma, split_reference.features
        tags.update({"fid.reference": f"split:{reference_split}", "fid.reference_split": reference_split})
    else:
        stats = load_published_stats(published, cache_dir, download=download)
        mu_ref, sigma_ref, reference_feats = stats.mu, stats.sigma, None
        tags.update({"fid.reference": published.label,
                     "fid.reference_stats": f"{stats.path} sha256:{stats.sha256[:16]}"})

    if reference_split == "train":
        held_out = held_out[:n]
    else:
        generator = torch.Generator().manual_seed(0)
        held_out = held_out[torch.randperm(len(held_out), generator=generator)[:n]]
    sample_features, held_out_features = extract(samples[:n]), extract(held_out)
    if sample_features.shape[1] != len(mu_ref):
        raise ValueError(f"reference: the statistics of {reference} are of {len(mu_ref)}-d features; extractor "
                         f"{name} gives {sample_features.shape[1]}-d features")
    fid = frechet_from_stats(*feature_stats(sample_features), mu_ref, sigma_ref)
    fid_reference = frechet_from_stats(*feature_stats(held_out_features), mu_ref, sigma_ref)

    tags["fid.n"] = str(n)
    if published is not None:
        other = "test" if reference_split == "train" else "train"
        floor = f"{n} examples of the {other} split of {dataset.name} against the published statistics"
        if dataset.name != published.name:
            floor += f" (not {published.name}'s own images: not a floor)"
        tags["fid.reference_floor"] = floor
    if name == "classifier":
        tags["fid.classifier_accuracy"] = f"{info['accuracy']:.4f}"
    kid_value = kid_reference = None
    if kid and reference_feats is None:
        tags["kid.skipped"] = f"the published statistics {reference} hold no features"
    elif kid:
        # clean-fid's argument order (reference first); the same seed for both, so the reference
        # side of every subset pair is the same in kid and kid_reference
        kid_value = kernel_distance(reference_feats, sample_features)
        kid_reference = kernel_distance(reference_feats, held_out_features)
        tags["kid.subsets"] = str(KID_SUBSETS)
        tags["kid.subset_size"] = str(min(n, len(reference_feats), KID_SUBSET_SIZE))
    result = FIDResult(fid=fid, fid_reference=fid_reference, n=n, tags=tags, kid=kid_value, kid_reference=kid_reference)
    if stderr:
        result.fid_stderr = fid_jackknife(sample_features, mu_ref, sigma_ref)[0]
        result.fid_reference_stderr = fid_jackknife(held_out_features, mu_ref, sigma_ref)[0]
        tags["fid.stderr"] = "delete-1 jackknife over the examples, reference fixed"
        if kid_value is not None:
            result.kid_stderr = kid_jackknife(reference_feats, sample_features).stderr
            result.kid_reference_stderr = kid_jackknife(reference_feats, held_out_features).stderr
            tags["kid.stderr"] = "two-sample delete-1 jackknife of the MMD^2 of all examples: examples and reference"
    if fid_inf:
        # every sample drawn: FID-infinity takes out the bias in the count, so it need not stop at the n of the floor
        extra = extract(samples[n:]) if len(samples) > n else sample_features[:0]
        all_features = np.concatenate([sample_features, extra])
        tags["fid_inf.n"] = str(len(all_features))
        for attribute, features, key in ((("fid_inf", all_features, "fid_inf")),
                                         ("fid_inf_reference", held_out_features, "fid_inf_reference")):
            try:
                setattr(result, attribute, fid_infinity(features, mu_ref, sigma_ref))
                tags["fid_inf.points"] = str(FID_INF_POINTS)
            except ValueError as error:  # too few samples for the feature dimension
                tags[f"{key}.skipped"] = str(error)
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
