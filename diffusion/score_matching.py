"""Score matching without noise: implicit (Hyvarinen 2005) and sliced (Song et al. 2019) objectives,
and plain Langevin dynamics to sample from a learned score.

A *score function* here is any callable ``score_fn(x [B, D]) -> [B, D]`` that estimates
grad_x log p(x) example by example, e.g. a network at a fixed time
(``lambda x: net(x, torch.zeros(x.shape[0]))`` or :class:`FixedTimeScore`). The examples of a batch
must not interact (no batch norm in training mode): the Jacobian code below differentiates the
summed batch and reads per-example derivatives off the result.

Both objectives equal the Fisher divergence 1/2 E_p ||s(x) - grad log p(x)||^2 up to a constant
that does not depend on s, so they can be minimised from samples of p alone. They are meant for
low-dimensional data: the exact objective costs D backward passes per batch, the sliced one
one backward pass per projection. Unlike :mod:`diffusion.losses`, which averages over data
dimensions, these losses are per-example *sums* over dimensions, as in the papers.

Every objective has the signature ``objective(score_fn, x [B, D], *, generator=None) -> [B]``
and is registered in :data:`OBJECTIVES` (config key ``loss.objective``). Denoising score
matching is not here; it lives with the diffusion losses.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Protocol, Union

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .fit import fit
from .registry import Registry

ScoreFn = Callable[[Tensor], Tensor]


class Objective(Protocol):
    def __call__(self, score_fn: ScoreFn, x: Tensor, *, generator: Optional[torch.Generator] = None) -> Tensor: ...


OBJECTIVES: Registry[Objective] = Registry("loss.objective")


# --------------------------------------------------------------------------------------------
# Projection distributions for sliced score matching
# --------------------------------------------------------------------------------------------

Projection = Callable[[tuple[int, ...], Optional[torch.Generator], torch.device, torch.dtype], Tensor]
PROJECTIONS: Registry[Projection] = Registry("loss.projection")


@PROJECTIONS.register("gaussian")
def gaussian_projections(shape, generator, device, dtype) -> Tensor:
    """v ~ N(0, I): E[v v^T] = I."""
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


@PROJECTIONS.register("rademacher")
def rademacher_projections(shape, generator, device, dtype) -> Tensor:
    """v uniform on {-1, +1}^D: E[v v^T] = I, and the smallest variance of v^T J v among
    distributions with that second moment (Hutchinson 1990)."""
    return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype) * 2 - 1


# --------------------------------------------------------------------------------------------
# Jacobian trace and the two objectives
# --------------------------------------------------------------------------------------------


def _leaf_input(x: Tensor) -> Tensor:
    """A copy of x that autograd differentiates with respect to (the data itself carries no graph)."""
    return x.detach().requires_grad_(True)


def _grad(output: Tensor, x: Tensor, create_graph: bool) -> Tensor:
    """grad_x of the scalar ``output``; zeros where output does not depend on x. Keeps the graph for
    further passes."""
    if not output.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(output, x, retain_graph=True, create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def _score_and_trace(score_fn: ScoreFn, x: Tensor, create_graph: bool) -> tuple[Tensor, Tensor]:
    """(s(x) [B, D], tr(grad_x s(x)) [B]) with the exact trace from D backward passes: pass i
    differentiates sum_b s_i(x_b) and keeps d s_i / d x_i of every example."""
    x = _leaf_input(x)
    score = score_fn(x)
    if score.shape != x.shape:
        raise ValueError(f"score_fn must map [B, D] to [B, D]; got {tuple(x.shape)} -> {tuple(score.shape)}")
    trace = torch.zeros(x.shape[0], device=x.device, dtype=score.dtype)
    for i in range(x.shape[1]):
        trace = trace + _grad(score[:, i].sum(), x, create_graph)[:, i]
    return score, trace


def jacobian_trace(score_fn: ScoreFn, x: Tensor, create_graph: bool = True) -> Tensor:
    """The exact trace of the Jacobian, tr(grad_x s(x)) = sum_i d s_i / d x_i, per example: ``[B]``.

    x ``[B, D]``. Costs one forward and D backward passes. With ``create_graph`` the result can be
    differentiated again (with respect to the parameters of score_fn, for training).
    """
    with torch.enable_grad():
        return _score_and_trace(score_fn, x, create_graph)[1]


@OBJECTIVES.register("implicit")
def implicit_score_matching_loss(
    score_fn: ScoreFn, x: Tensor, *, generator: Optional[torch.Generator] = None, create_graph: bool = True
) -> Tensor:
    """Implicit score matching (Hyvarinen 2005, Theorem 1), per example:

        tr(grad_x s(x)) + 1/2 ||s(x)||^2,

    whose expectation under the data distribution p equals the Fisher divergence
    1/2 E_p ||s(x) - grad log p(x)||^2 up to a constant independent of s (integration by parts, in the
    proof of Theorem 1; it needs p s -> 0 at infinity).

    x ``[B, D]`` -> ``[B]``. The trace is exact (D backward passes, :func:`jacobian_trace`), computed
    with ``create_graph=True`` so the loss can be trained by backpropagation. ``generator`` is
    unused (the objective is deterministic); it is accepted so every objective has one signature.
    Works under ``torch.no_grad()`` too (gradients with respect to x are switched on inside).
    """
    with torch.enable_grad():
        score, trace = _score_and_trace(score_fn, x, create_graph)
        return trace + 0.5 * score.pow(2).sum(dim=1)


@OBJECTIVES.register("sliced")
def sliced_score_matching_loss(
    score_fn: ScoreFn,
    x: Tensor,
    n_projections: int = 1,
    generator: Optional[torch.Generator] = None,
    distribution: str = "gaussian",
    variance_reduction: bool = True,
    create_graph: bool = True,
) -> Tensor:
    """Sliced score matching (Song, Garg, Shi & Ermon 2019, Sec. 3), per example:

        SSM:    mean over projections v of  v^T (grad_x s(x)) v + 1/2 (v^T s(x))^2
        SSM-VR: mean over projections v of  v^T (grad_x s(x)) v + 1/2 ||s(x)||^2

    with v drawn independently per example and projection from ``distribution`` ("gaussian" or
    "rademacher"; both have E[v v^T] = I, see :data:`PROJECTIONS`). Because E[v^T J v] = tr(J)
    (Hutchinson's estimator) and E[(v^T s)^2] = ||s||^2, both forms are unbiased for the implicit loss
    of :func:`implicit_score_matching_loss` given x; SSM-VR (``variance_reduction=True``, the
    default) takes the second expectation in closed form and so has lower variance.

    x ``[B, D]`` -> ``[B]``. The score network is evaluated once; each projection costs one backward
    pass, which gives the vector-Jacobian product v^T grad_x s(x) = grad_x (v^T s(x)) for all examples
    at once. ``create_graph=True`` keeps the result trainable.
    """
    if not (isinstance(n_projections, int) and n_projections >= 1):
        raise ConfigError("loss.n_projections", n_projections, "an integer >= 1")
    draw = PROJECTIONS.get(distribution)
    with torch.enable_grad():
        x = _leaf_input(x)
        score = score_fn(x)  # [B, D]
        if score.shape != x.shape:
            raise ValueError(f"score_fn must map [B, D] to [B, D]; got {tuple(x.shape)} -> {tuple(score.shape)}")
        projections = draw((n_projections, *x.shape), generator, x.device, score.dtype)  # [M, B, D]
        total = torch.zeros(x.shape[0], device=x.device, dtype=score.dtype)
        for v in projections:
            projected_score = (v * score).sum(dim=1)  # v^T s(x) [B]
            vjp = _grad(projected_score.sum(), x, create_graph)  # v^T grad_x s(x) [B, D]
            total = total + (vjp * v).sum(dim=1)
            if not variance_reduction:
                total = total + 0.5 * projected_score.pow(2)
        loss = total / n_projections
        if variance_reduction:
            loss = loss + 0.5 * score.pow(2).sum(dim=1)
        return loss


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def langevin(
    score_fn: ScoreFn,
    x_init: Tensor,
    n_steps: int,
    step_size: float,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callable[[int, Tensor], None]] = None,
) -> tuple[Tensor, int]:
    """Unadjusted Langevin dynamics (Welling & Teh 2011; Song & Ermon 2019, eq. 2):

        x <- x + step_size / 2 * s(x) + sqrt(step_size) * z,   z ~ N(0, I),

    ``n_steps`` times from x_init ``[B, D]`` (each row is an independent chain). Returns
    (x ``[B, D]``, nfe = n_steps score evaluations per chain). Without a Metropolis correction the
    chain's stationary law is only close to p: for p = N(mu, C) the mean is exact but each
    variance lam of C becomes lam / (1 - step_size / (4 lam)). The callback, if given, is called as
    ``callback(step, x)`` after every step.
    """
    if not (isinstance(n_steps, int) and n_steps >= 0):
        raise ValueError(f"n_steps must be an integer >= 0, got {n_steps!r}")
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size!r}")
    x = x_init.clone()
    noise_scale = math.sqrt(step_size)
    for step in range(n_steps):
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + 0.5 * step_size * score_fn(x) + noise_scale * noise
        if callback:
            callback(step, x)
    return x, n_steps


# --------------------------------------------------------------------------------------------
# Training helpers
# --------------------------------------------------------------------------------------------


class FixedTimeScore(nn.Module):
    """``x [B, D] -> net(x, t) [B, D]`` at one fixed time t in [0, 1]: turns a time-conditioned
    network (:class:`diffusion.nets.MLP`) into a score function for noise-free score matching."""

    def __init__(self, net: nn.Module, t: float = 0.0):
        super().__init__()
        self.net = net
        self.t = float(t)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x, torch.full((x.shape[0],), self.t, device=x.device, dtype=x.dtype))


def fit_score(
    score_module: nn.Module,
    data: Tensor,
    objective: Union[str, Objective] = "implicit",
    steps: int = 1000,
    lr: float = 1e-2,
    batch_size: Optional[int] = 256,
    generator: Optional[torch.Generator] = None,
    **objective_options,
) -> list[float]:
    """Minimise ``objective`` (a name in :data:`OBJECTIVES` or a callable) over the parameters of
    ``score_module`` (``x [B, D] -> [B, D]``) on data ``[N, D]``.

    Adam, with the learning rate annealed from ``lr`` to 0 by a cosine (Loshchilov & Hutter 2017),
    so stochastic objectives (minibatches, sliced projections) settle at the minimiser. Each step
    uses ``batch_size`` examples drawn with replacement (all N, every step, when batch_size is None
    or >= N). ``objective_options`` go to the objective (e.g. ``n_projections``). Returns the
    per-step mean losses. The module's training or evaluation mode is left as it is (``fit.fit`` on its
    parameters).
    """
    loss_fn = OBJECTIVES.get(objective) if isinstance(objective, str) else objective
    n = data.shape[0]
    full_batch = batch_size is None or batch_size >= n

    def loss() -> Tensor:
        batch = data
        if not full_batch:
            batch = data[torch.randint(0, n, (batch_size,), generator=generator, device=data.device)]
        return loss_fn(score_module, batch, generator=generator, **objective_options).mean()

    def cosine(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))

    return fit(score_module.parameters(), loss, steps, lr, schedule=cosine)
