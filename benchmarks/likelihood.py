"""Benchmark the probability-flow ODE likelihood: bits/dim, NFE and seconds against the solver tolerance.

    python benchmarks/likelihood.py [--tolerances 1e-2,1e-3,1e-4,1e-5,1e-6] [--n 100] [--train-steps 3000]
                                    [--exact-tolerance 1e-3] [--seed 0] [--threads 1] [--cache-dir DIR]
                                    [--skip-digits] [--out DIR | --no-write]

Two parts, one table each, for every rtol = atol in --tolerances:

1. Gaussian data N(mu, C) in dimension 64 (``diffusion.analytic.GaussianData.random(64)``) with its exact
   denoiser, under the continuous vp, subvp and ve processes: the ODE's bits/dim of n samples, its error
   against the closed form of what the ODE computes (``GaussianData.flow_nll``: the solver's error alone)
   and against the data's own density -log N(x; mu, C) (solver + smoothing at t_min + prior mismatch),
   with exact divergence; and the error of Hutchinson's estimate (one Rademacher probe per example) against
   the same closed form, whose mean should be 0 within its standard error.
2. A trained digits model, the DDPM of sweeps/ddpm_vs_ncsn.yaml (the model of benchmarks/samplers.py, shared
   through its cache, default ~/.cache/diffusion-orchestrator/bench-samplers/): bits/dim of the first n test
   images (one uniform dequantization draw, the same for every tolerance, + log2(levels / 2) bits offset;
   the digits have 17 levels) through the
   continuous limit of its schedule, Hutchinson with the same probes at every tolerance, so the change from
   the tightest tolerance is the solver's; at --exact-tolerance also the exact divergence of the same
   images (the probes' noise), and the discrete bound bpd_elbo of the same images for comparison.

Seconds are wall time per 100 examples, all examples in one solve (the solver's steps are shared by the
batch, so the NFE is that of the hardest example). The Markdown report is printed and written into
docs/BENCHMARKS.md between the likelihood markers (``--out DIR`` writes under DIR, ``--no-write`` nothing).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from diffusion.analytic import GaussianData  # noqa: E402
from diffusion.config import ProcessConfig  # noqa: E402
from diffusion.data import load_dataset  # noqa: E402
from diffusion.elbo import elbo_terms  # noqa: E402
from diffusion.likelihood import bits_per_dim, dequantize, ode_log_likelihood, to_levels  # noqa: E402
from diffusion.factory import build_process  # noqa: E402
from report import write_section  # noqa: E402  (benchmarks/report.py)
from samplers import DEFAULT_CACHE, model_config, trained_model  # noqa: E402  (benchmarks/samplers.py)

BEGIN, END = "<!-- likelihood:begin -->", "<!-- likelihood:end -->"
DEFAULT_TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
GAUSSIAN_DIM = 64
GAUSSIAN_PROCESSES = {  # the processes of tests/test_likelihood.py
    "vp": ProcessConfig(name="vp", schedule="linear", T="continuous"),
    "subvp": ProcessConfig(name="subvp", schedule="linear", T="continuous"),
    # sigma_max = 50 >> the data's scale (|x| ~ 6), so the prior N(0, 50^2 I) is close to q_1
    "ve": ProcessConfig(name="ve", schedule="geometric", T="continuous", sigma_min=0.01, sigma_max=50.0),
}


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    return values.mean().item(), (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else float("nan")


def timed_solve(denoiser, x: torch.Tensor, tolerance: float, **kwargs):
    started = time.perf_counter()
    result = ode_log_likelihood(denoiser, x, rtol=tolerance, atol=tolerance, **kwargs)
    return result, time.perf_counter() - started


def gaussian_rows(tolerances: list[float], n: int, seed: int) -> list[dict]:
    """Part 1: one row per (process, tolerance), errors in bits/dim against the closed forms."""
    data = GaussianData.random(GAUSSIAN_DIM, seed=0)
    x = data.sample(n, torch.Generator().manual_seed(seed))
    rows = []
    for name, process_cfg in GAUSSIAN_PROCESSES.items():
        process = build_process(process_cfg)
        denoiser = data.denoiser(process)
        for tolerance in tolerances:
            exact, seconds = timed_solve(denoiser, x, tolerance, divergence="exact")
            closed = data.flow_nll(process, x, exact.t_start)
            to_bits = lambda nats: bits_per_dim(nats, GAUSSIAN_DIM)  # noqa: E731
            hutchinson, h_seconds = timed_solve(denoiser, x, tolerance, divergence="hutchinson", probes=1,
                                                generator=torch.Generator().manual_seed(seed + 1))
            rows.append({
                "process": name, "tolerance": tolerance, "nfe": exact.nfe, "seconds": seconds * 100 / n,
                "bpd": exact.bits_per_dim().mean().item(),
                "solver_error": to_bits(exact.nll - closed["flow"]).abs().max().item(),
                "data_error": mean_se(to_bits(exact.nll - closed["data"])),
                "hutchinson_error": mean_se(to_bits(hutchinson.nll - closed["flow"])),
                "hutchinson_nfe": hutchinson.nfe, "hutchinson_seconds": h_seconds * 100 / n,
            })
            print(f"gaussian {name:>5} tol {tolerance:.0e}: NFE {exact.nfe:4d} {seconds:6.1f} s  "
                  f"solver error {rows[-1]['solver_error']:.1e}", file=sys.stderr, flush=True)
    return rows


def digits_rows(tolerances: list[float], exact_tolerance: float | None, n: int, args) -> tuple[list[dict], dict]:
    """Part 2: one row per tolerance (Hutchinson), the exact-divergence row, and the bound; with the model's metadata."""
    cfg = model_config(args.train_steps, args.seed)
    dataset = load_dataset(cfg.data)
    trainer, meta = trained_model(cfg, dataset, args.cache_dir)
    denoiser, path = trainer.ode_denoiser()
    images = dataset.test[:n]
    levels = dataset.levels
    offset = math.log2(levels / 2)
    y = dequantize(to_levels(images, levels), torch.Generator().manual_seed(args.seed + 2), levels)
    rows = []
    for tolerance in tolerances:
        result, seconds = timed_solve(denoiser, y, tolerance, divergence="hutchinson", probes=1,
                                      generator=torch.Generator().manual_seed(args.seed + 3))
        rows.append({"divergence": "hutchinson, 1 Rademacher probe", "tolerance": tolerance, "nfe": result.nfe,
                     "seconds": seconds * 100 / n, "per_image": result.bits_per_dim(offset)})
        print(f"digits tol {tolerance:.0e}: NFE {result.nfe:4d} {seconds:6.1f} s  "
              f"bpd {rows[-1]['per_image'].mean():.4f}", file=sys.stderr, flush=True)
    if exact_tolerance:
        result, seconds = timed_solve(denoiser, y, exact_tolerance, divergence="exact")
        rows.append({"divergence": "exact", "tolerance": exact_tolerance, "nfe": result.nfe,
                     "seconds": seconds * 100 / n, "per_image": result.bits_per_dim(offset)})
        print(f"digits exact tol {exact_tolerance:.0e}: NFE {result.nfe:4d} {seconds:6.1f} s", file=sys.stderr)
    started = time.perf_counter()
    with torch.no_grad():
        terms = elbo_terms(trainer.ema_denoiser(), images, levels, cfg.model.variance,
                           generator=torch.Generator().manual_seed(args.seed + 4))
    elbo = {"per_image": bits_per_dim(terms["total"], images[0].numel()),
            "seconds": (time.perf_counter() - started) * 100 / n, "nfe": trainer.process.T}
    return rows, {**meta, "path": path, "elbo": elbo, "levels": levels, "dims": images[0].numel()}


def gaussian_table(rows: list[dict]) -> list[str]:
    lines = ["| process | rtol = atol | NFE | s / 100 | bits/dim | max solver error | error vs -log N(x; mu, C) "
             "| Hutchinson error (NFE, s / 100) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        (d_mean, d_se), (h_mean, h_se) = r["data_error"], r["hutchinson_error"]
        lines.append(f"| {r['process']} | {r['tolerance']:.0e} | {r['nfe']} | {r['seconds']:.2f} | {r['bpd']:.4f} | "
                     f"{r['solver_error']:.1e} | {d_mean:+.4f} ± {d_se:.4f} | {h_mean:+.4f} ± {h_se:.4f} "
                     f"({r['hutchinson_nfe']}, {r['hutchinson_seconds']:.2f}) |")
    return lines


def digits_table(rows: list[dict], meta: dict) -> list[str]:
    reference = next(r for r in reversed(rows) if r["divergence"] != "exact")  # the tightest Hutchinson solve
    lines = ["| divergence | rtol = atol | NFE | s / 100 images | bits/dim ± se | mean abs change per image vs "
             f"rtol {reference['tolerance']:.0e} |", "|---|---|---|---|---|---|"]
    for r in rows:
        mean, se = mean_se(r["per_image"])
        change = "—" if r["divergence"] == "exact" else f"{(r['per_image'] - reference['per_image']).abs().mean():.4f}"
        lines.append(f"| {r['divergence']} | {r['tolerance']:.0e} | {r['nfe']} | {r['seconds']:.1f} | "
                     f"{mean:.4f} ± {se:.4f} | {change} |")
    exact = [r for r in rows if r["divergence"] == "exact"]
    if exact:
        same = next((r for r in rows if r["divergence"] != "exact" and r["tolerance"] == exact[0]["tolerance"]), None)
        if same is not None:
            mean, se = mean_se(same["per_image"] - exact[0]["per_image"])
            lines += ["", f"Hutchinson minus exact divergence at rtol {exact[0]['tolerance']:.0e}, same images and "
                      f"dequantization: {mean:+.4f} ± {se:.4f} bits/dim (mean ± se over images; unbiased: should be "
                      "0 within a few se)."]
    elbo_mean, elbo_se = mean_se(meta["elbo"]["per_image"])
    lines += ["", f"Discrete bound of the same images (bpd_elbo, Ho et al. 2020 eq. 5, T = {meta['elbo']['nfe']} "
              f"network evaluations, decoder discretized on {meta['levels']} levels): **{elbo_mean:.4f} ± {elbo_se:.4f}** "
              f"bits/dim in {meta['elbo']['seconds']:.1f} s / 100 images."]
    return lines


def report(gaussian: list[dict], digits: list[dict] | None, meta: dict | None, command: str, total: float,
           n: int) -> str:
    lines = [
        f"Command: `{command}`, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, "
        f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}, torch {torch.__version__}, {platform.machine()}, "
        f"torch threads: {torch.get_num_threads()}. Whole run: **{total / 60:.1f} min** (5-min load average "
        f"{os.getloadavg()[1]:.1f} at the end). Seconds are wall time per 100 examples solved together.",
        "",
        f"**Gaussian data, dimension {GAUSSIAN_DIM}, exact denoiser**, {n} samples, scipy RK45 from t_min = 1e-3 to 1. "
        "Bits/dim with exact divergence; *max solver error*: the largest |ODE - closed form| over the samples "
        "(`GaussianData.flow_nll`, the exact value of what the ODE integrates); *error vs -log N*: mean ± se of "
        "ODE minus the data's own NLL (adds the smoothing at t_min and the prior's mismatch with q_1); "
        "*Hutchinson error*: mean ± se of the one-probe estimate minus the closed form (unbiased: 0 within a few se).",
        "",
        *gaussian_table(gaussian),
    ]
    if digits is not None:
        lines += [
            "",
            f"**Digits (8x8), trained DDPM** of sweeps/ddpm_vs_ncsn.yaml: {meta['steps']} training steps "
            f"({'loaded from the cache of benchmarks/samplers.py' if meta['cached'] else 'trained in this run'}), "
            f"final loss {meta['final_loss']:.4f}; the ODE runs on the {meta['path']}. The first {n} test images, "
            f"one uniform dequantization draw (the same at every tolerance), offset log2({meta['levels']} / 2) = "
            f"{math.log2(meta['levels'] / 2):.3f} bits ({meta['levels']} intensity levels); Hutchinson probes "
            "fixed and the same at every tolerance, so the change column is the solver's error.",
            "",
            *digits_table(digits, meta),
        ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tolerances", default=",".join(f"{t:.0e}" for t in DEFAULT_TOLERANCES),
                        help="comma-separated rtol = atol values")
    parser.add_argument("--n", type=int, default=100, help="examples per solve (default 100)")
    parser.add_argument("--exact-tolerance", type=float, default=1e-3,
                        help="tolerance of the digits model's exact-divergence solve (0: skip it)")
    parser.add_argument("--train-steps", type=int, default=3000, help="training steps of the digits model (default 3000)")
    parser.add_argument("--seed", type=int, default=0, help="training seed; data, dequantization and probes derive from it")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as benchmarks/samplers.py)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where trained weights are kept (shared with "
                        "benchmarks/samplers.py)")
    parser.add_argument("--skip-digits", action="store_true", help="only the Gaussian part")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs"), help="directory of BENCHMARKS.md (default docs/)")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tolerances = sorted({float(t) for t in args.tolerances.split(",") if t.strip()}, reverse=True)
    gaussian_rows([1e-2], 2, args.seed)  # warm-up: the first solve of a process pays one-off costs
    gaussian = gaussian_rows(tolerances, args.n, args.seed)
    digits, meta = (None, None) if args.skip_digits else digits_rows(tolerances, args.exact_tolerance, args.n, args)
    shown = " ".join(["python benchmarks/likelihood.py", *argv])
    section = report(gaussian, digits, meta, shown, time.perf_counter() - started, args.n)
    print(section)
    if not args.no_write:
        os.makedirs(args.out, exist_ok=True)
        write_section(section, BEGIN, END, "Likelihood: bits/dim against the ODE tolerance (`make bench-likelihood`)",
                      os.path.join(args.out, "BENCHMARKS.md"))
        print(f"wrote {os.path.join(args.out, 'BENCHMARKS.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
