"""The report's plots, chosen by what a sweep varies, each drawn on a bare matplotlib ``Figure`` (the Agg canvas:
pyplot's backend, e.g. a notebook's, is left alone) and returned as PNG bytes."""
from __future__ import annotations

import io
from typing import Optional

from .collect import SweepResults
from .compare import VariantSummary, lower_is_better, ranked_metrics, variant_label



def make_plots(results: SweepResults, variants: list[VariantSummary]) -> dict[str, bytes]:
    """The plots this sweep calls for: every ranking metric per variant with its interval and seeds; FID against
    NFE per sampler when ``sample.steps`` varies; the training-loss curves overlaid; bits/dim per loss weighting
    when ``loss.weighting`` varies."""
    plots = {}
    metrics = [m for m in ranked_metrics({m for v in variants for m in v.metrics})]
    if variants and metrics:
        plots["metrics.png"] = _metrics_plot(variants, metrics)
    if "sample.steps" in results.varying:
        plot = _nfe_plot(results)
        if plot:
            plots["fid_vs_nfe.png"] = plot
    if any(results.curves.values()):
        plots["train_loss.png"] = _loss_plot(results)
    if "loss.weighting" in results.varying:
        plot = _weighting_plot(results)
        if plot:
            plots["bpd_by_weighting.png"] = plot
    return plots


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _metrics_plot(variants: list[VariantSummary], metrics: list[str]) -> bytes:
    figure = _figure(min(4 * len(metrics), 16), 3.2 + 0.12 * max(len(v.variant) for v in variants))
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for x, variant in enumerate(variants):
            found = variant.metrics.get(metric)
            if found is None:
                continue
            error = None if found.half_width is None else [[found.half_width], [found.half_width]]
            ax.errorbar([x], [found.mean], yerr=error, fmt="o", capsize=6, color=f"C{x}", markersize=8)
            seeds = [t.metrics.get(metric) for t in variant.trials if t.metrics.get(metric) is not None]
            ax.scatter([x + 0.12] * len(seeds), seeds, s=14, color=f"C{x}", alpha=0.5, marker="x")
        ax.set_xticks(range(len(variants)), [v.variant for v in variants], rotation=30, ha="right")
        ax.set_title(f"{metric} ({'lower' if lower_is_better(metric) else 'higher'} is better)")
        ax.set_xlim(-0.5, len(variants) - 0.5)
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle("mean and 95% interval per variant (x: single seeds)")
    return _png(figure)


def _nfe_plot(results: SweepResults) -> Optional[bytes]:
    lines: dict[str, dict[float, list[float]]] = {}
    for r in results.records:
        if r.status != "FINISHED" or "fid" not in r.metrics or "sample_nfe" not in r.metrics:
            continue
        others = {k: v for k, v in r.axes.items() if k != "sample.steps"}
        label = variant_label(r.variant.split(" ")[0], others) + f" ({r.params.get('sample.sampler', '?')})"
        lines.setdefault(label, {}).setdefault(r.metrics["sample_nfe"], []).append(r.metrics["fid"])
    if not lines:
        return None
    figure = _figure(6, 4)
    ax = figure.subplots()
    for label, points in lines.items():
        nfe = sorted(points)
        ax.plot(nfe, [sum(points[n]) / len(points[n]) for n in nfe], marker="o", label=label)
    return _line_plot(figure, ax, "network evaluations per sample (NFE)", "FID (mean over seeds)", xscale="log")


def _loss_plot(results: SweepResults) -> bytes:
    figure = _figure(7, 4)
    ax = figure.subplots()
    variant_of = {}
    for r in results.records:
        variant_of.setdefault(r.training_run_id, r.variant.split(" ")[0])
    colours = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(variant_of.values()))}
    for run_id, curve in results.curves.items():
        if curve:
            name = variant_of.get(run_id, "?")
            ax.plot(*zip(*curve), color=colours.get(name, "k"), alpha=0.8,
                    label=f"{results.training_names.get(run_id, run_id)}")
    return _line_plot(figure, ax, "training step", "train_loss", yscale="log")


def _line_plot(figure, ax, xlabel: str, ylabel: str, xscale: str = "linear", yscale: str = "linear") -> bytes:
    """The axes labelled, scaled, with a legend and a light grid; the figure as PNG."""
    ax.set(xlabel=xlabel, ylabel=ylabel, xscale=xscale, yscale=yscale)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(figure)


def _weighting_plot(results: SweepResults) -> Optional[bytes]:
    values: dict[str, dict[str, list[float]]] = {}
    for r in results.records:
        if r.status != "FINISHED":
            continue
        for metric in ("bpd_ode", "bpd_elbo"):
            if metric in r.metrics:
                values.setdefault(metric, {}).setdefault(str(r.axes.get("loss.weighting")), []).append(r.metrics[metric])
    if not values:
        return None
    figure = _figure(4 * len(values), 3.5)
    for ax, (metric, by_weighting) in zip(figure.subplots(1, len(values), squeeze=False)[0], values.items()):
        names = list(by_weighting)
        ax.bar(range(len(names)), [sum(v) / len(v) for v in by_weighting.values()], color="C0", alpha=0.6)
        for x, name in enumerate(names):
            ax.scatter([x] * len(by_weighting[name]), by_weighting[name], color="k", s=12)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(f"{metric} per loss weighting")
    return _png(figure)
