"""The ``classifier`` extractor's network: a small CNN trained on the labelled train split of the data
set itself, cached on disk under ``cache_dir`` (a config's ``eval.cache_dir``;
``classifier-<data set>-<key>.pt``).

Inception features of 8x8 grey digits say little; a classifier trained on the data set is the usual
offline substitute (e.g. the MNIST classifiers behind "FID" numbers in small-scale papers). Numbers are
comparable only between runs that use the same cached classifier (same data set, split and
``classifier_steps``, a config's ``eval.classifier_steps``). The same network scores conditional samples
(``conditional_metrics``).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..fit import fit
from ..storage import save_atomic
from .common import _batched_features, _device, _num_classes, _tensor_digest

if TYPE_CHECKING:  # the data module only provides the Dataset type; no import cycle at run time
    from ..data import Dataset

# Bump when the classifier's architecture or training changes: cached classifiers are then retrained.
CLASSIFIER_VERSION = 1
CLASSIFIER_SEED = 0  # the classifier is a shared yardstick: its seed is fixed, not the trial's


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


def classifier_path(dataset: "Dataset", *, classifier_steps: int = 1500,
                    cache_dir: str = "~/.cache/diffusion-orchestrator") -> str:
    """Cache file under ``cache_dir`` of the classifier trained on this data set for ``classifier_steps`` steps."""
    key = _classifier_key(dataset, classifier_steps)
    return os.path.join(os.path.expanduser(cache_dir), f"classifier-{dataset.name}-{key}.pt")


def train_classifier(
    dataset: "Dataset", steps: int, device: torch.device, batch_size: int = 128, lr: float = 1e-3
) -> FeatureClassifier:
    """Adam (``diffusion.fit.fit``) + cross-entropy on the labelled train split, random 1-pixel shifts; seeded by
    CLASSIFIER_SEED (the global torch RNG is left untouched)."""
    x, y = dataset.train.to(device), dataset.train_labels.to(device)
    generator = torch.Generator().manual_seed(CLASSIFIER_SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CLASSIFIER_SEED)
        model = FeatureClassifier(x.shape[1], _num_classes(dataset)).to(device)

    def loss() -> Tensor:
        index = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=generator).to(device)
        return F.cross_entropy(model(_random_shift(x[index], generator)), y[index])

    def cosine(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """Cosine decay to 5% of lr: the last steps settle, so the features are stable for a given seed."""
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(step / max(steps, 1), 1.0))))

    fit(model, loss, steps, lr, schedule=cosine)
    return model


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
    dataset: "Dataset", *, classifier_steps: int = 1500, cache_dir: str = "~/.cache/diffusion-orchestrator",
    device: Optional[torch.device] = None,
) -> tuple[FeatureClassifier, dict]:
    """The cached classifier for this data set (:func:`classifier_path` under ``cache_dir``), trained for
    ``classifier_steps`` steps on ``device`` (default: the CPU) and cached first if absent (a config's
    ``eval.classifier_steps`` and ``eval.cache_dir``).

    Returns the model (eval mode, on device) and its metadata: ``key``, ``path``, ``accuracy`` (test
    split), ``steps``, ``train_seconds``, ``loaded_from_cache`` and ``weights`` (digest of the weights).
    """
    device = _device(device)
    path = classifier_path(dataset, classifier_steps=classifier_steps, cache_dir=cache_dir)
    key = _classifier_key(dataset, classifier_steps)
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
    model = train_classifier(dataset, classifier_steps, device)
    seconds = time.perf_counter() - start
    accuracy = float("nan")
    if dataset.test_labels is not None and len(dataset.test) > 0:
        accuracy = classifier_accuracy(model, dataset.test, dataset.test_labels, device)
    meta = {
        "key": key,
        "dataset": dataset.name,
        "in_channels": int(dataset.train.shape[1]),
        "num_classes": _num_classes(dataset),
        "steps": int(classifier_steps),
        "version": CLASSIFIER_VERSION,
        "accuracy": accuracy,
        "train_seconds": seconds,
    }
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    save_atomic({"state_dict": state, "meta": meta}, path)
    return model, {**meta, "path": path, "loaded_from_cache": False, "weights": _state_digest(model)}
