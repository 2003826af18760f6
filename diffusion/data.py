"""Data sets: every loader takes plain keyword options and returns one in-memory :class:`Dataset`.

Images are float32 tensors ``[N, C, H, W]`` scaled to ``[-1, 1]`` (the data range of Ho et al. 2020,
Sec. 3.3); 2-D point sets are float32 ``[N, 2]``. Every loader is registered by the name users write
as ``data.name`` in :data:`DATASETS`, so an unknown name fails with the list of valid ones.

A loader's keywords are named like the :class:`DataConfig` fields, with the same defaults, e.g.
``load_moons(n_points=8000, test_fraction=0.2, split_seed=0)``; :func:`load_dataset` reads exactly the
keywords a loader declares from a DataConfig. Errors still name the config keys (``data.test_fraction``).

Splits are fixed by ``split_seed``: the same options always yield the same train/test tensors, and
the 2-D sets are generated from a ``torch.Generator`` seeded the same way, so a data set never
depends on the global random state (or on the trial seed).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from .config import DataConfig
from .errors import ConfigError
from .registry import Registry, options_for

DATASETS: Registry[Callable[..., "Dataset"]] = Registry("data.name")
POINT_SETS = ("swiss_roll", "moons", "gaussian_mixture")  # the 2-D sets; every other data set holds images


@dataclass
class Dataset:
    """An in-memory data set with a fixed train/test split.

    train, test: float32, images ``[N, C, H, W]`` in [-1, 1] or points ``[N, 2]``.
    train_labels, test_labels: int64 ``[N]`` class (or mixture component) of each example, or None.
    log_prob: exact log-density of the data distribution, ``[..., 2] -> [...]``; only for
        data sets whose density is known in closed form (gaussian_mixture), else None.
    levels: number of evenly spaced values each pixel takes in [-1, 1] (256 for 8-bit images, 17 for
        sklearn's digits), for discretized likelihoods; None for continuous data.
    """

    name: str
    train: Tensor
    test: Tensor
    train_labels: Optional[Tensor] = None
    test_labels: Optional[Tensor] = None
    num_classes: Optional[int] = None
    log_prob: Optional[Callable[[Tensor], Tensor]] = None
    levels: Optional[int] = None

    @property
    def is_image(self) -> bool:
        return self.train.dim() == 4

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(1, 8, 8)`` or ``(2,)``."""
        return tuple(self.train.shape[1:])


# The data sets with class labels (class conditioning, guidance, per-class metrics).
LABELLED_SETS = ("digits", "moons", "gaussian_mixture", "mnist", "fashion_mnist", "cifar10")


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load the data set named by ``cfg.name``, passing the loader the options it declares, read from
    ``cfg`` by name; raise :class:`ConfigError` if it is unknown or missing."""
    loader = DATASETS.get(cfg.name)
    return loader(**options_for(loader, cfg))


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------


def _split_generator(split_seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(split_seed)


def _test_count(n: int, test_fraction: float) -> int:
    """Number of test examples out of n: round(n * test_fraction), keeping both splits non-empty."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError("data.test_fraction", test_fraction, "a number in (0, 1)")
    return min(max(round(n * test_fraction), 1), n - 1)


def _random_split(n: int, test_fraction: float, split_seed: int) -> tuple[Tensor, Tensor]:
    """Indices (train, test) of a uniformly random split of range(n), fixed by split_seed."""
    permutation = torch.randperm(n, generator=_split_generator(split_seed))
    n_test = _test_count(n, test_fraction)
    return permutation[n_test:].sort().values, permutation[:n_test].sort().values


def _stratified_split(labels: Tensor, test_fraction: float, split_seed: int) -> tuple[Tensor, Tensor]:
    """Indices (train, test) of a split that keeps every class's share, fixed by split_seed.

    The test split has exactly round(N * test_fraction) examples; each class contributes
    floor(n_c * test_fraction) of them and the remaining ones go to the classes with the
    largest fractional remainders (largest-remainder apportionment).
    """
    n_test_total = _test_count(len(labels), test_fraction)
    classes, class_sizes = torch.unique(labels, sorted=True, return_counts=True)
    quotas = class_sizes.double() * n_test_total / len(labels)
    n_test_per_class = quotas.floor().long()
    remainder_order = torch.argsort(quotas - n_test_per_class, descending=True, stable=True)
    n_test_per_class[remainder_order[: n_test_total - int(n_test_per_class.sum())]] += 1

    generator = _split_generator(split_seed)
    train_parts, test_parts = [], []
    for label, n_test in zip(classes.tolist(), n_test_per_class.tolist()):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    return torch.cat(train_parts).sort().values, torch.cat(test_parts).sort().values


def _split(name: str, x: Tensor, labels: Optional[Tensor], train_idx: Tensor, test_idx: Tensor, **extra) -> Dataset:
    return Dataset(
        name=name,
        train=x[train_idx].contiguous(),
        test=x[test_idx].contiguous(),
        train_labels=None if labels is None else labels[train_idx].contiguous(),
        test_labels=None if labels is None else labels[test_idx].contiguous(),
        **extra,
    )


def _uint8_to_unit_range(pixels: Tensor) -> Tensor:
    """Map uint8 intensities {0, ..., 255} to float32 [-1, 1]."""
    return pixels.float().div(255.0).mul(2.0).sub(1.0)


# --------------------------------------------------------------------------------------------
# sklearn digits
# --------------------------------------------------------------------------------------------

DIGITS_MAX_INTENSITY = 16.0  # sklearn's digits are 8x8 images with integer intensities 0..16


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """The pixels [N, 64] and labels [N] of scikit-learn's ``digits.csv.gz`` (what ``sklearn.datasets.load_digits``
    reads: 64 pixel columns, then the label), read from the installed package without importing
    ``sklearn.datasets``, whose import costs every process that loads the digits about a second."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("scikit-learn is needed for the digits data set: pip install scikit-learn")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


@DATASETS.register("digits")
def load_digits(*, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """sklearn's 1,797 handwritten 8x8 digits (UCI optdigits test set), ``[N, 1, 8, 8]`` in [-1, 1].

    Ships with scikit-learn, so it needs no download. The split is stratified by digit class.
    """
    pixels, target = _sklearn_digits()
    images = torch.from_numpy(pixels).float().reshape(-1, 1, 8, 8)  # [N, 1, 8, 8], values 0..16
    images = images / DIGITS_MAX_INTENSITY * 2.0 - 1.0
    labels = torch.from_numpy(target).long()
    train_idx, test_idx = _stratified_split(labels, test_fraction, split_seed)
    return _split("digits", images, labels, train_idx, test_idx, num_classes=10,
                  levels=int(DIGITS_MAX_INTENSITY) + 1)


# --------------------------------------------------------------------------------------------
# 2-D toy distributions
# --------------------------------------------------------------------------------------------

SWISS_ROLL_TURNS = (1.5 * math.pi, 4.5 * math.pi)  # range of the roll's angle u: (u cos u, u sin u)
SWISS_ROLL_NOISE = 0.5  # std of isotropic Gaussian noise added before standardising
MOONS_NOISE = 0.05  # std of isotropic Gaussian noise added before standardising

GAUSSIAN_MIXTURE_COMPONENTS = 8  # equal weights
GAUSSIAN_MIXTURE_RADIUS = 2.0  # component k has mean RADIUS * (cos 2 pi k / 8, sin 2 pi k / 8)
GAUSSIAN_MIXTURE_STD = 0.1  # isotropic standard deviation of each component, per axis

_MOMENT_QUADRATURE_POINTS = 1 << 16  # midpoint-rule nodes for the exact moments of a curve


def _swiss_roll_curve(u: Tensor) -> Tensor:
    """Points ``[n, 2]`` on the noiseless swiss roll at angles u ``[n]``."""
    return torch.stack([u * torch.cos(u), u * torch.sin(u)], dim=-1)


def _moons_curve(u: Tensor, moon: Tensor) -> Tensor:
    """Points ``[n, 2]`` on the two noiseless half circles; u in [0, pi], moon in {0, 1}.

    Moon 0 is the upper half of the unit circle; moon 1 is the lower half shifted by (1, 0.5)
    so the two interlock (the layout of sklearn.datasets.make_moons).
    """
    upper = torch.stack([torch.cos(u), torch.sin(u)], dim=-1)
    lower = torch.stack([1.0 - torch.cos(u), 0.5 - torch.sin(u)], dim=-1)
    return torch.where(moon.bool().unsqueeze(-1), lower, upper)


def _curve_moments(curve: Callable[[Tensor], Tensor], low: float, high: float, noise_std: float) -> tuple[Tensor, Tensor]:
    """Exact per-axis mean and std ``[2]`` of curve(u) + noise_std * N(0, I) with u ~ U(low, high).

    Computed by a fine midpoint rule in float64, so the standardisation of a 2-D set is a fixed
    property of the distribution, not of n_points or the seed.
    """
    n = _MOMENT_QUADRATURE_POINTS
    u = low + (high - low) * (torch.arange(n, dtype=torch.float64) + 0.5) / n
    points = curve(u)
    mean = points.mean(0)
    variance = points.var(0, unbiased=False) + noise_std**2
    return mean.float(), variance.sqrt().float()


def _point_split(name: str, points: Tensor, labels: Optional[Tensor], test_fraction: float, split_seed: int,
                 **extra) -> Dataset:
    """Split i.i.d. points ``[n_points, 2]`` into train and test (a random split, fixed by split_seed)."""
    train_idx, test_idx = _random_split(len(points), test_fraction, split_seed)
    return _split(name, points, labels, train_idx, test_idx, **extra)


@DATASETS.register("swiss_roll")
def load_swiss_roll(*, n_points: int = 8000, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """2-D swiss roll (u cos u, u sin u), u ~ U(1.5 pi, 4.5 pi), plus Gaussian noise; standardised.

    Each axis is shifted and scaled by the distribution's exact mean and std (zero mean, unit
    variance per axis). No labels.
    """
    generator = _split_generator(split_seed)
    low, high = SWISS_ROLL_TURNS
    u = low + (high - low) * torch.rand(n_points, generator=generator, dtype=torch.float64)
    points = _swiss_roll_curve(u) + SWISS_ROLL_NOISE * torch.randn(n_points, 2, generator=generator, dtype=torch.float64)
    mean, std = _curve_moments(_swiss_roll_curve, low, high, SWISS_ROLL_NOISE)
    points = (points.float() - mean) / std
    return _point_split("swiss_roll", points, None, test_fraction, split_seed)


@DATASETS.register("moons")
def load_moons(*, n_points: int = 8000, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """Two interlocking half circles (as sklearn's make_moons) plus Gaussian noise; standardised.

    Each point picks a moon with probability 1/2 (its label) and a uniform angle on it. Each axis
    is shifted and scaled by the distribution's exact mean and std.
    """
    generator = _split_generator(split_seed)
    moon = torch.randint(0, 2, (n_points,), generator=generator)
    u = math.pi * torch.rand(n_points, generator=generator, dtype=torch.float64)
    points = _moons_curve(u, moon) + MOONS_NOISE * torch.randn(n_points, 2, generator=generator, dtype=torch.float64)

    def both_moons(v: Tensor) -> Tensor:  # v in [0, 2 pi): the first half is moon 0, the second moon 1
        return _moons_curve(torch.remainder(v, math.pi), (v >= math.pi).long())

    mean, std = _curve_moments(both_moons, 0.0, 2.0 * math.pi, MOONS_NOISE)
    points = (points.float() - mean) / std
    return _point_split("moons", points, moon, test_fraction, split_seed, num_classes=2)


def gaussian_mixture_means(dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Component means ``[8, 2]``: RADIUS * (cos 2 pi k / 8, sin 2 pi k / 8), k = 0..7."""
    angles = 2.0 * math.pi * torch.arange(GAUSSIAN_MIXTURE_COMPONENTS, dtype=torch.float64) / GAUSSIAN_MIXTURE_COMPONENTS
    means = GAUSSIAN_MIXTURE_RADIUS * torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return means.to(dtype=dtype, device=device)


def gaussian_mixture_log_prob(x: Tensor) -> Tensor:
    """Exact log-density of the 8-Gaussian ring, ``x [..., 2] -> [...]``.

    log p(x) = logsumexp_k [ log(1/K) - log(2 pi s^2) - |x - mu_k|^2 / (2 s^2) ]
    for K equally weighted isotropic 2-D Gaussians with std s. A module-level function (not a
    closure) so a Dataset stays picklable.
    """
    means = gaussian_mixture_means(x.dtype, x.device)  # [K, 2]
    variance = GAUSSIAN_MIXTURE_STD**2
    squared_distance = (x.unsqueeze(-2) - means).pow(2).sum(-1)  # [..., K]
    log_normal = -squared_distance / (2.0 * variance) - math.log(2.0 * math.pi * variance)
    return torch.logsumexp(log_normal, dim=-1) - math.log(GAUSSIAN_MIXTURE_COMPONENTS)


@DATASETS.register("gaussian_mixture")
def load_gaussian_mixture(*, n_points: int = 8000, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """8 equally weighted Gaussians (std 0.1) on a ring of radius 2; labels are the components.

    Not standardised: its exact density :func:`gaussian_mixture_log_prob` is the Dataset's log_prob.
    """
    generator = _split_generator(split_seed)
    component = torch.randint(0, GAUSSIAN_MIXTURE_COMPONENTS, (n_points,), generator=generator)
    noise = torch.randn(n_points, 2, generator=generator)
    points = gaussian_mixture_means()[component] + GAUSSIAN_MIXTURE_STD * noise
    return _point_split(
        "gaussian_mixture", points, component, test_fraction, split_seed,
        num_classes=GAUSSIAN_MIXTURE_COMPONENTS, log_prob=gaussian_mixture_log_prob,
    )


# --------------------------------------------------------------------------------------------
# torchvision data sets (official train/test splits)
# --------------------------------------------------------------------------------------------


def _torchvision_split(name: str, dataset_class, root: str, download: bool, expected_dir: str, expected_files: str,
                       unverified: str = ""):
    """Both official splits of a torchvision data set, or ConfigError saying where the files go.

    expected_dir: the folder under root that torchvision reads; expected_files: what it holds; unverified: what to
    say when files are there but fail torchvision's checksums.
    """
    root = os.path.expanduser(root)
    directory = os.path.abspath(os.path.join(root, expected_dir))
    try:
        train = dataset_class(root=root, train=True, download=download)
        test = dataset_class(root=root, train=False, download=download)
    except RuntimeError as error:  # torchvision: "Dataset not found. You can use download=True ..."
        if unverified and os.path.isdir(directory) and os.listdir(directory):
            accepted = (f"the official {name} files ({expected_files}) in {directory}: the files there differ from "
                        f"them (missing, corrupted, or other data); {unverified}")
        elif download:
            accepted = f"{name} files ({expected_files}) in {directory}; the download failed, so put them there by hand"
        else:
            accepted = (
                f"{name} files ({expected_files}) in {directory}; put them there "
                f"(data.root is the folder that holds {expected_dir}) or set data.download: true"
            )
        raise ConfigError("data.name", name, accepted, detail=f"torchvision: {error}") from error
    except OSError as error:  # a failed download (no network) surfaces as URLError, an OSError
        if not download:
            raise
        raise ConfigError(
            "data.name", name,
            f"{name} files ({expected_files}) in {directory}; the download failed, so put them there by hand",
            detail=f"{type(error).__name__}: {error}",
        ) from error
    return train, test


def _mnist_like(name: str, dataset_class, root: str, download: bool) -> Dataset:
    # torchvision's MNIST-family classes read their raw files from <root>/<ClassName>/raw.
    expected_dir = os.path.join(dataset_class.__name__, "raw")
    expected_files = ", ".join(os.path.splitext(os.path.basename(url))[0] for url, _ in dataset_class.resources)
    train, test = _torchvision_split(name, dataset_class, root, download, expected_dir, expected_files)
    return Dataset(
        name=name,
        train=_uint8_to_unit_range(train.data).unsqueeze(1),  # [60000, 1, 28, 28]
        test=_uint8_to_unit_range(test.data).unsqueeze(1),  # [10000, 1, 28, 28]
        train_labels=torch.as_tensor(train.targets, dtype=torch.long),
        test_labels=torch.as_tensor(test.targets, dtype=torch.long),
        num_classes=len(train.classes),
        levels=256,
    )


@DATASETS.register("mnist")
def load_mnist(*, root: str = "data", download: bool = False) -> Dataset:
    """MNIST (LeCun et al. 1998) through torchvision: 60,000/10,000 images ``[N, 1, 28, 28]``."""
    from torchvision.datasets import MNIST

    return _mnist_like("mnist", MNIST, root, download)


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(*, root: str = "data", download: bool = False) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017) through torchvision: 60,000/10,000 images ``[N, 1, 28, 28]``."""
    from torchvision.datasets import FashionMNIST

    return _mnist_like("fashion_mnist", FashionMNIST, root, download)


def _unverified(dataset_class):
    """torchvision's CIFAR class reading its files without their published MD5 checksums (``data.verify: false``):
    the same format and code, for files that are not the official ones (a subset, a test's own)."""
    return type(f"Unverified{dataset_class.__name__}", (dataset_class,), {
        "train_list": [[name, None] for name, _ in dataset_class.train_list],
        "test_list": [[name, None] for name, _ in dataset_class.test_list],
        "meta": {**dataset_class.meta, "md5": None},
    })


@DATASETS.register("cifar10")
def load_cifar10(*, root: str = "data", download: bool = False, verify: bool = True) -> Dataset:
    """CIFAR-10 (Krizhevsky 2009) through torchvision: 50,000/10,000 images ``[N, 3, 32, 32]``; ``verify``: check
    the files' published MD5 checksums (torchvision's default)."""
    from torchvision.datasets import CIFAR10

    # torchvision reads the extracted python batches from <root>/cifar-10-batches-py.
    expected_files = "data_batch_1..5, test_batch, batches.meta; the extracted cifar-10-python.tar.gz"
    if not verify:
        expected_files += " (any files of this format: data.verify is false)"
    dataset_class = CIFAR10 if verify else _unverified(CIFAR10)
    train, test = _torchvision_split("cifar10", dataset_class, root, download, CIFAR10.base_folder, expected_files,
                                     unverified="data.verify: false reads them as they are" if verify else "")

    def images(split) -> Tensor:  # split.data: uint8 numpy [N, 32, 32, 3]
        return _uint8_to_unit_range(torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous())

    return Dataset(
        name="cifar10",
        train=images(train),
        test=images(test),
        train_labels=torch.as_tensor(train.targets, dtype=torch.long),
        test_labels=torch.as_tensor(test.targets, dtype=torch.long),
        num_classes=len(train.classes),
        levels=256,
    )


# The example shape and class count of each torchvision data set, known without its files.
TORCHVISION_SETS = {"mnist": ((1, 28, 28), 10), "fashion_mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10)}


def not_downloaded(cfg: DataConfig) -> Dataset:
    """What a torchvision data set that ``data.download`` would fetch looks like before it is fetched: no examples,
    but its example shape and classes (what ``sweep --dry-run`` needs to size the networks without downloading)."""
    shape, classes = TORCHVISION_SETS[cfg.name]
    empty = torch.empty((0, *shape))
    labels = torch.empty(0, dtype=torch.long)
    return Dataset(name=cfg.name, train=empty, test=empty, train_labels=labels, test_labels=labels,
                   num_classes=classes, levels=256)


# --------------------------------------------------------------------------------------------
# A folder of images
# --------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _find_images(root: Path) -> list[Path]:
    """Every image file under root, at any depth, in a fixed (sorted) order."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _load_square_rgb(path: Path, image_size: int) -> Tensor:
    """One image as uint8 ``[3, image_size, image_size]``: RGB, shorter side resized, centre-cropped."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        square = ImageOps.fit(image.convert("RGB"), (image_size, image_size), method=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(square, dtype=np.uint8).copy()).permute(2, 0, 1)


@DATASETS.register("image_folder")
def load_image_folder(*, root: str = "data", image_size: int = 32, test_fraction: float = 0.2,
                      split_seed: int = 0) -> Dataset:
    """All png/jpg/jpeg/bmp/webp images under ``root`` as ``[N, 3, S, S]`` in [-1, 1], S = image_size.

    Each image is converted to RGB, resized so its shorter side is S, and centre-cropped. The
    split is uniformly random, fixed by split_seed. No labels.
    """
    folder = Path(os.path.expanduser(root))
    accepted = "a folder holding at least two " + "/".join(e[1:] for e in IMAGE_EXTENSIONS) + " images (any nesting)"
    if not folder.is_dir():
        raise ConfigError("data.root", root, accepted, detail=f"{folder.absolute()} is not a directory")
    if image_size < 1:
        raise ConfigError("data.image_size", image_size, "an integer >= 1")
    paths = _find_images(folder)
    if len(paths) < 2:
        raise ConfigError("data.root", root, accepted, detail=f"found {len(paths)} images in {folder.absolute()}")

    from PIL import UnidentifiedImageError

    pixels = []
    for path in paths:
        try:
            pixels.append(_load_square_rgb(path, image_size))
        except (UnidentifiedImageError, OSError) as error:
            raise ConfigError("data.root", root, accepted, detail=f"cannot read {path}: {error}") from error
    images = _uint8_to_unit_range(torch.stack(pixels))
    train_idx, test_idx = _random_split(len(images), test_fraction, split_seed)
    return _split("image_folder", images, None, train_idx, test_idx, levels=256)
