"""Inception FID that compares with papers (issue 16, part 4): clean-fid's files fetched with eval.download into
eval.cache_dir (from a real HTTP server on 127.0.0.1 serving small stand-ins: nothing leaves this machine), FID
against clean-fid's published statistics, our image preparation and Frechet numerics against clean-fid's own
compute_fid on two folders of PNGs, and a missing file refused before a sweep starts (offline, < 60 s)."""
from __future__ import annotations

import dataclasses
import http.server
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import yaml

from diffusion import metrics
from diffusion.config import DataConfig
from diffusion.data import Dataset, load_dataset
from diffusion.errors import ConfigError
from diffusion.metrics import downloads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_TRAIN = "cleanfid:cifar10-32-train"
LEGACY_WEIGHTS = os.path.join(downloads.INCEPTION_DIR, downloads.INCEPTION_FILE)  # clean-fid's /tmp file


@pytest.fixture(autouse=True)
def no_legacy_weights(tmp_path, monkeypatch):
    """clean-fid's own location for the weights (/tmp) is pointed at an empty directory: what is on this machine's
    /tmp does not decide these tests."""
    monkeypatch.setattr(downloads, "INCEPTION_DIR", str(tmp_path / "legacy-tmp"))


# --------------------------------------------------------------------------------------------------
# A real HTTP server on 127.0.0.1


class Server:
    """http.server.ThreadingHTTPServer in a thread, serving ``routes``: path -> bytes (200), an int (that status),
    ("truncated", bytes) (a Content-Length of twice the bytes sent, then the connection closed) or ("stall",
    bytes) (half the body, then nothing until the test ends). Counts the requests of each path."""

    def __init__(self):
        self.routes: dict[str, object] = {}
        self.requests: dict[str, int] = {}
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                server.requests[self.path] = server.requests.get(self.path, 0) + 1
                route = server.routes.get(self.path, 404)
                if isinstance(route, int):
                    self.send_error(route)
                    return
                kind, body = route if isinstance(route, tuple) else ("ok", route)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(2 * len(body) if kind == "truncated" else len(body)))
                self.end_headers()
                if kind == "ok":
                    self.wfile.write(body)
                elif kind == "truncated":
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                elif kind == "stall":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    server.release.wait(30)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    serving = Server()
    yield serving
    serving.close()


# --------------------------------------------------------------------------------------------------
# Small stand-ins for clean-fid's files


class _TinyInceptionLayers(torch.nn.Module):
    """Stands in for the torchscript Inception trunk (it sees (x - 128) / 128 of [0, 255] images at 299 x 299):
    2048 features (clean-fid's wrapper reshapes to that), the first 4 the channel means and the mean square of the
    first channel, the others 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = torch.cat([x.mean(dim=(2, 3)), (x[:, :1] ** 2).mean(dim=(2, 3))], dim=1)
        return torch.cat([first, torch.zeros(x.shape[0], 2044)], dim=1)


class _TinyInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _TinyInceptionLayers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def tiny_inception_bytes(tmp_path) -> bytes:
    path = tmp_path / "tiny-inception.pt"
    torch.jit.save(torch.jit.script(_TinyInception()), str(path))
    return path.read_bytes()


def stats_bytes(tmp_path, mu, sigma) -> bytes:
    path = tmp_path / "stats.npz"
    np.savez(path, mu=mu, sigma=sigma)
    return path.read_bytes()


PUBLISHED_MU = np.array([0.05, -0.02, 0.01, 0.3])
PUBLISHED_SIGMA = np.diag([0.02, 0.03, 0.025, 0.05]) + 0.004


def rgb_dataset(name="rgb32", n=48, size=32, seed=0) -> Dataset:
    """Images [n, 3, size, size] in [-1, 1] with smooth structure and per-image brightness."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(2 * n, 3, 4, 4, generator=generator) * 1.6 - 0.8
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    images = (images + 0.1 * torch.randn(images.shape, generator=generator)).clamp(-1, 1)
    return Dataset(name=name, train=images[:n], test=images[n:])


def no_partial_files(directory) -> bool:
    return not os.path.exists(directory) or os.listdir(directory) == []


# --------------------------------------------------------------------------------------------------
# 1. Downloads


def test_download_lands_in_the_cache_once(tmp_path, server, monkeypatch):
    weights = tiny_inception_bytes(tmp_path)
    server.routes["/metrics/inception-2015-12-05.pt"] = weights
    server.routes["/stats/cifar10_clean_train_32.npz"] = stats_bytes(tmp_path, PUBLISHED_MU, PUBLISHED_SIGMA)
    monkeypatch.setattr(downloads, "INCEPTION_URL", server.url + "/metrics/inception-2015-12-05.pt")
    monkeypatch.setattr(downloads, "CLEANFID_STATS_URL", server.url + "/stats/")
    cache = str(tmp_path / "cache")
    data = rgb_dataset()
    # without download: nothing fetched, the error names the path and the URL
    with pytest.raises(metrics.MissingFileError) as missing:
        metrics.get_extractor("inception", data, cache_dir=cache)
    assert os.path.join(cache, "inception", "inception-2015-12-05.pt") in str(missing.value)
    assert downloads.INCEPTION_URL in str(missing.value) and server.requests == {}
    for _ in range(2):
        name, extract, info = metrics.get_extractor("inception", data, cache_dir=cache, download=True)
        assert name == "inception" and info["path"] == os.path.join(cache, "inception", "inception-2015-12-05.pt")
        stats = metrics.load_published_stats(metrics.REFERENCES.get(CIFAR_TRAIN), cache, download=True)
        assert stats.path == os.path.join(cache, "inception", "stats", "cifar10_clean_train_32.npz")
    assert server.requests == {"/metrics/inception-2015-12-05.pt": 1, "/stats/cifar10_clean_train_32.npz": 1}
    with open(info["path"], "rb") as handle:
        assert handle.read() == weights
    np.testing.assert_array_equal(stats.mu, PUBLISHED_MU)
    np.testing.assert_array_equal(stats.sigma, PUBLISHED_SIGMA)
    assert sorted(os.listdir(os.path.join(cache, "inception"))) == ["inception-2015-12-05.pt", "stats"]
    assert metrics.missing_fid_files(data, extractor="inception", reference=CIFAR_TRAIN, cache_dir=cache) == []
    features = extract(data.test[:5])  # the downloaded network runs, on images prepared as clean-fid does
    assert features.shape == (5, 2048)
    np.testing.assert_allclose(features[:, :3], data.test[:5].mean(dim=(2, 3)).double().numpy(), atol=0.02)


def test_a_failed_download_leaves_nothing_and_names_the_url(tmp_path, server):
    target = str(tmp_path / "cache" / "inception" / "inception-2015-12-05.pt")
    body = os.urandom(200_000)
    server.routes.update({"/truncated": ("truncated", body), "/stall": ("stall", body), "/gone": 404})
    for path, reason in [("/gone", "HTTP 404"), ("/truncated", f"received {len(body)} of {2 * len(body)} bytes")]:
        with pytest.raises(metrics.DownloadError) as error:
            metrics.download_file(server.url + path, target, timeout=10)
        assert server.url + path in str(error.value) and reason in str(error.value)
        assert not os.path.exists(target) and no_partial_files(os.path.dirname(target))
    started = time.monotonic()
    with pytest.raises(metrics.DownloadError, match=f"could not download {server.url}/stall .*timed out"):
        metrics.download_file(server.url + "/stall", target, timeout=0.5)
    assert time.monotonic() - started < 10
    assert not os.path.exists(target) and no_partial_files(os.path.dirname(target))
    with pytest.raises(ValueError, match="accepted: an http or https URL"):
        metrics.download_file("file:///etc/passwd", target)


def test_statistics_that_are_not_statistics_are_removed(tmp_path, server, monkeypatch):
    server.routes["/stats/cifar10_clean_train_32.npz"] = b"<html>a login page</html>"
    monkeypatch.setattr(downloads, "CLEANFID_STATS_URL", server.url + "/stats")
    cache = str(tmp_path / "cache")
    with pytest.raises(metrics.DownloadError, match="is not clean-fid statistics"):
        metrics.load_published_stats(metrics.REFERENCES.get(CIFAR_TRAIN), cache, download=True)
    assert no_partial_files(os.path.join(cache, "inception", "stats"))


def test_a_killed_download_leaves_nothing_at_the_final_path(tmp_path, server):
    """A process killed (SIGKILL: no clean-up runs) mid-download leaves no file at the final path; the next
    download completes."""
    body = os.urandom(400_000)
    server.routes.update({"/stall": ("stall", body), "/ok": body})
    target = tmp_path / "cache" / "inception" / "inception-2015-12-05.pt"
    code = ("import sys\nfrom diffusion.metrics.downloads import download_file\n"
            "download_file(sys.argv[1], sys.argv[2], timeout=60)\n")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", code, server.url + "/stall", str(target)], env=env,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while server.requests.get("/stall", 0) == 0 or not any(
                name.startswith(".tmp-") for name in os.listdir(target.parent)):
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.3)  # the first half of the body is being written
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    assert not target.exists()
    assert metrics.download_file(server.url + "/ok", str(target)) == str(target)
    assert target.read_bytes() == body


# --------------------------------------------------------------------------------------------------
# FID against published statistics


def four_feature_inception(dataset, *, cache_dir="~/.cache/diffusion-orchestrator", download=False, device=None):
    """The inception extractor with the downloaded stand-in's first 4 features only (2048-d statistics would make
    the test slow: a 2048 x 2048 matrix square root per distance): the weights found or fetched as
    ``build_inception`` does, the images prepared as it does (``cleanfid_extract``), clean-fid's (x - 128) / 128."""
    path = metrics.inception_weights(cache_dir, download=download)
    model = torch.jit.load(path).eval()
    extract = metrics.cleanfid_extract(lambda x: model.layers((x - 128) / 128)[:, :4], device)
    return "inception", extract, {"path": path, "weights": downloads.file_sha256(path)}


def test_fid_against_published_statistics(tmp_path, server, monkeypatch):
    """compute_fid with eval.reference cleanfid:cifar10-32-train: the Frechet distance of the samples' features to
    the published mu and sigma (clean-fid's own frechet_distance agrees), fid_reference from the held-out local
    split, fid_stderr and fid_inf with the reference held fixed, no KID, tags naming the statistics."""
    from cleanfid.fid import frechet_distance

    monkeypatch.setitem(metrics.EXTRACTORS._items, "inception", four_feature_inception)

    server.routes["/metrics/inception-2015-12-05.pt"] = tiny_inception_bytes(tmp_path)
    server.routes["/stats/cifar10_clean_train_32.npz"] = stats_bytes(tmp_path, PUBLISHED_MU, PUBLISHED_SIGMA)
    monkeypatch.setattr(downloads, "INCEPTION_URL", server.url + "/metrics/inception-2015-12-05.pt")
    monkeypatch.setattr(downloads, "CLEANFID_STATS_URL", server.url + "/stats/")
    cache = str(tmp_path / "cache")
    data = rgb_dataset(n=48)
    samples = rgb_dataset(n=48, seed=1).train * 0.8 + 0.1
    result = metrics.compute_fid(samples, data, extractor="inception", reference=CIFAR_TRAIN, cache_dir=cache,
                                 download=True, kid=True)
    _, extract, _ = metrics.get_extractor("inception", data, cache_dir=cache)
    features, held_out = extract(samples), extract(data.test)  # the train split's part is the published one's
    assert result.n == 48
    expected = metrics.frechet_from_stats(*metrics.feature_stats(features), PUBLISHED_MU, PUBLISHED_SIGMA)
    assert result.fid == pytest.approx(expected, rel=1e-12)
    assert result.fid == pytest.approx(frechet_distance(features.mean(0), np.cov(features, rowvar=False),
                                                        PUBLISHED_MU, PUBLISHED_SIGMA), rel=1e-6)
    assert result.fid_reference == pytest.approx(
        metrics.frechet_from_stats(*metrics.feature_stats(held_out), PUBLISHED_MU, PUBLISHED_SIGMA), rel=1e-12)
    assert result.fid > 0.01 and result.fid != pytest.approx(result.fid_reference)
    assert result.fid_stderr == pytest.approx(metrics.fid_jackknife(features, PUBLISHED_MU, PUBLISHED_SIGMA)[0])
    assert result.fid_inf is not None and result.fid_inf.fids[-1] == pytest.approx(result.fid, rel=1e-9)
    assert result.kid is None and result.kid_reference is None
    tags = result.tags
    assert tags["fid.reference"] == "cleanfid:cifar10/train/32/clean" and "fid.reference_split" not in tags
    assert tags["fid.reference_stats"].startswith(os.path.join(cache, "inception", "stats",
                                                               "cifar10_clean_train_32.npz") + " sha256:")
    assert tags["fid.extractor"] == "inception" and "sha256:" in tags["fid.extractor_weights"]
    assert tags["kid.skipped"] == f"the published statistics {CIFAR_TRAIN} hold no features"
    assert tags["fid.reference_floor"] == ("48 examples of the test split of rgb32 against the published "
                                           "statistics (not cifar10's own images: not a floor)")
    # a published test split: the local test split plays its part, train examples are held out
    server.routes["/stats/cifar10_clean_test_32.npz"] = server.routes["/stats/cifar10_clean_train_32.npz"]
    named = dataclasses.replace(data, name="cifar10")
    test_result = metrics.compute_fid(samples, named, extractor="inception", reference="cleanfid:cifar10-32-test",
                                      cache_dir=cache, download=True, kid=False, fid_inf=False)
    assert test_result.tags["fid.reference_floor"] == ("48 examples of the train split of cifar10 against the "
                                                       "published statistics")
    assert test_result.fid == pytest.approx(result.fid, rel=1e-12)  # same samples, same statistics
    assert server.requests["/metrics/inception-2015-12-05.pt"] == 1


def test_published_statistics_refuse_what_they_cannot_serve(tmp_path):
    digits = load_dataset(DataConfig(name="digits"))
    key, refusal = metrics.reference_refusal(CIFAR_TRAIN, digits, "inception")
    assert key == "eval.reference" and refusal.value == CIFAR_TRAIN and refusal.accepted == "split"
    assert "32x32 RGB images; data set digits holds images of shape (1, 8, 8)" in refusal.detail
    key, refusal = metrics.reference_refusal(CIFAR_TRAIN, rgb_dataset(), "raw")
    assert key == "eval.extractor" and refusal.accepted == "inception"
    assert metrics.reference_refusal(CIFAR_TRAIN, rgb_dataset(), "inception") is None
    assert metrics.reference_refusal("split", digits, "raw") is None
    with pytest.raises(ValueError, match=r"^reference: invalid value 'cleanfid:cifar10-32-train'; accepted: split "):
        metrics.compute_fid(digits.test, digits, extractor="inception", reference=CIFAR_TRAIN, cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"eval.reference: invalid value 'cifar10'; accepted: one of .*"
                                          r"cleanfid:cifar10-32-test, cleanfid:cifar10-32-train, .*split"):
        metrics.REFERENCES.get("cifar10")
    assert os.listdir(tmp_path) == []  # nothing fetched or written


def test_every_reference_is_in_the_option_table():
    from orchestrator.options import option_table

    row = option_table("eval.reference").splitlines()[2]
    assert row.startswith("| `eval.reference` | `split` |")
    for name in metrics.REFERENCES.names():
        assert name in row, name
    assert "| `eval.download` | `false` |" in option_table("eval.download")


# --------------------------------------------------------------------------------------------------
# 2. Our image preparation and Frechet numerics against clean-fid's compute_fid


class _PoolFeatures(torch.nn.Module):
    """A small deterministic feature extractor in clean-fid's convention ([B, 3, 299, 299] in [0, 255]): the
    means of a 2 x 2 grid of each channel and each channel's mean squared difference of neighbouring pixels (which
    the resizing filter changes), then a fixed mixing: 15 features."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Linear(15, 15)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.mix.weight.copy_(torch.randn(15, 15, generator=generator) / 4 + torch.eye(15))
            self.mix.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / 255.0
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 2).reshape(x.shape[0], 12)
        roughness = ((x[:, :, :, 1:] - x[:, :, :, :-1]) ** 2).mean(dim=(2, 3)) * 1e3
        return self.mix(torch.cat([pooled, roughness], dim=1))


def write_pngs(directory, count: int, seed: int, brightness: float) -> None:
    from PIL import Image

    directory.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = Image.fromarray((rng.random((4, 4, 3)) * 200 * brightness).astype(np.uint8))
        image = np.asarray(coarse.resize((16, 16), Image.BILINEAR), dtype=np.float64)
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(directory / f"{i:03d}.png")


def folder_images(directory) -> torch.Tensor:
    """Every image of a folder as our data pipeline reads it (image_folder: RGB, [-1, 1]), both splits."""
    data = load_dataset(DataConfig(name="image_folder", root=str(directory), image_size=16, test_fraction=0.25))
    return torch.cat([data.train, data.test])


def test_fid_matches_cleanfid_on_two_folders(tmp_path):
    from cleanfid import fid as cleanfid

    write_pngs(tmp_path / "a", 48, seed=1, brightness=1.0)
    write_pngs(tmp_path / "b", 60, seed=2, brightness=1.2)
    network = _PoolFeatures().eval()
    theirs = cleanfid.compute_fid(str(tmp_path / "a"), str(tmp_path / "b"), mode="clean",
                                  custom_feat_extractor=network, num_workers=0, batch_size=16,
                                  device=torch.device("cpu"), verbose=False, use_dataparallel=False)
    extract = metrics.cleanfid_extract(network)
    a, b = extract(folder_images(tmp_path / "a")), extract(folder_images(tmp_path / "b"))
    assert a.shape == (48, 15) and b.shape == (60, 15)
    ours = metrics.frechet_from_stats(*metrics.feature_stats(a), *metrics.feature_stats(b))
    assert theirs > 0.1  # two different distributions: the comparison is not of two zeros
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert metrics.FrechetToReference(*metrics.feature_stats(b)).of(a) == pytest.approx(theirs, rel=1e-5)


# --------------------------------------------------------------------------------------------------
# 3. A missing file stops the sweep before it starts


def inception_sweep(tmp_path, **eval_section) -> str:
    """A sweep file on a folder of 32 x 32 PNGs with eval.extractor inception, its cache in tmp_path."""
    write_pngs(tmp_path / "images", 20, seed=3, brightness=1.0)
    from PIL import Image

    for name in os.listdir(tmp_path / "images"):  # 32 x 32, the size of cifar10's published statistics
        path = tmp_path / "images" / name
        Image.open(path).resize((32, 32)).save(path)
    smoke = yaml.safe_load(open(os.path.join(ROOT, "sweeps", "smoke.yaml")))
    base = {**smoke["base"], **smoke["variants"]["ddpm"]}
    base["data"] = {"name": "image_folder", "root": str(tmp_path / "images"), "image_size": 32}
    base["eval"] = {"fid": True, "bpd": False, "extractor": "inception", "cache_dir": str(tmp_path / "cache"),
                    **eval_section}
    path = tmp_path / "inception.yaml"
    path.write_text(yaml.safe_dump({"name": "inception_missing", "base": base}))
    return str(path)


def test_missing_inception_files_are_named_before_the_sweep_starts(tmp_path):
    from orchestrator.preflight import check_data
    from orchestrator.sweepfile import load_sweep

    path = inception_sweep(tmp_path)
    weights = os.path.join(str(tmp_path / "cache"), "inception", "inception-2015-12-05.pt")
    with pytest.raises(ConfigError) as error:
        check_data(load_sweep(path))
    assert error.value.key == "base.eval.download" and error.value.value is False
    message = str(error.value)
    assert f"place the file at {weights} (from {metrics.INCEPTION_URL})" in message
    assert "accepted: true (to fetch it into " + os.path.join(str(tmp_path / "cache"), "inception") in message
    # with published statistics too, both files are named
    with pytest.raises(ConfigError) as error:
        check_data(load_sweep(path, [f"base.eval.reference={CIFAR_TRAIN}"]))
    stats = os.path.join(str(tmp_path / "cache"), "inception", "stats", "cifar10_clean_train_32.npz")
    assert weights in str(error.value) and f"{stats} (from {metrics.CLEANFID_STATS_URL}cifar10_clean_train_32.npz)" \
        in str(error.value)
    # with eval.download nothing is missing yet: the files are fetched on first use
    check_data(load_sweep(path, ["base.eval.download=true", f"base.eval.reference={CIFAR_TRAIN}"]))
    # a file placed at the named path is found
    os.makedirs(os.path.dirname(weights))
    torch.jit.save(torch.jit.script(_TinyInception()), weights)
    check_data(load_sweep(path))
    # published statistics of another size, or with another extractor, are refused by name
    with pytest.raises(ConfigError, match=r"^base\.eval\.reference: invalid value 'cleanfid:ffhq-256-trainval70k'; "
                                          r"accepted: split, cleanfid:cifar10-32-test, cleanfid:cifar10-32-train "):
        check_data(load_sweep(path, ["base.eval.reference=cleanfid:ffhq-256-trainval70k"]))
    with pytest.raises(ConfigError, match=r"^base\.eval\.extractor: invalid value 'auto'; accepted: inception with "
                                          r"eval\.reference cleanfid:cifar10-32-train"):
        load_sweep(path, ["base.eval.extractor=auto", f"base.eval.reference={CIFAR_TRAIN}"])
    assert sorted(os.listdir(tmp_path / "cache")) == ["inception"]  # nothing else written


def test_cli_refuses_missing_inception_weights_with_status_2(tmp_path):
    from test_preflight import assert_refused, orchestrator, written

    if downloads.find_inception_weights(str(tmp_path / "cache")) is not None:  # nothing is missing to refuse
        pytest.skip(f"this user's {LEGACY_WEIGHTS} (clean-fid's own copy of the weights) is found by every sweep")
    path = inception_sweep(tmp_path)
    weights = os.path.join(str(tmp_path / "cache"), "inception", "inception-2015-12-05.pt")
    for command in (["validate"], ["sweep"]):
        result = orchestrator([*command, path], cwd=tmp_path, timeout=300)
        assert_refused(result, "base.eval.download: invalid value False; accepted: true", weights,
                       metrics.INCEPTION_URL)
        assert written(tmp_path) == {"images"}  # no mlflow.db, mlartifacts, ray_results or cache
