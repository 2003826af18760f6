"""Classifier guidance (Dhariwal & Nichol 2021): a noise-conditional classifier p_phi(y | x_t, t) and the
denoiser whose score is the model's plus ``scale`` times the classifier's gradient.

Classifier-free guidance (Ho & Salimans 2022) needs no extra network: it is the ``guidance_scale`` of
``diffusion.denoiser.network_denoiser``. Both act on eps_hat through score = -eps / sigma, so both
combine with every process, parameterization and sampler:

    score_guided(x_t, y) = score(x_t) + scale * grad_x log p_phi(y | x_t)
    eps_guided           = eps_hat    - scale * sigma(t) * grad_x log p_phi(y | x_t)

(Dhariwal & Nichol 2021, Algorithm 2 and eq. 14, written with sigma(t) instead of sqrt(1 - alphabar)).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .denoiser import Denoiser
from .fit import fit
from .nets import MLP, ResBlock, TimeEmbedding, _batch_times, downsample
from .processes import GaussianProcess, expand

ClassifierFunction = Callable[[Tensor, Tensor], Tensor]  # (x_t [B, ...], t [B]) -> logits [B, K]


class NoisyImageClassifier(nn.Module):
    """``(x_t [B, C, H, W], t [B]) -> logits [B, K]``: the U-Net's downsampling half (ResBlocks with the time
    embedding, average pooling between resolutions), global average pooling and a linear head: the
    encoder-half classifier of Dhariwal & Nichol 2021 (sec. 4), small."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 32, channel_mult: Sequence[int] = (1, 2),
                 groups: int = 8):
        super().__init__()
        time_dim = 4 * channels
        self.time_embedding = TimeEmbedding(time_dim)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        widths = [channels * m for m in channel_mult]
        self.blocks = nn.ModuleList(ResBlock(c_in, c_out, time_dim, groups, 0.0)
                                    for c_in, c_out in zip([channels] + widths[:-1], widths))
        self.norm = nn.GroupNorm(groups, widths[-1])
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        time_embedding = self.time_embedding(_batch_times(t, x.shape[0]))
        h = self.conv_in(x)
        for level, block in enumerate(self.blocks):
            if level > 0:
                h = downsample(h)
            h = block(h, time_embedding)
        return self.head(F.silu(self.norm(h)).mean(dim=(2, 3)))


def build_noisy_classifier(shape: Sequence[int], num_classes: int, width: int = 32) -> nn.Module:
    """A noise-conditional classifier for examples of ``shape``: images (C, H, W) or points (D,)."""
    if len(shape) == 3:
        return NoisyImageClassifier(shape[0], num_classes, channels=width)
    return MLP(dim=shape[0], hidden=max(width, 64), depth=3, out_dim=num_classes)


def train_noisy_classifier(classifier: nn.Module, process: GaussianProcess, x: Tensor, labels: Tensor, steps: int,
                           generator: torch.Generator, batch_size: int = 128, lr: float = 1e-3,
                           on_log: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """Cross-entropy of p_phi(y | x_t, t) on x_t = alpha(t) x0 + sigma(t) eps, t uniform on the process's
    training times (Dhariwal & Nichol 2021, sec. 4: the classifier sees the noised data the sampler
    visits). The noising happens in the process's basis (blur diffusion's DCT), the classifier sees pixels.
    Adam (``fit.fit``) with the given generator for every draw; returns the mean loss of every 50 steps (and of
    the last ones), each also handed to ``on_log(step, loss)``."""
    def loss() -> Tensor:
        index = torch.randint(len(x), (min(batch_size, len(x)),), generator=generator, device=x.device)
        t = process.sample_times(len(index), generator, x.device)
        eps = torch.randn(x[index].shape, generator=generator, device=x.device)
        x_t = process.from_basis(process.marginal(process.to_basis(x[index]), t, eps))
        return F.cross_entropy(classifier(x_t, process.network_time(t)), labels[index])

    history, window = [], []

    def record(step: int, value: float) -> None:
        window.append(value)
        if step % 50 == 0 or step == steps:
            history.append(sum(window) / len(window))
            window.clear()
            if on_log:
                on_log(step, history[-1])

    fit(classifier, loss, steps, lr, on_step=record)
    return history


def classifier_log_prob_grad(classifier: ClassifierFunction, x_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
    """grad_x log p_phi(y | x_t, t) for each example's label: ``[B, ...]``."""
    with torch.enable_grad():
        x = x_t.detach().float().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x, t).float(), dim=-1)
        chosen = log_probs.gather(1, labels.reshape(-1, 1).long()).sum()
        return torch.autograd.grad(chosen, x)[0].to(x_t.dtype)


def classifier_guided(denoiser: Denoiser, classifier: ClassifierFunction, labels: Tensor, scale: float,
                      network_time: bool = True) -> Denoiser:
    """The denoiser guided towards ``labels [B]`` by a classifier: eps - scale * sigma(t) * grad log p(y | x_t)
    (module docstring), with x_t in the process's basis: the classifier sees pixels, the gradient is taken
    with respect to the basis coefficients. ``classifier(x_t, time)`` receives the process's network time when
    ``network_time`` (a trained :func:`build_noisy_classifier`), the plain t otherwise (an exact classifier)."""
    process = denoiser.process

    def eps_fn(x_t: Tensor, t: Tensor):
        eps, head = denoiser.predict(x_t, t)
        time = process.network_time(t) if network_time else t
        in_basis = lambda u, time: classifier(process.from_basis(u), time)  # noqa: E731 (pixels for the classifier)
        grad = classifier_log_prob_grad(in_basis, x_t, time, labels)
        eps = eps - scale * expand(process.sigma(t), x_t).to(eps.dtype) * grad
        return (eps, head) if denoiser.learned_variance else eps

    return Denoiser(eps_fn, process, denoiser.learned_variance, cost=denoiser.cost)


def noisy_classifier_accuracy(classifier: nn.Module, process: GaussianProcess, x: Tensor, labels: Tensor,
                              times: Sequence[float], generator: torch.Generator) -> dict[float, float]:
    """Accuracy of the noise-conditional classifier on held-out data noised to each time in ``times``."""
    result = {}
    with torch.no_grad():
        for time in times:
            t = torch.full((len(x),), float(time), device=x.device)
            eps = torch.randn(x.shape, generator=generator, device=x.device)
            x_t = process.from_basis(process.marginal(process.to_basis(x), t, eps))
            predicted = classifier(x_t, process.network_time(t)).argmax(dim=1)
            result[float(time)] = float((predicted == labels).float().mean())
    return result


def round_robin_labels(n: int, num_classes: int, device: Optional[torch.device] = None) -> Tensor:
    """The class asked of each of n conditional samples: 0, 1, ..., K-1, 0, 1, ... (every class equally often)."""
    return torch.arange(n, device=device) % num_classes



def fit_noisy_classifier(dataset, process: GaussianProcess, device: Optional[torch.device] = None, *, seed: int = 0,
                         steps: int = 2000) -> tuple[nn.Module, dict]:
    """Train a noise-conditional classifier (:func:`build_noisy_classifier`) for ``process`` on the data set's
    labelled train split on ``device`` (default: the CPU), ``steps`` steps (a config's ``sample.classifier_steps``);
    its initial weights (under a forked global RNG) and every draw come from ``seed + 3``, ``seed`` being the
    trial's (a config's ``seed``), so they are a stream of their own. Returns it and its record: the final loss and
    its test accuracy at t = 0.1, 0.5 and 0.9."""
    device = torch.device("cpu") if device is None else device
    generator = torch.Generator(device=device).manual_seed(seed + 3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 3)
        classifier = build_noisy_classifier(dataset.shape, dataset.num_classes).to(device)
    history = train_noisy_classifier(classifier, process, dataset.train.to(device), dataset.train_labels.to(device),
                                     steps, generator)
    accuracy = noisy_classifier_accuracy(classifier, process, dataset.test.to(device), dataset.test_labels.to(device),
                                         (0.1, 0.5, 0.9), generator)
    record = {"loss": history[-1], **{f"accuracy_t{t:g}": a for t, a in accuracy.items()},
              "shape": list(dataset.shape), "num_classes": dataset.num_classes}
    return classifier, record
