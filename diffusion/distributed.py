"""Data-parallel training: one batch split across the processes of a ``torch.distributed`` group (DDP).

Every process draws the same global batch (the same indices, times and noise: the trainer's generator is seeded
alike everywhere), and its network evaluates only its own shard of the rows. The outputs are gathered, so that
every process computes the loss of the whole batch exactly as one process would, and the gradient flows back into
its own shard only. DDP then averages the network's gradients across processes; parameters outside the network
(a learned noise schedule) are averaged by :func:`average_gradients`. The result is the single-process step on
the global batch up to the order of floating-point sums: the same loss curve and weights, within rounding.

The gradient of the loss with respect to a shard's outputs is the same on every process (each holds the whole
loss), so the gathered outputs need no collective in the backward pass: each process keeps its shard of the
incoming gradient, times the number of processes, which DDP's average divides out again (exactly, for a power of
two). Dropout draws from each process's own global random state (``Trainer.data_parallel`` seeds it per rank),
so its masks are independent across shards but not those one process would draw.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def shard_bounds(batch: int, rank: int, world: int) -> tuple[int, int]:
    """The rows [lo, hi) of a batch of ``batch`` that process ``rank`` of ``world`` evaluates (equal shards)."""
    if batch % world:
        raise ValueError(f"a batch of {batch} does not split into {world} equal shards")
    size = batch // world
    return rank * size, (rank + 1) * size


class _GatherShards(torch.autograd.Function):
    """forward: every process's shard, concatenated in rank order; backward: this process's rows of the gradient,
    times the number of processes (the gradient is the same on every process: see the module's docstring)."""

    @staticmethod
    def forward(ctx, shard: Tensor, lo: int, hi: int, world: int) -> Tensor:
        ctx.lo, ctx.hi, ctx.world = lo, hi, world
        pieces = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(pieces, shard.contiguous())
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad[ctx.lo:ctx.hi] * ctx.world, None, None, None


class ShardedNetwork(nn.Module):
    """``network(x, t, labels)`` on the whole batch, computed by ``module`` (the DDP-wrapped network) on this
    process's rows only, every process's rows gathered. Tensor arguments whose first dimension is the batch's are
    split; others (a 0-d time) pass whole."""

    def __init__(self, module: nn.Module, rank: int, world: int):
        super().__init__()
        self.module, self.rank, self.world = module, rank, world

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        batch = x.shape[0]
        lo, hi = shard_bounds(batch, self.rank, self.world)

        def part(value):
            return value[lo:hi] if isinstance(value, Tensor) and value.dim() and value.shape[0] == batch else value

        out = self.module(x[lo:hi], *map(part, args), **{k: part(v) for k, v in kwargs.items()})
        return _GatherShards.apply(out, lo, hi, self.world)


def average_gradients(parameters: list[nn.Parameter], world: int) -> None:
    """Average the gradients of ``parameters`` (those DDP does not hold) across the process group."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)  # SUM: gloo has no AVG
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def wrap(network: nn.Module, device: torch.device) -> nn.Module:
    """``network`` under DistributedDataParallel: its gradients averaged across the group after every backward
    (bucketed all-reduce, overlapping the backward pass); on CUDA, on its device. Buffers (constants of the
    network) are rank 0's from the start and not synchronised at every forward pass."""
    ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(network, device_ids=ids, forward_sync_buffers=False)
