"""Denoising networks: a U-Net for images and an MLP for 2-D points.

Every network has the signature ``forward(x [B, *data_shape], t [B]) -> [B, *data_shape]``, where
t is the diffusion time in [0, 1] (the caller passes i/T for discrete step i). What the output means
(eps, score, ...) is decided by the parameterization, not here.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .errors import ConfigError
from .registry import options_for

ARCHITECTURES = ("auto", "unet", "mlp")

# Frequencies of the sinusoidal time embedding, in radians per unit of t (t in [0, 1]). The fastest
# channel turns by 1 rad per 1/1000 of t, so steps of 1/1000 (T = 1000) move it to a clearly
# different point of its circle; the slowest turns by 1 rad over all of [0, 1], so sin/cos of it are
# monotone there and separate the beginning from the end of the process. In between the frequencies
# are spaced geometrically, as in Vaswani et al. (2017), Sec. 3.5.
TIME_EMBEDDING_MAX_FREQUENCY = 1000.0
TIME_EMBEDDING_MIN_FREQUENCY = 1.0
TIME_SINUSOID_DIM = 64  # sin/cos features (32 frequencies) fed to the time-embedding MLP


def _config_error(key: str, value, accepted: str) -> ConfigError:
    return ConfigError(f"model.{key}", value, accepted)


def validate(cfg: ModelConfig) -> None:
    """Check the network fields of a ModelConfig; raise ConfigError naming the first bad key."""
    if cfg.arch not in ARCHITECTURES:
        raise _config_error("arch", cfg.arch, ", ".join(ARCHITECTURES))
    if not (isinstance(cfg.channels, int) and cfg.channels >= 1):
        raise _config_error("channels", cfg.channels, "an integer >= 1")
    if len(cfg.channel_mult) == 0 or any(not isinstance(m, int) or m < 1 for m in cfg.channel_mult):
        raise _config_error("channel_mult", cfg.channel_mult, "a non-empty list of integers >= 1")
    if not (isinstance(cfg.num_res_blocks, int) and cfg.num_res_blocks >= 1):
        raise _config_error("num_res_blocks", cfg.num_res_blocks, "an integer >= 1")
    if not (isinstance(cfg.groups, int) and cfg.groups >= 1):
        raise _config_error("groups", cfg.groups, "an integer >= 1")
    channel_counts = sorted({cfg.channels * m for m in cfg.channel_mult} | {cfg.channels})
    if any(count % cfg.groups for count in channel_counts):
        raise _config_error(
            "groups", cfg.groups,
            f"a divisor of every U-Net channel count (model.channels * model.channel_mult = {channel_counts})",
        )
    if not 0.0 <= cfg.dropout < 1.0:
        raise _config_error("dropout", cfg.dropout, "a number in [0, 1)")
    if not (isinstance(cfg.hidden, int) and cfg.hidden >= 1):
        raise _config_error("hidden", cfg.hidden, "an integer >= 1")
    if not (isinstance(cfg.depth, int) and cfg.depth >= 1):
        raise _config_error("depth", cfg.depth, "an integer >= 1")


def build_network(cfg: ModelConfig, data_shape: Sequence[int], num_classes: Optional[int] = None) -> nn.Module:
    """The network ``cfg.arch`` names, sized for examples of shape data_shape (``(C, H, W)`` or ``(D,)``):
    :class:`UNet` or :class:`MLP` with the options it declares, read from ``cfg`` by name.
    With ``variance: learned_range`` it outputs twice the channels: the prediction, then the variance head.
    With ``num_classes`` (``model.class_conditional``) it takes a class label as a third input."""
    validate(cfg)
    data_shape = tuple(int(n) for n in data_shape)
    arch = {3: "unet", 1: "mlp"}.get(len(data_shape), "auto") if cfg.arch == "auto" else cfg.arch
    outputs = data_shape[0] * (2 if cfg.variance == "learned_range" else 1)
    if arch == "unet" and len(data_shape) == 3:
        return UNet(data_shape[0], **options_for(UNet, cfg, out_channels=outputs, num_classes=num_classes))
    if arch == "mlp" and len(data_shape) == 1:
        return MLP(data_shape[0], **options_for(MLP, cfg, out_dim=outputs, num_classes=num_classes))
    raise ConfigError(
        "model.arch", cfg.arch, "unet (or auto) for images (C, H, W), mlp (or auto) for vectors (D,)",
        detail=f"data shape is {data_shape}",
    )


# --------------------------------------------------------------------------------------------
# Time embedding
# --------------------------------------------------------------------------------------------


class SinusoidalTimeEmbedding(nn.Module):
    """``t [B] -> [B, dim]``: sin(w_k t) and cos(w_k t) for dim/2 geometrically spaced frequencies w_k.

    The Transformer position encoding (Vaswani et al. 2017, Sec. 3.5) used as a time embedding by
    Ho et al. (2020, Appendix B). Ho et al. feed the integer step i = 0..999, with frequencies from
    1 to 1e-4 rad per step; here t = i/T is a float in [0, 1], so the frequencies are stated per
    unit of t instead: from ``max_frequency`` (1000 rad: one 1/1000 step turns that channel by
    1 rad) down to ``min_frequency`` (1 rad over the whole process). See
    TIME_EMBEDDING_MAX_FREQUENCY for the reasoning.
    """

    def __init__(self, dim: int = TIME_SINUSOID_DIM, max_frequency: float = TIME_EMBEDDING_MAX_FREQUENCY,
                 min_frequency: float = TIME_EMBEDDING_MIN_FREQUENCY):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"sinusoidal embedding dim must be even and >= 2, got {dim}")
        frequencies = torch.exp(torch.linspace(math.log(min_frequency), math.log(max_frequency), dim // 2))
        # Not persistent: a function of the constructor arguments, so it stays out of checkpoints.
        self.register_buffer("frequencies", frequencies, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        phase = t.float().unsqueeze(-1) * self.frequencies  # [B, dim/2]
        return torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1)


class TimeEmbedding(nn.Module):
    """``t [B] -> [B, dim]``: sinusoidal features followed by Linear-SiLU-Linear (Ho et al. 2020)."""

    def __init__(self, dim: int, sinusoid_dim: int = TIME_SINUSOID_DIM):
        super().__init__()
        self.sinusoid = SinusoidalTimeEmbedding(sinusoid_dim)
        self.mlp = nn.Sequential(nn.Linear(sinusoid_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.sinusoid(t))


class LabelEmbedding(nn.Module):
    """``labels [B] -> [B, dim]``, added to the time embedding: a class-conditional network (as in
    Dhariwal & Nichol 2021 and Ho & Salimans 2022). Label ``num_classes`` (or ``labels=None``) is the
    null label: the unconditional model that classifier-free guidance trains by label dropout. Its
    embedding starts at zero, so an untrained conditional network equals the unconditional one."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)
        with torch.no_grad():
            self.table.weight[num_classes].zero_()

    def forward(self, labels: Optional[Tensor], batch_size: int, device: torch.device) -> Tensor:
        if labels is None:
            labels = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
        return self.table(labels.reshape(batch_size).long())


def _conditioning(time_embedding: Tensor, labels: Optional[Tensor], label_embedding: Optional[LabelEmbedding]) -> Tensor:
    if label_embedding is None:
        if labels is not None:
            raise ValueError("labels given to a network that is not class-conditional")
        return time_embedding
    return time_embedding + label_embedding(labels, time_embedding.shape[0], time_embedding.device)


def _batch_times(t: Tensor, batch_size: int) -> Tensor:
    """t as ``[B]``: a scalar (0-d or one-element) t is broadcast to the whole batch."""
    t = torch.as_tensor(t)
    if t.numel() == 1 and batch_size != 1:
        t = t.reshape(()).expand(batch_size)
    return t.reshape(batch_size)


# --------------------------------------------------------------------------------------------
# U-Net (Ho et al. 2020, Appendix B; after PixelCNN++ and Wide ResNets)
# --------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """Residual block of the DDPM U-Net (Ho et al. 2020, Appendix B).

    h = conv3x3(SiLU(GroupNorm(x))); h += Linear(SiLU(temb)) per channel;
    h = conv3x3(Dropout(SiLU(GroupNorm(h)))); return skip(x) + h,
    where skip is a 1x1 conv when the channel count changes, else the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm_in = nn.GroupNorm(groups, in_channels)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_to_channels = nn.Linear(time_dim, out_channels)
        self.norm_out = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, time_embedding: Tensor) -> Tensor:
        """x ``[B, C_in, H, W]``, time_embedding ``[B, time_dim]`` -> ``[B, C_out, H, W]``."""
        h = self.conv_in(F.silu(self.norm_in(x)))
        h = h + self.time_to_channels(F.silu(time_embedding))[:, :, None, None]
        h = self.conv_out(self.dropout(F.silu(self.norm_out(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Residual self-attention over the H*W positions of a feature map (Ho et al. 2020, Appendix B;
    scaled dot-product attention of Vaswani et al. 2017): x + proj(Attention(GroupNorm(x))).

    num_heads = 1 is the single-head block of Ho et al.; more heads split the channels.
    """

    def __init__(self, channels: int, groups: int, num_heads: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{num_heads} attention heads do not divide {channels} channels")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(batch, 3, self.num_heads, channels // self.num_heads, height * width)
        query, key, value = qkv.transpose(-1, -2).unbind(1)  # each [B, heads, H*W, C/heads]
        attended = F.scaled_dot_product_attention(query, key, value)  # [B, heads, H*W, C/heads]
        attended = attended.transpose(-1, -2).reshape(batch, channels, height, width)
        return x + self.proj_out(attended)


def downsample(x: Tensor) -> Tensor:
    """Halve the resolution by 2x2 average pooling; odd sizes round up (7 -> 4)."""
    return F.avg_pool2d(x, kernel_size=2, ceil_mode=True)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to a given size with a 1x1 conv that changes the channel count.

    ``[B, C_in, h, w] -> [B, C_out, H, W]``. The 1x1 conv commutes with nearest upsampling, so it is
    applied first, at the low resolution, where it is four times cheaper. The target size is that of
    the matching skip connection, so odd resolutions round-trip exactly (7 -> 4 -> 7).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        return F.interpolate(self.conv(x), size=tuple(size), mode="nearest")


class UNet(nn.Module):
    """A small DDPM-style U-Net (Ho et al. 2020, Appendix B; Ronneberger et al. 2015),
    ``(x [B, C, H, W], t [B]) -> [B, C, H, W]``.

    - a 3x3 input conv to ``channels``;
    - downsampling path: one resolution level per entry of ``channel_mult``, each with
      ``num_res_blocks`` ResBlocks of ``channels * mult`` channels, 2x2 average pooling between levels;
    - at the lowest resolution, residual self-attention (if ``attention``);
    - a mirror-image upsampling path: per level ``num_res_blocks`` ResBlocks, each taking the
      concatenation of the current features and the output of the matching downsampling ResBlock
      (the skip connection); nearest-neighbour upsampling between levels;
    - GroupNorm, SiLU and a zero-initialised 3x3 output conv, so the untrained network outputs 0
      (as in Ho et al.'s code).

    The time t in [0, 1] enters every ResBlock through a ``4 * channels`` wide embedding
    (:class:`TimeEmbedding`, as Ho et al.).

    Leaner than Ho et al. so it trains fast on a CPU (about 2.5x fewer FLOPs at equal width):
    no ResBlocks in the middle, ``num_res_blocks`` (not ``num_res_blocks + 1``) ResBlocks per
    upsampling level with one skip each, parameter-free average-pool downsampling and a 1x1 conv
    instead of a 3x3 conv at upsampling, attention only at the lowest resolution, and only the
    output conv zero-initialised.

    The defaults are those of :class:`ModelConfig`: ``UNet(C)`` is the network that
    ``build_network(ModelConfig(), (C, H, W))`` builds, from the same random state.
    """

    def __init__(self, in_channels: int, channels: int = 32, channel_mult: Sequence[int] = (1, 2),
                 num_res_blocks: int = 1, attention: bool = True, groups: int = 8, dropout: float = 0.0,
                 attention_heads: int = 1, out_channels: int | None = None, num_classes: int | None = None):
        super().__init__()
        level_channels = [channels * mult for mult in channel_mult]
        time_dim = 4 * channels
        self.time_embedding = TimeEmbedding(time_dim)
        self.label_embedding = LabelEmbedding(num_classes, time_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        def res_blocks(widths: list[tuple[int, int]]) -> nn.ModuleList:
            return nn.ModuleList(ResBlock(c_in, c_out, time_dim, groups, dropout) for c_in, c_out in widths)

        # Downsampling path: down_levels[l][j] is ResBlock j of level l (highest resolution first).
        self.down_levels = nn.ModuleList()
        current = channels
        for width in level_channels:
            self.down_levels.append(res_blocks([(current, width)] + [(width, width)] * (num_res_blocks - 1)))
            current = width

        self.attention: Optional[SelfAttention] = (
            SelfAttention(current, groups, attention_heads) if attention else None
        )

        # Upsampling path: up_levels[0] is the lowest resolution. Every ResBlock reads its input
        # concatenated with the skip from the mirrored downsampling ResBlock (same level, same width).
        self.up_levels = nn.ModuleList()
        self.upsamplers = nn.ModuleList()  # upsamplers[i] goes from up_levels[i] to up_levels[i + 1]
        for level in reversed(range(len(level_channels))):
            width = level_channels[level]
            self.up_levels.append(res_blocks([(current + width, width)] + [(2 * width, width)] * (num_res_blocks - 1)))
            current = width
            if level > 0:
                self.upsamplers.append(Upsample(current, level_channels[level - 1]))
                current = level_channels[level - 1]

        self.norm_out = nn.GroupNorm(groups, current)
        self.conv_out = nn.Conv2d(current, out_channels or in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """x ``[B, C, H, W]``, t ``[B]`` (or a scalar) in [0, 1], labels ``[B]`` (class-conditional
        networks; None or ``num_classes``: unconditional) -> ``[B, C, H, W]``."""
        time_embedding = self.time_embedding(_batch_times(t, x.shape[0]))  # [B, 4 * channels]
        time_embedding = _conditioning(time_embedding, labels, self.label_embedding)
        h = self.conv_in(x)
        skips = []  # outputs of the downsampling ResBlocks, consumed in reverse order
        for level, blocks in enumerate(self.down_levels):
            if level > 0:
                h = downsample(h)
            for block in blocks:
                h = block(h, time_embedding)
                skips.append(h)

        if self.attention is not None:
            h = self.attention(h)

        for level, blocks in enumerate(self.up_levels):
            if level > 0:
                h = self.upsamplers[level - 1](h, size=skips[-1].shape[-2:])
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), time_embedding)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------------------------
# MLP for low-dimensional points
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """``(x [B, D], t [B]) -> [B, D]``: ``depth`` SiLU layers of width ``hidden``, conditioned on t.

    Each hidden layer computes SiLU(W h + V temb + b), i.e. a linear layer applied to the
    concatenation [h, temb] of its input and the time embedding (the first layer's input h is x);
    feeding t to every layer, not only the first, keeps the time signal from washing out. The
    output layer is zero-initialised, as the U-Net's.

    The defaults are those of :class:`ModelConfig`: ``MLP(D)`` is the network that
    ``build_network(ModelConfig(), (D,))`` builds, from the same random state.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, out_dim: int | None = None,
                 num_classes: int | None = None):
        super().__init__()
        self.time_embedding = TimeEmbedding(hidden)
        self.label_embedding = LabelEmbedding(num_classes, hidden) if num_classes else None
        widths = [dim] + [hidden] * depth
        self.hidden_layers = nn.ModuleList(nn.Linear(w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:]))
        self.time_layers = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(depth))
        self.output = nn.Linear(hidden, out_dim or dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """x ``[B, D]``, t ``[B]`` (or a scalar) in [0, 1], labels ``[B]`` or None -> ``[B, D]``."""
        time_embedding = self.time_embedding(_batch_times(t, x.shape[0]))
        time_embedding = F.silu(_conditioning(time_embedding, labels, self.label_embedding))  # [B, hidden]
        h = x
        for hidden_layer, time_layer in zip(self.hidden_layers, self.time_layers):
            h = F.silu(hidden_layer(h) + time_layer(time_embedding))
        return self.output(h)
