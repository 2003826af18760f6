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
UNET_LAYOUTS = ("lean", "ddpm")
RESAMPLING = ("pool", "conv")

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
    if cfg.layout not in UNET_LAYOUTS:
        raise _config_error("layout", cfg.layout, ", ".join(UNET_LAYOUTS))
    if cfg.resample not in RESAMPLING:
        raise _config_error("resample", cfg.resample, ", ".join(RESAMPLING))
    sides = cfg.attention_resolutions
    if not isinstance(sides, (list, tuple)) or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sides):
        raise _config_error("attention_resolutions", sides, "a list of feature-map sides (integers >= 1), e.g. [16]")
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
        sides = unet_resolutions(data_shape[-1], len(cfg.channel_mult))
        if set(cfg.attention_resolutions) - set(sides):
            raise ConfigError("model.attention_resolutions", list(cfg.attention_resolutions),
                              f"sides of this U-Net's feature maps, {sides}",
                              detail=f"data shape is {data_shape}, model.channel_mult has {len(cfg.channel_mult)} levels")
        return UNet(data_shape[0], **options_for(UNet, cfg, out_channels=outputs, num_classes=num_classes,
                                                 resolution=data_shape[-1]))
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
        # computed on the CPU and moved to the default device: an elementwise op on the ``meta`` device (preflight's
        # shape checks) makes PyTorch import its compiler stack first, about a second
        frequencies = torch.exp(torch.linspace(math.log(min_frequency), math.log(max_frequency), dim // 2,
                                               device="cpu")).to(torch.get_default_device())
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


class Downsample(nn.Module):
    """Halve the resolution: 2x2 average pooling (``with_conv=False``, no parameters) or a 3x3 convolution of
    stride 2 that keeps the channel count (Ho et al. 2020). Both round odd sizes up (7 -> 4)."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        return downsample(x) if self.conv is None else self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to a given size, ``[B, C_in, h, w] -> [B, C_out, H, W]``, with a convolution:

    - ``kernel_size=1`` (the lean U-Net): a 1x1 conv that changes the channel count. It commutes with nearest
      upsampling, so it is applied first, at the low resolution, where it is four times cheaper;
    - ``kernel_size=3`` (Ho et al. 2020): a 3x3 conv after upsampling;
    - ``kernel_size=0``: no conv (the channel count must not change).

    The target size is that of the matching skip connection, so odd resolutions round-trip exactly (7 -> 4 -> 7).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__()
        if kernel_size == 0 and in_channels != out_channels:
            raise ValueError(f"upsampling without a conv cannot change {in_channels} channels into {out_channels}")
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2) if kernel_size else None
        self.conv_first = kernel_size == 1

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        if self.conv is not None and self.conv_first:
            return F.interpolate(self.conv(x), size=tuple(size), mode="nearest")
        x = F.interpolate(x, size=tuple(size), mode="nearest")
        return x if self.conv is None else self.conv(x)


def unet_resolutions(resolution: int, levels: int) -> list[int]:
    """The feature-map side at each level of a U-Net for inputs of side ``resolution`` (halved, rounding up)."""
    sides = [resolution]
    for _ in range(levels - 1):
        sides.append(-(-sides[-1] // 2))
    return sides


class UNet(nn.Module):
    """A DDPM-style U-Net (Ho et al. 2020, Appendix B; Ronneberger et al. 2015),
    ``(x [B, C, H, W], t [B]) -> [B, C, H, W]``, in one of two layouts.

    Both have a 3x3 input conv to ``channels``; a downsampling path with one resolution level per entry of
    ``channel_mult``, each of ``num_res_blocks`` ResBlocks of ``channels * mult`` channels; a mirror-image
    upsampling path whose ResBlocks read their input concatenated with a skip connection from the downsampling
    path; GroupNorm, SiLU and a zero-initialised 3x3 output conv, so the untrained network outputs 0 (as in Ho et
    al.'s code). The time t in [0, 1] enters every ResBlock through a ``4 * channels`` wide embedding
    (:class:`TimeEmbedding`; layout ddpm: of ``channels`` sinusoidal features, as Ho et al.). Residual self-attention follows every ResBlock at the feature-map sides listed in
    ``attention_resolutions`` (Ho et al.: ``[16]`` on CIFAR-10), which needs the input side ``resolution``.

    ``layout="ddpm"`` is Ho et al.'s network: a middle block ResBlock, self-attention (if ``attention``),
    ResBlock at the lowest resolution; ``num_res_blocks + 1`` ResBlocks per upsampling level, whose skips are the
    outputs of the input conv, of every downsampling ResBlock and of every downsampler; the channel count changes
    in the ResBlocks. With ``channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
    attention_resolutions=(16,), resample="conv", dropout=0.1`` on 32x32 images it is their CIFAR-10 model, with
    35.7M parameters.

    ``layout="lean"`` (the default) trains fast on a CPU (about 2.5x fewer FLOPs at equal width): no middle
    ResBlocks (self-attention at the lowest resolution if ``attention``), ``num_res_blocks`` ResBlocks per
    upsampling level with one skip each (the matching downsampling ResBlock's output), and the channel count
    changed by the upsampler.

    ``resample``: ``pool`` downsamples by 2x2 average pooling and upsamples by nearest neighbour (lean: with a 1x1
    conv at the low resolution); ``conv`` downsamples by a stride-2 3x3 conv and upsamples by nearest neighbour
    and a 3x3 conv (Ho et al.).

    The defaults are those of :class:`ModelConfig`: ``UNet(C)`` is the network that
    ``build_network(ModelConfig(), (C, H, W))`` builds, from the same random state.
    """

    def __init__(self, in_channels: int, channels: int = 32, channel_mult: Sequence[int] = (1, 2),
                 num_res_blocks: int = 1, attention: bool = True, groups: int = 8, dropout: float = 0.0,
                 attention_heads: int = 1, out_channels: int | None = None, num_classes: int | None = None,
                 attention_resolutions: Sequence[int] = (), resample: str = "pool", layout: str = "lean",
                 resolution: int | None = None):
        super().__init__()
        if layout not in UNET_LAYOUTS:
            raise ValueError(f"layout must be one of {UNET_LAYOUTS}, got {layout!r}")
        if resample not in RESAMPLING:
            raise ValueError(f"resample must be one of {RESAMPLING}, got {resample!r}")
        level_channels = [channels * mult for mult in channel_mult]
        levels = len(level_channels)
        attention_resolutions = {int(side) for side in attention_resolutions}
        if attention_resolutions and resolution is None:
            raise ValueError("attention_resolutions needs the input side: pass resolution")
        sides = unet_resolutions(resolution, levels) if resolution else [0] * levels
        if attention_resolutions - set(sides):
            raise ValueError(f"attention_resolutions {sorted(attention_resolutions)} are not all among this "
                             f"U-Net's feature-map sides {sides}")
        self.layout = layout
        ddpm = layout == "ddpm"
        time_dim = 4 * channels
        # Ho et al. feed ``channels`` sinusoidal features to the time MLP; the lean U-Net TIME_SINUSOID_DIM.
        self.time_embedding = TimeEmbedding(time_dim, max(2, channels - channels % 2) if ddpm else TIME_SINUSOID_DIM)
        self.label_embedding = LabelEmbedding(num_classes, time_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        def res_block(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, time_dim, groups, dropout)

        def attention_blocks(side: int, width: int, count: int) -> nn.ModuleList:
            """Self-attention after each of ``count`` ResBlocks of a level with feature maps of this side."""
            wanted = side in attention_resolutions
            return nn.ModuleList(SelfAttention(width, groups, attention_heads) if wanted else nn.Identity()
                                 for _ in range(count))

        # Downsampling path: down_levels[l][j] is ResBlock j of level l (highest resolution first), followed by
        # down_attention[l][j]; downsamplers[l] goes from level l to level l + 1. skip_widths: what each stage
        # hands the upsampling path, in order.
        self.down_levels, self.down_attention, self.downsamplers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        skip_widths = [channels] if ddpm else []
        current = channels
        for level, width in enumerate(level_channels):
            self.down_levels.append(nn.ModuleList(
                res_block(c_in, width) for c_in in [current] + [width] * (num_res_blocks - 1)))
            self.down_attention.append(attention_blocks(sides[level], width, num_res_blocks))
            skip_widths += [width] * num_res_blocks
            current = width
            if level < levels - 1:
                self.downsamplers.append(Downsample(width, with_conv=resample == "conv"))
                skip_widths += [width] if ddpm else []

        self.middle: Optional[nn.ModuleList] = (
            nn.ModuleList([res_block(current, current), res_block(current, current)]) if ddpm else None)
        self.attention: Optional[SelfAttention] = (
            SelfAttention(current, groups, attention_heads) if attention else None
        )

        # Upsampling path: up_levels[0] is the lowest resolution. Every ResBlock reads its input concatenated
        # with a skip (lean: the mirrored downsampling ResBlock's output, of the same width).
        self.up_levels, self.up_attention, self.upsamplers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        up_blocks = num_res_blocks + 1 if ddpm else num_res_blocks
        for level in reversed(range(levels)):
            width = level_channels[level]
            blocks = nn.ModuleList()
            for _ in range(up_blocks):
                blocks.append(res_block(current + skip_widths.pop(), width))
                current = width
            self.up_levels.append(blocks)
            self.up_attention.append(attention_blocks(sides[level], width, up_blocks))
            if level > 0:  # upsamplers[i] goes from up_levels[i] to up_levels[i + 1]
                if ddpm:
                    self.upsamplers.append(Upsample(current, current, 3 if resample == "conv" else 0))
                else:
                    self.upsamplers.append(Upsample(current, level_channels[level - 1], 3 if resample == "conv" else 1))
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
        ddpm = self.layout == "ddpm"
        h = self.conv_in(x)
        skips = [h] if ddpm else []  # what the upsampling path concatenates, consumed in reverse order
        for level, (blocks, attention) in enumerate(zip(self.down_levels, self.down_attention)):
            if level > 0 and not ddpm:
                h = self.downsamplers[level - 1](h)
            for block, attend in zip(blocks, attention):
                h = attend(block(h, time_embedding))
                skips.append(h)
            if ddpm and level < len(self.downsamplers):
                h = self.downsamplers[level](h)
                skips.append(h)

        if self.middle is not None:
            h = self.middle[0](h, time_embedding)
        if self.attention is not None:
            h = self.attention(h)
        if self.middle is not None:
            h = self.middle[1](h, time_embedding)

        for level, (blocks, attention) in enumerate(zip(self.up_levels, self.up_attention)):
            if level > 0:
                h = self.upsamplers[level - 1](h, size=skips[-1].shape[-2:])
            for block, attend in zip(blocks, attention):
                h = attend(block(torch.cat([h, skips.pop()], dim=1), time_embedding))
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
