"""What the extractors, the classifier and the reference cache share: batched feature extraction,
memoized tensor digests (part of every cache key) and questions about a data set."""
from __future__ import annotations

import hashlib
import weakref
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:  # the data module only provides the Dataset type; no import cycle at run time
    from ..data import Dataset

Extract = Callable[[Tensor], np.ndarray]  # x [N, ...] -> features [N, D] (float64)

FEATURE_BATCH = 500  # examples per forward pass when extracting features


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


def _device(device) -> torch.device:
    """``device`` as a torch.device; None is the CPU."""
    return torch.device("cpu") if device is None else torch.device(device)


def _is_image(dataset: "Dataset") -> bool:
    return bool(dataset.is_image)


def _kind(dataset: "Dataset") -> str:
    return "images" if _is_image(dataset) else "2-D points"


def _num_classes(dataset: "Dataset") -> int:
    if dataset.num_classes is not None:
        return int(dataset.num_classes)
    return int(dataset.train_labels.max()) + 1
