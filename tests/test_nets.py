"""Tests of diffusion.nets: shapes, time conditioning, gradient flow and config validation."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from diffusion import nets
from diffusion.config import ModelConfig
from diffusion.errors import ConfigError
from diffusion.nets import MLP, SelfAttention, SinusoidalTimeEmbedding, UNet, build_network

DIGITS = (1, 8, 8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These nets are too small to gain from a second thread, and on a busy machine OpenMP threads
    waiting for each other make a batch-8 backward pass take seconds instead of milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomise_output_layer(net: torch.nn.Module) -> torch.nn.Module:
    """A copy whose zero-initialised output layer is random, so the output depends on everything."""
    net = copy.deepcopy(net)
    last = net.conv_out if isinstance(net, UNet) else net.output
    torch.nn.init.normal_(last.weight, std=0.1)
    torch.nn.init.normal_(last.bias, std=0.1)
    return net


@pytest.mark.parametrize("data_shape, channel_mult, channels, num_res_blocks", [
    (DIGITS, [1, 2], 32, 1),  # 8 -> 4
    (DIGITS, [1, 2, 2], 32, 1),  # 8 -> 4 -> 2
    (DIGITS, [1, 2], 16, 2),
    ((1, 28, 28), [1, 2, 2], 16, 1),  # 28 -> 14 -> 7
    ((3, 32, 32), [1, 2, 2], 16, 1),  # 32 -> 16 -> 8
    ((1, 7, 7), [1, 1, 1, 1], 8, 1),  # odd sizes: 7 -> 4 -> 2 -> 1 and back
])
def test_unet_output_shape(data_shape, channel_mult, channels, num_res_blocks):
    torch.manual_seed(0)
    cfg = ModelConfig(channels=channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks)
    net = _randomise_output_layer(build_network(cfg, data_shape))
    assert isinstance(net, UNet)
    x = torch.randn(3, *data_shape)
    out = net(x, torch.rand(3))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert out.abs().mean() > 0


def test_untrained_unet_outputs_zero():
    net = build_network(ModelConfig(), DIGITS)
    assert torch.count_nonzero(net(torch.randn(4, *DIGITS), torch.rand(4))) == 0


def test_mlp_output_shape_and_auto_arch():
    net = build_network(ModelConfig(hidden=32, depth=2), (2,))
    assert isinstance(net, MLP)
    assert len(net.hidden_layers) == 2 and net.hidden_layers[-1].out_features == 32
    out = _randomise_output_layer(net)(torch.randn(5, 2), torch.rand(5))
    assert out.shape == (5, 2) and out.abs().mean() > 0


@pytest.mark.parametrize("keywords_net, cfg, data_shape, num_classes", [
    (lambda: UNet(1), ModelConfig(), DIGITS, None),  # the constructor's defaults are ModelConfig's
    (lambda: MLP(2), ModelConfig(), (2,), None),
    (lambda: UNet(1, channels=16, channel_mult=(1, 2, 2), num_res_blocks=2, attention=False, groups=4, dropout=0.1,
                  out_channels=2, num_classes=10),
     ModelConfig(channels=16, channel_mult=[1, 2, 2], num_res_blocks=2, attention=False, groups=4, dropout=0.1,
                 variance="learned_range"), DIGITS, 10),
    (lambda: MLP(2, hidden=32, depth=2, num_classes=8), ModelConfig(hidden=32, depth=2), (2,), 8),
    (lambda: UNet(3, channels=16, channel_mult=(1, 2, 2), num_res_blocks=2, groups=4, layout="ddpm", resample="conv",
                  attention_resolutions=(8,), resolution=16),
     ModelConfig(channels=16, channel_mult=[1, 2, 2], num_res_blocks=2, groups=4, layout="ddpm", resample="conv",
                 attention_resolutions=[8]), (3, 16, 16), None),
])
def test_networks_built_from_keywords_equal_build_network(keywords_net, cfg, data_shape, num_classes):
    torch.manual_seed(0)
    net = keywords_net()
    torch.manual_seed(0)
    reference = build_network(cfg, data_shape, num_classes)
    assert type(net) is type(reference)
    state, reference_state = net.state_dict(), reference.state_dict()
    assert list(state) == list(reference_state)
    assert all(torch.equal(state[name], reference_state[name]) for name in state)

    x = torch.randn(3, *data_shape)
    labels = None if num_classes is None else torch.arange(3)
    out = _randomise_output_layer(net)(x, torch.rand(3), labels)
    outputs = 2 if cfg.variance == "learned_range" else 1
    assert out.shape == (3, data_shape[0] * outputs, *data_shape[1:]) and torch.isfinite(out).all()


def test_explicit_arch_and_wrong_pairing():
    assert isinstance(build_network(ModelConfig(arch="unet"), DIGITS), UNet)
    assert isinstance(build_network(ModelConfig(arch="mlp"), (2,)), MLP)
    for arch, shape in (("mlp", DIGITS), ("unet", (2,)), ("auto", (4, 4))):
        with pytest.raises(ConfigError) as info:
            build_network(ModelConfig(arch=arch), shape)
        assert info.value.key == "model.arch"


def test_sinusoidal_embedding_resolves_steps_of_one_thousandth():
    embed = SinusoidalTimeEmbedding(64)
    t = torch.linspace(0.0, 0.999, 101)
    step = embed(t + 1e-3) - embed(t)
    # every one of the 32 sin/cos pairs lies on the unit circle, so |embedding| = sqrt(32) ~ 5.7
    assert embed(t).norm(dim=-1).allclose(torch.tensor(32.0).sqrt())
    assert step.norm(dim=-1).min() > 1.0
    # the same embedding fed the raw t with Ho et al.'s per-step frequencies (1 .. 1e-4) would not
    naive = SinusoidalTimeEmbedding(64, max_frequency=1.0, min_frequency=1e-4)
    assert (naive(t + 1e-3) - naive(t)).norm(dim=-1).max() < 0.01


def test_network_time_embedding_separates_adjacent_steps():
    torch.manual_seed(0)
    net = build_network(ModelConfig(), DIGITS)
    t = torch.linspace(0.0, 0.999, 101)
    embedding, shifted = net.time_embedding(t), net.time_embedding(t + 1e-3)
    relative_change = (shifted - embedding).norm(dim=-1) / embedding.norm(dim=-1)
    assert relative_change.min() > 0.05


@pytest.mark.parametrize("data_shape", [DIGITS, (2,)])
def test_output_depends_on_t(data_shape):
    torch.manual_seed(0)
    net = _randomise_output_layer(build_network(ModelConfig(), data_shape))
    x = torch.randn(16, *data_shape)
    early, late = net(x, torch.full((16,), 0.1)), net(x, torch.full((16,), 0.9))
    assert (early - late).abs().mean() > 0.05 * early.abs().mean()
    # a scalar t is broadcast over the batch
    assert torch.allclose(net(x, torch.tensor(0.1)), early)


def _nonzero_grads(net: torch.nn.Module, data_shape) -> dict[str, bool]:
    net.zero_grad(set_to_none=True)
    x = torch.randn(8, *data_shape)
    (net(x, torch.rand(8)) - x).pow(2).mean().backward()
    return {name: p.grad is not None and p.grad.abs().sum().item() > 0 for name, p in net.named_parameters()}


@pytest.mark.parametrize("data_shape, cfg", [
    (DIGITS, ModelConfig(channel_mult=[1, 2], num_res_blocks=2)),
    (DIGITS, ModelConfig(channel_mult=[1, 2, 2], attention=False)),
    ((2,), ModelConfig(hidden=32)),
])
def test_every_parameter_gets_a_gradient(data_shape, cfg):
    torch.manual_seed(0)
    net = build_network(cfg, data_shape)
    assert all(_nonzero_grads(_randomise_output_layer(net), data_shape).values())

    # with the zero-initialised output layer only that layer learns at first ...
    first = _nonzero_grads(net, data_shape)
    output_layer = "conv_out" if isinstance(net, UNet) else "output"
    assert {name for name, nonzero in first.items() if nonzero} == {f"{output_layer}.weight", f"{output_layer}.bias"}
    # ... and after one optimizer step every parameter does
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert [name for name, nonzero in _nonzero_grads(net, data_shape).items() if not nonzero] == []


@pytest.mark.parametrize("attention", [True, False])
def test_attention_block_present_iff_configured(attention):
    for channel_mult in ([1, 2], [1, 2, 2]):
        net = build_network(ModelConfig(attention=attention, channel_mult=channel_mult), DIGITS)
        blocks = [m for m in net.modules() if isinstance(m, SelfAttention)]
        assert len(blocks) == int(attention)
        if attention:  # it runs at the lowest resolution, on the widest features
            assert blocks[0].norm.num_channels == 32 * channel_mult[-1]


def test_multi_head_attention_keeps_shape_and_is_residual():
    torch.manual_seed(0)
    attention = SelfAttention(16, groups=4, num_heads=4)
    x = torch.randn(2, 16, 3, 5)
    assert attention(x).shape == x.shape
    torch.nn.init.zeros_(attention.proj_out.weight)
    torch.nn.init.zeros_(attention.proj_out.bias)
    assert torch.equal(attention(x), x)


def test_default_config_is_valid():
    nets.validate(ModelConfig())
    nets.validate(ModelConfig(arch="mlp", channels=12, groups=4, channel_mult=[1, 3], dropout=0.5))


@pytest.mark.parametrize("key, value", [
    ("arch", "resnet"),
    ("channels", 0),
    ("channel_mult", []),
    ("channel_mult", [1, 0]),
    ("num_res_blocks", 0),
    ("groups", 0),
    ("groups", 5),  # does not divide 32
    ("dropout", 1.0),
    ("dropout", -0.1),
    ("hidden", 0),
    ("depth", 0),
    ("layout", "adm"),
    ("resample", "stride"),
    ("attention_resolutions", [16, 0]),
    ("attention_resolutions", 16),
])
def test_validate_names_the_bad_key(key, value):
    with pytest.raises(ConfigError) as info:
        nets.validate(replace(ModelConfig(), **{key: value}))
    assert info.value.key == f"model.{key}"
    assert repr(value) in str(info.value)


def test_groups_error_lists_the_channel_counts():
    with pytest.raises(ConfigError) as info:
        nets.validate(ModelConfig(channels=12, groups=8, channel_mult=[1, 2]))
    assert info.value.key == "model.groups" and "[12, 24]" in str(info.value)


# --------------------------------------------------------------------------------------------
# Ho et al. (2020)'s layout and the options of the papers' networks
# --------------------------------------------------------------------------------------------

HO_CIFAR10 = ModelConfig(arch="unet", layout="ddpm", channels=128, channel_mult=[1, 2, 2, 2], num_res_blocks=2,
                         attention=True, attention_resolutions=[16], resample="conv", groups=32, dropout=0.1)


def _ho_parameter_count(ch: int, mult: list[int], blocks: int, attention_sides: set[int], side: int, c_in: int) -> int:
    """The parameter count of Ho et al.'s U-Net, added up layer by layer from their Appendix B and code (a second
    way of computing it: by hand, not from the modules)."""
    def conv(a, b, k):
        return a * b * k * k + b

    def linear(a, b):
        return a * b + b

    temb = 4 * ch

    def res(a, b):
        return 2 * a + conv(a, b, 3) + linear(temb, b) + 2 * b + conv(b, b, 3) + (conv(a, b, 1) if a != b else 0)

    def attn(c):
        return 2 * c + 4 * conv(c, c, 1)  # GroupNorm; q, k, v and the output projection as 1x1 convs

    total = linear(ch, temb) + linear(temb, temb) + conv(c_in, ch, 3)
    skips, current, sides = [ch], ch, [side // 2 ** level for level in range(len(mult))]
    for level, m in enumerate(mult):
        for _ in range(blocks):
            total += res(current, ch * m) + (attn(ch * m) if sides[level] in attention_sides else 0)
            current = ch * m
            skips.append(current)
        if level < len(mult) - 1:
            total += conv(current, current, 3)
            skips.append(current)
    total += 2 * res(current, current) + attn(current)
    for level in reversed(range(len(mult))):
        for _ in range(blocks + 1):
            total += res(current + skips.pop(), ch * mult[level]) + (attn(ch * mult[level]) if sides[level] in attention_sides else 0)
            current = ch * mult[level]
        if level > 0:
            total += conv(current, current, 3)
    return total + 2 * current + conv(current, c_in, 3)


def test_ho_et_al_cifar10_network_has_the_papers_parameter_count():
    """Ho et al. (2020), Sec. 4: "Our CIFAR10 model has 35.7 million parameters"."""
    with torch.device("meta"):
        net = build_network(HO_CIFAR10, (3, 32, 32))
    count = sum(p.numel() for p in net.parameters())
    assert abs(count - 35.7e6) / 35.7e6 < 0.01
    assert count == _ho_parameter_count(128, [1, 2, 2, 2], 2, {16}, 32, 3) == 35_746_307
    # 2 attention blocks down and 3 up at 16x16, and one in the middle block at 4x4
    attention = [m for m in net.modules() if isinstance(m, SelfAttention)]
    assert sorted(block.norm.num_channels for block in attention) == [256] * 6
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.1 for m in net.modules()) == 2 * 4 + 2 + 3 * 4


@pytest.mark.parametrize("data_shape, cfg", [
    ((3, 16, 16), ModelConfig(channels=8, channel_mult=[1, 2, 2], num_res_blocks=2, groups=4, layout="ddpm",
                              resample="conv", attention_resolutions=[8])),
    ((1, 28, 28), ModelConfig(channels=8, channel_mult=[1, 2, 2, 2], groups=4, layout="ddpm",
                              attention_resolutions=[14, 4])),  # 28 -> 14 -> 7 -> 4 and back
    ((1, 7, 7), ModelConfig(channels=8, channel_mult=[1, 1, 2], groups=4, layout="ddpm", resample="conv")),
    (DIGITS, ModelConfig(channels=8, channel_mult=[1, 2], groups=4, resample="conv", attention_resolutions=[8])),
])
def test_papers_layouts_keep_shapes_and_train_every_parameter(data_shape, cfg):
    torch.manual_seed(0)
    net = build_network(cfg, data_shape)
    assert torch.count_nonzero(net(torch.randn(2, *data_shape), torch.rand(2))) == 0  # zero-initialised output
    randomised = _randomise_output_layer(net)
    out = randomised(torch.randn(3, *data_shape), torch.rand(3))
    assert out.shape == (3, *data_shape) and out.abs().mean() > 0
    assert all(_nonzero_grads(randomised, data_shape).values())


def test_attention_follows_every_block_at_the_chosen_sides():
    cfg = ModelConfig(channels=8, channel_mult=[1, 2, 2], num_res_blocks=2, groups=4, attention=False,
                      attention_resolutions=[8])
    lean = build_network(cfg, (1, 16, 16))  # sides 16, 8, 4: level 1 has 2 blocks down and 2 up
    assert [m.norm.num_channels for m in lean.modules() if isinstance(m, SelfAttention)] == [16] * 4
    ddpm = build_network(replace(cfg, layout="ddpm"), (1, 16, 16))  # 2 down, 3 up
    assert [m.norm.num_channels for m in ddpm.modules() if isinstance(m, SelfAttention)] == [16] * 5


def test_attention_resolutions_must_be_sides_of_the_network():
    with pytest.raises(ConfigError) as info:
        build_network(ModelConfig(channel_mult=[1, 2], attention_resolutions=[16]), (1, 28, 28))
    assert info.value.key == "model.attention_resolutions"
    assert "[28, 14]" in str(info.value) and "[16]" in str(info.value)


def test_convolutional_resampling_halves_and_restores_odd_sides():
    down = nets.Downsample(4, with_conv=True)
    assert down(torch.randn(1, 4, 7, 7)).shape == (1, 4, 4, 4)
    assert nets.Downsample(4, with_conv=False)(torch.randn(1, 4, 7, 7)).shape == (1, 4, 4, 4)
    up = nets.Upsample(4, 6, kernel_size=3)
    assert up(torch.randn(1, 4, 4, 4), size=(7, 7)).shape == (1, 6, 7, 7)
    # kernel 3 convolves after upsampling: a 4x4 map of one non-zero pixel spreads into a 3x3 patch of each copy
    torch.nn.init.ones_(up.conv.weight)
    torch.nn.init.zeros_(up.conv.bias)
    x = torch.zeros(1, 4, 4, 4)
    x[..., 1, 1] = 1.0
    assert torch.count_nonzero(up(x, size=(8, 8))[0, 0]) == 16  # the 2x2 copy dilated by the 3x3 kernel


def test_model_size_counts_parameters_and_training_flops():
    from diffusion.modelsize import human, model_size

    size = model_size(HO_CIFAR10, (3, 32, 32))
    assert size.parameters == 35_746_307 and human(size.parameters) == "35.7M"
    # a second way: the FLOPs of the convolutions and linear layers of one small network added up by hand
    cfg = ModelConfig(channels=4, channel_mult=[1], groups=2, attention=False)
    small = model_size(cfg, (1, 4, 4))
    pixels = 16
    convs = [(1, 4, 9), (4, 4, 9), (4, 4, 9), (8, 4, 9), (4, 4, 9), (8, 4, 1), (4, 1, 9)]  # (in, out, taps)
    conv_flops = sum(2 * a * b * k * pixels for a, b, k in convs)
    linear_flops = 2 * (64 * 16 + 16 * 16 + 16 * 4 + 16 * 4)  # time MLP and each ResBlock's projection
    assert small.forward_flops == conv_flops + linear_flops
    # backward costs twice the forward (the gradients of inputs and of weights), less the input gradients of the two
    # layers that read inputs that need none: conv_in (of x) and the time MLP's first layer (of the sinusoids)
    assert small.train_flops == 3 * small.forward_flops - 2 * 1 * 4 * 9 * pixels - 2 * 64 * 16
    assert size.step_flops(128) == 128 * size.train_flops
