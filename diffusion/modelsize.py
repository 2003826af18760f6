"""What a model costs before it is trained: its parameter count and the FLOPs of one training step.

Both come from the network itself, built on PyTorch's ``meta`` device (shapes only: no memory, no arithmetic), so
the paper-sized networks of ``sweeps/cifar10_*.yaml`` are sized in well under a second on any machine. FLOPs are
counted by ``torch.utils.flop_counter.FlopCounterMode``: the multiply-adds of matrix products, convolutions and
attention, two FLOPs each, forward and backward (the usual "model FLOPs"; normalisations and activations are not
counted). One training step is one forward and one backward pass of ``batch_size`` examples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import ModelConfig
from .nets import build_network


@dataclass(frozen=True)
class ModelSize:
    parameters: int  # trainable parameters of the network
    forward_flops: int  # FLOPs of one forward pass of one example
    train_flops: int  # FLOPs of one forward and one backward pass of one example

    def step_flops(self, batch_size: int) -> int:
        """FLOPs of a training step of ``batch_size`` examples."""
        return self.train_flops * batch_size


def model_size(cfg: ModelConfig, data_shape: Sequence[int], num_classes: Optional[int] = None) -> ModelSize:
    """The size of the network ``cfg`` builds for examples of shape ``data_shape`` (ConfigError if it cannot)."""
    with torch.device("meta"):
        network = build_network(cfg, data_shape, num_classes)
        x = torch.zeros((1, *data_shape))
        t = torch.full((1,), 0.5)
    parameters = sum(p.numel() for p in network.parameters() if p.requires_grad)
    with FlopCounterMode(display=False) as counter:
        out = network(x, t)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        network(x, t).sum().backward()
    del out
    return ModelSize(parameters, forward, counter.get_total_flops())


def human(count: float, unit: str = "") -> str:
    """``35746307 -> '35.7M'``, ``6.07e12 -> '6.07T'``: three significant digits and an SI prefix."""
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= scale:
            return f"{count / scale:.3g}{prefix}{unit}"
    return f"{count:.3g}{unit}"
