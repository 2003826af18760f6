"""Tests of diffusion.data: shapes, ranges, fixed splits, exact densities and user-facing errors."""
from __future__ import annotations

import inspect
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion import data
from diffusion.config import DataConfig
from diffusion.data import DATASETS, Dataset, load_dataset
from diffusion.errors import ConfigError

DIGITS_TOTAL = 1797


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(DataConfig(name="digits"))


def _rows(x: torch.Tensor) -> list[tuple]:
    return sorted(map(tuple, x.flatten(1).tolist()))


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def test_digits_sizes_shapes_and_range(digits):
    assert len(digits.train) + len(digits.test) == DIGITS_TOTAL
    assert len(digits.test) == round(DIGITS_TOTAL * 0.2)
    assert digits.shape == (1, 8, 8) and digits.is_image
    assert digits.train.dtype == torch.float32 and digits.train_labels.dtype == torch.int64
    assert digits.train_labels.shape == (len(digits.train),) and digits.test_labels.shape == (len(digits.test),)
    assert digits.num_classes == 10 and digits.log_prob is None
    everything = torch.cat([digits.train, digits.test])
    assert everything.min().item() == -1.0 and everything.max().item() == 1.0
    # 17 intensity levels 0..16 map to k/8 - 1
    levels = torch.unique(everything)
    assert len(levels) == 17 and torch.allclose(levels, torch.arange(17) / 8.0 - 1.0)


def test_digits_split_is_a_partition_of_the_whole_set(digits):
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images).float() / 16 * 2 - 1
    assert _rows(torch.cat([digits.train, digits.test])) == _rows(raw)

    labels = torch.from_numpy(load_digits().target)
    train_idx, test_idx = data._stratified_split(labels, test_fraction=0.2, split_seed=0)
    assert len(set(train_idx.tolist()) & set(test_idx.tolist())) == 0
    assert sorted(train_idx.tolist() + test_idx.tolist()) == list(range(DIGITS_TOTAL))


def test_digits_are_sklearns_without_importing_sklearn_datasets():
    """The pixels and labels read from scikit-learn's CSV are exactly ``sklearn.datasets.load_digits``'s, and
    loading them (in a fresh interpreter) leaves ``sklearn.datasets``, a second of imports, unimported."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    pixels, target = data._sklearn_digits()
    bunch = load_digits()
    assert np.array_equal(pixels, bunch.data) and pixels.dtype == bunch.data.dtype
    assert np.array_equal(target, bunch.target)
    code = ("import sys; from diffusion.data import load_dataset; from diffusion.config import DataConfig; "
            "load_dataset(DataConfig(name='digits')); print('sklearn.datasets' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_digits_split_is_stratified(digits):
    all_labels = torch.cat([digits.train_labels, digits.test_labels])
    for label in range(10):
        expected = (all_labels == label).sum().item() * 0.2
        assert abs((digits.test_labels == label).sum().item() - expected) <= 1


def test_digits_split_is_deterministic_and_follows_the_seed(digits):
    again = load_dataset(DataConfig(name="digits"))
    assert torch.equal(again.train, digits.train) and torch.equal(again.test, digits.test)
    assert torch.equal(again.test_labels, digits.test_labels)
    other_seed = load_dataset(DataConfig(name="digits", split_seed=1))
    assert not torch.equal(other_seed.test, digits.test)
    half = load_dataset(DataConfig(name="digits", test_fraction=0.5))
    assert len(half.test) == round(DIGITS_TOTAL * 0.5)


def test_bad_test_fraction_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        load_dataset(DataConfig(name="digits", test_fraction=1.0))
    assert info.value.key == "data.test_fraction"


# --------------------------------------------------------------------------------------------
# 2-D sets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["swiss_roll", "moons", "gaussian_mixture"])
def test_point_sets_shape_split_and_determinism(name):
    cfg = DataConfig(name=name, n_points=1000, test_fraction=0.25, split_seed=3)
    dataset = load_dataset(cfg)
    assert dataset.train.shape == (750, 2) and dataset.test.shape == (250, 2)
    assert dataset.shape == (2,) and not dataset.is_image
    assert dataset.train.dtype == torch.float32
    assert torch.isfinite(dataset.train).all()
    again = load_dataset(cfg)
    assert torch.equal(again.train, dataset.train) and torch.equal(again.test, dataset.test)
    other = load_dataset(DataConfig(name=name, n_points=1000, test_fraction=0.25, split_seed=4))
    assert not torch.equal(other.train, dataset.train)


@pytest.mark.parametrize("name", ["swiss_roll", "moons"])
def test_standardised_sets_have_unit_scale(name):
    points = torch.cat(list(_train_test(load_dataset(DataConfig(name=name, n_points=20000)))))
    assert points.mean(0).abs().max() < 0.05
    assert (points.std(0) - 1.0).abs().max() < 0.05


def _train_test(dataset: Dataset):
    return dataset.train, dataset.test


def test_moons_labels_separate_the_two_moons():
    moons = load_dataset(DataConfig(name="moons", n_points=4000))
    assert moons.num_classes == 2 and set(moons.train_labels.tolist()) == {0, 1}
    # moon 0 is the upper arc: its mean lies above and left of moon 1's (layout of make_moons)
    upper, lower = (moons.train[moons.train_labels == k].mean(0) for k in (0, 1))
    assert upper[1] > lower[1] + 0.5 and upper[0] < lower[0] - 0.5


def test_swiss_roll_has_no_labels():
    roll = load_dataset(DataConfig(name="swiss_roll", n_points=100))
    assert roll.train_labels is None and roll.test_labels is None and roll.log_prob is None


@pytest.fixture(scope="module")
def mixture() -> Dataset:
    return load_dataset(DataConfig(name="gaussian_mixture", n_points=16000))


def test_gaussian_mixture_log_prob_integrates_to_one(mixture):
    step = 0.01
    axis = torch.arange(-3.0, 3.0 + step / 2, step, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1)  # [601, 601, 2]
    density = mixture.log_prob(grid).exp()
    assert density.shape == (len(axis), len(axis))
    assert abs(density.sum().item() * step**2 - 1.0) < 1e-3


def test_gaussian_mixture_log_prob_matches_scipy(mixture):
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal

    angles = 2 * np.pi * np.arange(8) / 8
    means = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    points = np.concatenate([
        np.random.default_rng(0).uniform(-3, 3, size=(200, 2)),
        mixture.test[:50].double().numpy(),
    ])
    expected = logsumexp(
        [multivariate_normal(mean, 0.01 * np.eye(2)).logpdf(points) for mean in means], axis=0
    ) - np.log(8)
    actual = mixture.log_prob(torch.from_numpy(points)).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-9)
    # float32 inputs give float32 results of the right size
    assert mixture.log_prob(mixture.test[:7]).shape == (7,)


def test_gaussian_mixture_samples_follow_their_components(mixture):
    points = torch.cat([mixture.train, mixture.test])
    labels = torch.cat([mixture.train_labels, mixture.test_labels])
    assert mixture.num_classes == 8
    counts = torch.bincount(labels, minlength=8)
    assert (counts > 16000 / 8 * 0.85).all()  # equal weights
    for k in range(8):
        members = points[labels == k]
        expected_mean = torch.tensor([2 * math.cos(2 * math.pi * k / 8), 2 * math.sin(2 * math.pi * k / 8)])
        assert torch.allclose(members.mean(0), expected_mean, atol=0.02), k
        assert torch.allclose(members.std(0), torch.full((2,), 0.1), atol=0.01), k


def test_gaussian_mixture_dataset_pickles(mixture):
    """Trials run in other processes: a Dataset, including its log_prob, must survive pickling."""
    copy = pickle.loads(pickle.dumps(mixture))
    assert torch.equal(copy.log_prob(mixture.test[:5]), mixture.log_prob(mixture.test[:5]))


# --------------------------------------------------------------------------------------------
# torchvision sets: never download in tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, folder", [
    ("mnist", ("MNIST", "raw")),
    ("fashion_mnist", ("FashionMNIST", "raw")),
    ("cifar10", ("cifar-10-batches-py",)),
])
def test_missing_torchvision_files_name_the_directory(tmp_path, name, folder):
    with pytest.raises(ConfigError) as info:
        load_dataset(DataConfig(name=name, root=str(tmp_path), download=False))
    message = str(info.value)
    assert info.value.key == "data.name"
    assert str(tmp_path.joinpath(*folder)) in message
    assert "data.download: true" in message
    assert list(tmp_path.iterdir()) == []  # nothing was created, nothing downloaded


# --------------------------------------------------------------------------------------------
# image_folder
# --------------------------------------------------------------------------------------------


def _write_images(root):
    (root / "nested" / "deeper").mkdir(parents=True)
    Image.new("RGB", (20, 12), (0, 0, 0)).save(root / "black.png")
    Image.new("L", (9, 9), 255).save(root / "nested" / "white.PNG")
    Image.new("RGB", (16, 16), (255, 0, 0)).save(root / "nested" / "deeper" / "red.jpg", quality=100)
    # wide image: red left and right thirds, blue centre; the centre crop keeps only blue
    banded = np.zeros((10, 30, 3), dtype=np.uint8)
    banded[:, :10, 0] = banded[:, 20:, 0] = 255
    banded[:, 10:20, 2] = 255
    Image.fromarray(banded).save(root / "nested" / "banded.bmp")
    (root / "notes.txt").write_text("not an image")


def test_image_folder_loads_nested_images(tmp_path):
    _write_images(tmp_path)
    dataset = load_dataset(DataConfig(name="image_folder", root=str(tmp_path), image_size=6, test_fraction=0.25))
    assert dataset.train.shape == (3, 3, 6, 6) and dataset.test.shape == (1, 3, 6, 6)
    assert dataset.train_labels is None and dataset.num_classes is None
    images = torch.cat([dataset.train, dataset.test])
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    # the banded image is identified by its blue centre crop (bicubic resampling bleeds a little
    # red into the border pixels; squashing instead of cropping would keep whole red columns)
    blue = torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1)
    assert any(torch.allclose(image, blue.expand(3, 6, 6), atol=0.15) for image in images)


def test_image_folder_missing_or_empty_folder_is_a_config_error(tmp_path):
    for root in (tmp_path / "does_not_exist", tmp_path):
        with pytest.raises(ConfigError) as info:
            load_dataset(DataConfig(name="image_folder", root=str(root)))
        assert info.value.key == "data.root"


def test_image_folder_unreadable_image_is_a_config_error(tmp_path):
    _write_images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="broken.png") as info:
        load_dataset(DataConfig(name="image_folder", root=str(tmp_path), image_size=4))
    assert info.value.key == "data.root"


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


def test_registry_has_every_data_set():
    assert DATASETS.names() == sorted(
        ["digits", "swiss_roll", "moons", "gaussian_mixture", "mnist", "fashion_mnist", "cifar10", "image_folder"]
    )


def _fields(dataset: Dataset) -> dict:
    return {field: getattr(dataset, field) for field in Dataset.__dataclass_fields__}


@pytest.mark.parametrize("name, loader, options", [
    ("digits", data.load_digits, dict(test_fraction=0.25, split_seed=2)),
    ("moons", data.load_moons, dict(n_points=500, test_fraction=0.3, split_seed=7)),
    ("swiss_roll", data.load_swiss_roll, dict(n_points=300, split_seed=1)),
    ("gaussian_mixture", data.load_gaussian_mixture, {}),  # every option at its default
])
def test_loaders_take_plain_keywords(name, loader, options):
    """A loader called with keywords alone gives, tensor for tensor, what load_dataset gives for a DataConfig
    holding the same values."""
    from_keywords = _fields(loader(**options))
    from_config = _fields(load_dataset(DataConfig(name=name, **options)))
    assert from_keywords.keys() == from_config.keys()
    for field, value in from_keywords.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, from_config[field]), field
        else:
            assert value == from_config[field], field


def test_loader_keywords_are_data_config_fields_with_its_defaults():
    """load_dataset passes a loader its keywords by name, so each must be a DataConfig field; the defaults
    agree, so a loader called bare loads what the default config loads."""
    defaults = DataConfig()
    for name in DATASETS.names():
        parameters = inspect.signature(DATASETS.get(name)).parameters.values()
        assert parameters, name
        for parameter in parameters:
            assert parameter.kind is parameter.KEYWORD_ONLY, (name, parameter.name)
            assert parameter.default == getattr(defaults, parameter.name), (name, parameter.name)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        load_dataset(DataConfig(name="imagenet"))
    assert info.value.key == "data.name"
    for name in DATASETS.names():
        assert name in str(info.value)
