"""The one training loop of the auxiliary networks: the noise-conditional classifier of classifier guidance
(``guidance.train_noisy_classifier``), the VAE of latent diffusion (``latent.fit_vae``), the classifier whose
features FID reads (``metrics.classifier.train_classifier``) and noise-free score matching
(``score_matching.fit_score``). The diffusion model's own loop, with its EMA, warm-up, clipping and
checkpoints, is ``training.Trainer``.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn

Schedule = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def fit(target: Union[nn.Module, Iterable[nn.Parameter]], loss: Callable[[], Tensor], steps: int, lr: float, *,
        schedule: Optional[Schedule] = None, on_step: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """Minimise ``loss()`` (a scalar, typically on a fresh batch each call) by Adam at learning rate ``lr`` for
    ``steps`` steps; returns the loss of every step. ``target``: a module, trained in training mode and left in
    evaluation mode, or its parameters (modes left alone). ``schedule(optimizer)``: a learning-rate scheduler,
    stepped after every optimizer step. ``on_step(step, loss)`` is called after each step, counted from 1.

    One step: draw the loss, ``zero_grad(set_to_none=True)``, backward, ``optimizer.step()``, then the schedule."""
    module = target if isinstance(target, nn.Module) else None
    optimizer = torch.optim.Adam(module.parameters() if module is not None else target, lr=lr)
    scheduler = schedule(optimizer) if schedule is not None else None
    if module is not None:
        module.train()
    losses = []
    for step in range(1, steps + 1):
        value = loss()
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(value.item())
        if on_step is not None:
            on_step(step, losses[-1])
    if module is not None:
        module.eval()
    return losses
