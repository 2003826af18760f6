"""Held-out bits/dim of a trained model: :func:`heldout_likelihood`, what a trial records as ``bpd_ode`` (the
probability-flow ODE likelihood of ``diffusion.likelihood``, on dequantized data where the data are discrete) and
``bpd_elbo`` (the discrete variational bound of ``diffusion.elbo``), with the tags that say how each was measured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .denoiser import Denoiser
from .elbo import elbo_terms
from .likelihood import bits_per_dim, default_t_start, dequantize, ode_log_likelihood, to_levels


@dataclass
class HeldOutLikelihood:
    """What :func:`heldout_likelihood` measured: ``metrics`` (name -> float), ``tags`` (name -> str, the
    method written next to the number) and ``elbo_curve`` (the bound's terms per step, or None)."""

    metrics: dict
    tags: dict
    elbo_curve: Optional[dict] = None


def _ode_metrics(denoiser: Denoiser, x: Tensor, levels: Optional[int], generator: torch.Generator,
                 batch_size: int, *, rtol: float, atol: float, max_nfe: int, divergence: str, probes: int,
                 distribution: str, dequant_draws: int) -> dict:
    """bpd_ode, bpd_ode_nfe and bpd_ode_stderr of :func:`heldout_likelihood`: each example's bits/dim
    averaged over ``dequant_draws`` dequantizations, one ODE solve per batch and draw."""
    per_example = torch.zeros(len(x), dtype=torch.float64)
    nfes = []
    for _ in range(dequant_draws):
        start = 0
        for batch in x.split(batch_size):
            y = dequantize(to_levels(batch, levels), generator, levels) if levels else batch
            result = ode_log_likelihood(denoiser, y.to(batch.device), rtol=rtol, atol=atol, divergence=divergence,
                                        probes=probes, distribution=distribution, generator=generator,
                                        max_nfe=max_nfe)
            offset = math.log2(levels / 2) if levels else 0.0
            per_example[start:start + len(batch)] += result.bits_per_dim(offset).cpu() / dequant_draws
            nfes.append(result.nfe)
            start += len(batch)
    return {"bpd_ode": per_example.mean().item(), "bpd_ode_nfe": float(np.mean(nfes)),
            "bpd_ode_stderr": (per_example.std() / math.sqrt(len(x))).item() if len(x) > 1 else float("nan")}


def _elbo_metrics(denoiser: Denoiser, x: Tensor, levels: Optional[int], variance: str,
                  generator: torch.Generator, batch_size: int) -> tuple[dict, dict, dict]:
    """(metrics bpd_elbo and bpd_elbo_stderr, the tag bpd_elbo.method, the per-step curve) of
    :func:`heldout_likelihood`. The bound is one sum over the T steps (Ho et al. 2020, eq. 5), all its
    terms computed together by ``elbo_terms`` for each batch."""
    process, dims = denoiser.process, x[0].numel()
    totals, columns = [], []
    with torch.no_grad():
        for batch in x.split(batch_size):
            terms = elbo_terms(denoiser, batch, levels, variance, generator=generator)
            totals.append(terms["total"].cpu())
            columns.append(torch.cat([terms["decoder"][:, None], terms["transitions"], terms["prior"][:, None]], 1).cpu())
    total = bits_per_dim(torch.cat(totals), dims)
    per_term = bits_per_dim(torch.cat(columns).mean(0), dims)
    metrics = {"bpd_elbo": total.mean().item(),
               "bpd_elbo_stderr": (total.std() / math.sqrt(len(total))).item() if len(total) > 1 else float("nan")}
    method = (f"discrete bound (Ho et al. 2020, eq. 5): prior + {process.T - 1} transition KLs + "
              + (f"decoder discretized on {levels} levels" if levels else "Gaussian decoder density")
              + f", reverse variance {variance}, one eps draw per term")
    curve = {"t": [i / process.T for i in range(1, process.T + 1)] + ["prior"],
             "bits_per_dim": per_term.tolist(), "terms": ["L_0"] + [f"L_{i - 1}" for i in range(2, process.T + 1)] + ["L_T"]}
    return metrics, {"bpd_elbo.method": method}, curve


def heldout_likelihood(denoiser: Denoiser, x: Tensor, levels: Optional[int], generator: torch.Generator, *,
                       variance: str = "beta_tilde", batch_size: int = 256, ode_denoiser: Optional[Denoiser] = None,
                       rtol: float = 1e-5, atol: float = 1e-5, max_nfe: int = 5000, divergence: str = "hutchinson",
                       probes: int = 1, distribution: str = "rademacher", dequant_draws: int = 1) -> HeldOutLikelihood:
    """Bits/dim of held-out data x [N, ...] under a trained model (the defaults are the eval section's:
    ``rtol``, ``atol``, ``max_nfe`` are ``eval.ode_rtol``, ``ode_atol``, ``ode_max_nfe``; ``probes`` and
    ``distribution`` are ``eval.hutchinson_probes`` and ``eval.probe``):

    - ``bpd_ode``: the probability-flow ODE NLL (:func:`diffusion.likelihood.ode_log_likelihood` with ``rtol``,
      ``atol``, ``max_nfe`` solver evaluations per solve (past them the solve gives up and the tag
      ``bpd_ode.error`` records why), ``divergence`` ``hutchinson`` with ``probes`` vectors of ``distribution``
      per example, or ``exact``). Data with ``levels`` discrete values per dimension are first mapped back to
      their levels and dequantized ``dequant_draws`` times (:func:`diffusion.likelihood.dequantize`, bins of
      width 2 / levels tiling [-1, 1)), and the offset log2(levels / 2) of ``dequantized_bits_per_dim`` puts the
      number on the scale of the discrete data (8-bit images: + 7); continuous data (2-D sets, ``levels`` None)
      get the density's bits/dim, no offset. ``bpd_ode_stderr`` is the standard error over examples of their
      mean over draws; ``bpd_ode_nfe`` the mean solver NFE per solve. ``ode_denoiser`` (default ``denoiser``) is
      the model the ODE runs on: a discrete model through its continuous limit (``factory.continuous_limit``),
      whose smooth path costs far fewer solver steps.
    - ``bpd_elbo`` (integer process.T only): the discrete variational bound of Ho et al. 2020, eq. 5
      (``diffusion.elbo.elbo_terms``: prior, every transition KL, the decoder discretized on ``levels``
      values, or its density for continuous data, with the reverse ``variance``), in bits/dim; ``elbo_curve``
      holds each term's mean in bits/dim per step t = i / T (L_0 the decoder at i = 1, L_{i-1} for i >= 2, and L_T).

    Both are computed ``batch_size`` examples at a time.
    """
    if dequant_draws < 1:
        raise ValueError(f"dequant_draws must be an integer >= 1, got {dequant_draws}")
    ode_model = ode_denoiser or denoiser
    metrics, tags, curve = {}, {}, None
    try:  # the ODE part draws from ``generator`` first, then the ELBO part
        metrics = _ode_metrics(ode_model, x, levels, generator, batch_size, rtol=rtol, atol=atol, max_nfe=max_nfe,
                               divergence=divergence, probes=probes, distribution=distribution,
                               dequant_draws=dequant_draws)
    except RuntimeError as error:  # an evaluation, not the trial: the solver's failure is recorded, not raised
        tags["bpd_ode.error"] = str(error)[:500]
    tags.update({
        "bpd_ode.method": "probability-flow ODE, scipy RK45, from t_min to 1, prior N(0, sigma(1)^2 I)",
        "bpd_ode.rtol": str(rtol), "bpd_ode.atol": str(atol),
        "bpd_ode.max_nfe": str(max_nfe),
        "bpd_ode.divergence": divergence if divergence == "exact"
        else f"hutchinson, {probes} {distribution} probe(s) per example, fixed per solve",
        "bpd_ode.t_start": str(default_t_start(ode_model.process)),
        "bpd.dequantization": (f"uniform, (k + u) / {levels} on [-1, 1), {dequant_draws} draw(s); "
                               f"offset log2({levels}/2) = {math.log2(levels / 2):.4f} bits") if levels
        else "none (continuous data: bits/dim of the density)",
        "bpd.n": str(len(x)),
    })
    if denoiser.process.T is not None:
        elbo_metrics, elbo_tags, curve = _elbo_metrics(denoiser, x, levels, variance, generator, batch_size)
        metrics.update(elbo_metrics)
        tags.update(elbo_tags)
    return HeldOutLikelihood(metrics, tags, curve)
