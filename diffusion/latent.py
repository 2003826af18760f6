"""Latent diffusion (Rombach et al. 2022): a small convolutional VAE (Kingma & Welling 2014) trained first, and any
Gaussian process of the zoo run on its latent codes.

The VAE maps an image [C, H, W] in [-1, 1] to q(z | x) = N(mu(x), diag(s(x)^2)) on z [c, H / f, W / f]
(``model.latent_channels`` c, ``model.latent_factor`` f) and decodes z to an image. It is trained with the
beta-VAE objective, both terms per data dimension: ||x - D(z)||^2 / D_x + ``model.vae_kl_weight`` KL(q(z | x) ||
N(0, I)) / D_z, z drawn by the reparameterization trick. A small KL weight keeps the codes informative while
bounding their scale (the regularization of Rombach et al.'s "KL-reg" autoencoders, who use 1e-6 on far larger
images). The diffusion model is trained on the codes mu(x) / scale, with ``scale`` the standard deviation of the
training codes, so that they have unit variance as the processes' priors assume (Rombach et al., sec. 4.3.2 and
appendix G's scale factor). Samples are decoded by D(z * scale) and measured in pixel space (FID and the rest).

A latent model's bits/dim are not the data's (the code is not the image; the decoder's likelihood would have to
be added), so they are not computed: runs say so in a tag.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor, nn

from .data import Dataset
from .fit import fit

LIKELIHOOD_NOTE = ("latent diffusion: bits/dim of the VAE's codes are not the data's (the decoder's likelihood "
                   "would have to be added), so none are computed")


def gaussian_kl(mean: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mean, diag exp(log_var)) || N(0, I)) in nats per example [B]."""
    return 0.5 * (mean**2 + log_var.exp() - 1 - log_var).flatten(1).sum(1)


class ConvVAE(nn.Module):
    """Encoder: conv, then per factor of 2 a stride-2 conv, each followed by SiLU, then a 1x1 conv to 2c channels
    (mean and log-variance). Decoder: the mirror image, nearest-neighbour upsampling then conv, output tanh."""

    def __init__(self, shape: tuple, latent_channels: int, factor: int, channels: int):
        super().__init__()
        self.shape, self.latent_channels, self.factor = tuple(shape), latent_channels, factor
        levels = int(round(math.log2(factor)))
        encoder = [nn.Conv2d(shape[0], channels, 3, padding=1), nn.SiLU()]
        for _ in range(levels):
            encoder += [nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.SiLU()]
        encoder += [nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(), nn.Conv2d(channels, 2 * latent_channels, 1)]
        decoder = [nn.Conv2d(latent_channels, channels, 3, padding=1), nn.SiLU()]
        for _ in range(levels):
            decoder += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU()]
        decoder += [nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(), nn.Conv2d(channels, shape[0], 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*encoder), nn.Sequential(*decoder)
        self.register_buffer("scale", torch.ones(()))  # std of the training codes, set by fit_vae

    @property
    def latent_shape(self) -> tuple:
        return (self.latent_channels, self.shape[1] // self.factor, self.shape[2] // self.factor)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, log-variance) of q(z | x), each [B, c, H / f, W / f]."""
        mean, log_var = self.encoder(x).chunk(2, dim=1)
        return mean, log_var.clamp(-30, 20)

    def decode(self, z: Tensor) -> Tensor:
        return torch.tanh(self.decoder(z))

    def loss(self, x: Tensor, kl_weight: float, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, reconstruction MSE, KL in nats per example), each [B]."""
        mean, log_var = self.posterior(x)
        z = mean + (0.5 * log_var).exp() * torch.randn(mean.shape, generator=generator, device=x.device)
        recon = (self.decode(z) - x).pow(2).flatten(1).mean(1)
        kl = gaussian_kl(mean, log_var)
        return recon + kl_weight * kl / mean[0].numel(), recon, kl

    def encode(self, x: Tensor) -> Tensor:
        """The diffusion model's data: mu(x) / scale."""
        return self.posterior(x)[0] / self.scale

    def decode_codes(self, z: Tensor) -> Tensor:
        """Images from the diffusion model's codes: D(z * scale)."""
        return self.decode(z * self.scale)


def build_vae(shape: tuple, *, latent_channels: int = 2, latent_factor: int = 2, channels: int = 32) -> ConvVAE:
    """An untrained VAE for images of ``shape`` (C, H, W): codes of ``latent_channels`` channels at 1 /
    ``latent_factor`` of the image size (a power of 2, one stride-2 convolution per factor of 2; it must divide H
    and W), convolutions ``channels`` wide. A config's ``model.latent_channels``, ``model.latent_factor`` and
    ``model.vae_channels`` (their defaults are these)."""
    if shape[-1] % latent_factor or shape[-2] % latent_factor:
        raise ValueError(f"latent_factor: invalid value {latent_factor!r}; accepted: a divisor of the image size "
                         f"{shape[-2]}x{shape[-1]}")
    return ConvVAE(shape, latent_channels, latent_factor, channels)


def fit_vae(dataset: Dataset, device: Optional[torch.device] = None, *, seed: int = 0, latent_channels: int = 2,
            latent_factor: int = 2, channels: int = 32, steps: int = 2000, kl_weight: float = 1e-3, lr: float = 1e-3,
            batch_size: int = 128) -> tuple[ConvVAE, dict]:
    """Train a VAE (:func:`build_vae` of ``latent_channels``, ``latent_factor``, ``channels``) on the data set's
    training split on ``device`` (default: the CPU) and set its scale; returns it with its record: test-split
    reconstruction MSE and PSNR (from the posterior mean), KL per example (nats) and per latent dimension, the scale,
    and the shapes. Adam, ``steps`` steps of ``batch_size`` examples at learning rate ``lr``, on the beta-VAE loss
    with KL weight ``kl_weight``; ``seed`` seeds the initial weights and every draw. A config's ``seed``,
    ``model.vae_steps``, ``model.vae_kl_weight``, ``model.vae_lr`` and ``train.batch_size`` (their defaults are
    these)."""
    device = torch.device("cpu") if device is None else device
    torch.manual_seed(seed)
    vae = build_vae(dataset.shape, latent_channels=latent_channels, latent_factor=latent_factor,
                    channels=channels).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    train = dataset.train.to(device)

    def loss() -> Tensor:
        index = torch.randint(len(train), (batch_size,), generator=generator, device=device)
        return vae.loss(train[index], kl_weight, generator)[0].mean()

    fit(vae, loss, steps, lr)
    with torch.no_grad():
        codes = torch.cat([vae.posterior(batch)[0] for batch in train.split(1024)])
        vae.scale.fill_(codes.std().item())
        record = evaluate_vae(vae, dataset.test.to(device))
    return vae, {**record, "scale": vae.scale.item(), "shape": list(dataset.shape), "latent_shape": list(vae.latent_shape)}


@torch.no_grad()
def evaluate_vae(vae: ConvVAE, x: Tensor) -> dict:
    """Reconstruction of x by the posterior mean (MSE, PSNR for data in [-1, 1]) and the KL of q(z | x)."""
    mean, log_var = vae.posterior(x)
    mse = (vae.decode(mean) - x).pow(2).flatten(1).mean(1)
    kl = gaussian_kl(mean, log_var)
    return {"vae_recon_mse": mse.mean().item(), "vae_recon_psnr": (10 * torch.log10(4.0 / mse)).mean().item(),
            "vae_kl": kl.mean().item(), "vae_kl_per_dim": kl.mean().item() / mean[0].numel()}


@torch.no_grad()
def latent_dataset(dataset: Dataset, vae: ConvVAE) -> Dataset:
    """The data set of codes the diffusion model trains on: the same splits and labels, continuous (no levels)."""
    device = next(vae.parameters()).device
    encode = lambda x: torch.cat([vae.encode(b.to(device)).cpu() for b in x.split(1024)])  # noqa: E731
    return dataclasses.replace(dataset, name=f"{dataset.name} (latent)", train=encode(dataset.train),
                               test=encode(dataset.test), levels=None, log_prob=None)
