"""Benchmark every sampler on one trained digits model: FID against the number of network evaluations.

    python benchmarks/samplers.py [--train-steps 3000] [--nfe 10,20,50,100,1000] [--n 360]
                                  [--seed 0] [--threads 1] [--cache-dir DIR] [--out DIR | --no-write]

Trains one DDPM-style model on scikit-learn's 8x8 digits (vp, linear schedule, T = 1000, eps
parameterization, simple weighting, the UNet of sweeps/ddpm_vs_ncsn.yaml) or loads its EMA weights from
the cache (default ~/.cache/diffusion-orchestrator/bench-samplers/<hash of the config>/). Then, for every
registered sampler and every NFE budget, draws n samples from the same seed, computes FID with the
classifier feature extractor against the train split (the extractor and statistics the sweeps use) and
fid_reference, the FID of n held-out real test images (the floor).

Each budget is turned into sampler options so that the actual NFE, as returned by the sampler, is as
close to the budget as the sampler allows (see ``sampler_options``); the table always shows the actual
NFE where it differs. The Markdown report is printed and written into docs/BENCHMARKS.md between the
samplers markers, and the plot into docs/samplers_fid_nfe.png (``--out DIR`` writes both under DIR
instead, ``--no-write`` writes nothing).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from diffusion.config import (  # noqa: E402
    DataConfig, EvalConfig, LossConfig, ModelConfig, ProcessConfig, SampleConfig, TrainConfig, TrialConfig,
)
from diffusion.data import load_dataset  # noqa: E402
from diffusion.metrics import compute_fid  # noqa: E402
from diffusion.registry import options_for  # noqa: E402
from diffusion.samplers import SAMPLERS  # noqa: E402
from diffusion.factory import draw_samples, make_timesteps  # noqa: E402
from diffusion.training import Trainer  # noqa: E402
from diffusion.validation import validate  # noqa: E402
from orchestrator.keys import training_key, training_spec  # noqa: E402
from report import write_section  # noqa: E402  (benchmarks/report.py)

BEGIN, END = "<!-- samplers:begin -->", "<!-- samplers:end -->"
PLOT_NAME = "samplers_fid_nfe.png"
DEFAULT_NFE = (10, 20, 50, 100, 1000)
DEFAULT_CACHE = os.path.join("~", ".cache", "diffusion-orchestrator", "bench-samplers")

# --- per-sampler choices, fixed across budgets (tuned on a pilot model; see docs/BENCHMARKS.md) ---------
# Time spacing per sampler (anything not listed: uniform). Karras et al.'s spacing (rho = 7) helps Heun a lot
# at small budgets and not DPM-Solver++(2M); annealed Langevin needs levels that are dense at low noise.
SPACING = {"ode_heun": "karras", "annealed_langevin": "quadratic"}
LANGEVIN_LEVELS = 10  # annealed_langevin: noise levels (sample.steps); steps_per_level fills the budget
LANGEVIN_STEP_SIZE = 2e-4  # annealed_langevin: eps; level i takes steps eps * sigma_i^2 / sigma_min^2
PC_CORRECTOR_STEPS = 1  # pc: one Langevin corrector step per predictor step, snr 0.16 (the default)
# ode_rk45 is adaptive: its NFE follows from the tolerance (rtol = atol). Budget -> tolerance, measured on
# this model (it never takes fewer than 15 NFE); other budgets are interpolated log-log between these points.
RK45_TOLERANCES = {10: 1e-1, 20: 3e-2, 50: 1e-2, 100: 1e-4, 1000: 2e-6}


# The one model of this benchmark: the DDPM variant of sweeps/ddpm_vs_ncsn.yaml (train.steps from --train-steps).
MODEL = {
    "data": {"name": "digits"},
    "process": {"name": "vp", "schedule": "linear", "T": 1000},
    "model": {"parameterization": "eps", "variance": "beta", "arch": "unet", "channels": 32, "channel_mult": [1, 2],
              "num_res_blocks": 1, "attention": True},
    "loss": {"weighting": "simple"},
    "train": {"batch_size": 128, "lr": 1e-3, "warmup": 100, "ema_decay": 0.995, "log_every": 50,
              "checkpoint_every": 0},
}


def model_config(train_steps: int, seed: int) -> TrialConfig:
    sections = {name: cls(**MODEL[name]) for name, cls in
                (("data", DataConfig), ("process", ProcessConfig), ("model", ModelConfig), ("loss", LossConfig))}
    train = TrainConfig(**MODEL["train"], steps=train_steps)
    return validate(TrialConfig(**sections, train=train, eval=EvalConfig(extractor="classifier"), seed=seed))


def trained_model(cfg: TrialConfig, dataset, cache_dir: str) -> tuple[Trainer, dict]:
    """A Trainer whose EMA network holds the trained weights: loaded from the cache, or trained and cached.
    Returns it with the training metadata (steps, seconds, final loss, cache path)."""
    directory = os.path.join(os.path.expanduser(cache_dir), training_key(cfg))
    weights, meta_path = os.path.join(directory, "ema.pt"), os.path.join(directory, "config.json")
    trainer = Trainer(cfg, dataset, torch.device("cpu"))
    if os.path.exists(weights) and os.path.exists(meta_path):
        trainer.load_ema(weights)
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)["training"]
        return trainer, {**meta, "cached": True, "path": directory}
    print(f"training {cfg.train.steps} steps (cache: {directory}) ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    history = trainer.train(on_log=lambda step, loss: print(f"  step {step}: loss {loss:.4f}", file=sys.stderr)
                            if step % 500 == 0 else None)
    meta = {"steps": trainer.step, "seconds": time.perf_counter() - started, "final_loss": history[-1].loss,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "load_average": os.getloadavg()[1]}
    os.makedirs(directory, exist_ok=True)
    trainer.save_ema(weights)
    with open(meta_path, "w", encoding="utf-8") as handle:
        json.dump({"spec": training_spec(cfg), "training": meta}, handle,
                  indent=2)
    return trainer, {**meta, "cached": False, "path": directory}


def rk45_tolerance(budget: int) -> float:
    """The tolerance for an NFE budget: RK45_TOLERANCES, log-log interpolated (clamped at the ends)."""
    budgets = sorted(RK45_TOLERANCES)
    logs_b = np.log([float(b) for b in budgets])
    logs_t = np.log([RK45_TOLERANCES[b] for b in budgets])
    return float(np.exp(np.interp(math.log(budget), logs_b, logs_t)))


def nfe_of(name: str, visited: int, options: SampleConfig) -> int:
    """Network evaluations per sample of a fixed-cost sampler that visits ``visited`` times."""
    if name == "ode_heun":  # Heun: 2 evaluations per step, Euler on the last: 2 steps - 1
        return 2 * visited - 1
    if name == "pc":  # corrector steps + predictor at every time
        return visited * (1 + options.corrector_steps)
    if name == "annealed_langevin":  # levels x steps per level, + 1 Tweedie denoising step
        return visited * options.steps_per_level + int(options.denoise)
    return visited  # one evaluation per visited time


def sampler_options(name: str, budget: int, process, n: int) -> SampleConfig | str:
    """SampleConfig that spends about ``budget`` network evaluations per sample, or the reason why none can.

    Non-uniform spacings can round two times to the same grid step (make_timesteps drops repeats), so
    for the fixed-cost samplers the requested steps are raised until the times actually visited give the
    NFE closest to the budget."""
    options = SampleConfig(sampler=name, n=n, batch_size=n, spacing=SPACING.get(name, "uniform"), grid=0)
    if name == "ode_rk45":  # adaptive: the time grid only gives the end points
        options.steps = 2
        options.rtol = options.atol = rk45_tolerance(budget)
        return options
    if name == "ode_heun":
        options.steps = (budget + 1) // 2
    elif name == "pc":
        options.corrector_steps = PC_CORRECTOR_STEPS
        options.steps = budget // (1 + PC_CORRECTOR_STEPS)
    elif name == "annealed_langevin":
        options.steps = LANGEVIN_LEVELS
        options.steps_per_level = max(1, round((budget - 1) / LANGEVIN_LEVELS))
        options.step_size = LANGEVIN_STEP_SIZE
        options.denoise = True
    else:
        options.steps = budget
    T = process.T
    if options.steps < 1:
        return f"needs NFE >= {nfe_of(name, 1, options)}"
    if T is not None and options.steps > T:
        return f"{options.steps} steps > T = {T}"

    def actual(steps: int) -> int:
        return nfe_of(name, len(make_timesteps(process, dataclasses.replace(options, steps=steps))), options)

    if name != "annealed_langevin" and T is not None and actual(options.steps) < budget:
        low, high = options.steps, T  # smallest steps in (low, high] whose NFE reaches the budget
        if actual(high) < budget:
            low = high
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if actual(middle) < budget else (low, middle)
        options.steps = min((low, high), key=lambda steps: (abs(actual(steps) - budget), steps))
    return options


def setting_note(name: str, options: SampleConfig) -> str:
    """What was fixed for this sampler, for the table's notes."""
    if name == "ode_rk45":
        return f"rtol = atol = {options.rtol:.0e}"
    notes = [f"spacing {options.spacing}"]
    if name == "ddim":
        notes.append(f"eta {options.eta:g}")
    if name == "pc":
        notes.append(f"{options.corrector_steps} corrector step, snr {options.snr:g}")
    if name == "annealed_langevin":
        notes.append(f"{options.steps} levels, step_size {options.step_size:g}")
    return ", ".join(notes)


def run_cell(trainer: Trainer, dataset, options: SampleConfig, seed: int, eval_cfg: EvalConfig) -> dict:
    """Draw the samples of one (sampler, budget) cell and measure them."""
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    samples, nfe = draw_samples(trainer.ema_denoiser(), options, dataset.shape, options.n, generator,
                                torch.device("cpu"), variance=trainer.cfg.model.variance)
    seconds = time.perf_counter() - started
    cell = {"nfe": int(nfe), "seconds": seconds, "fid": float("nan"), "fid_reference": float("nan")}
    if torch.isfinite(samples).all():
        result = compute_fid(samples, dataset, **options_for(compute_fid, eval_cfg, renames={"n": "fid_n"}),
                             device=torch.device("cpu"))
        cell.update(fid=result.fid, fid_reference=result.fid_reference, n=result.n, tags=result.tags)
    else:
        cell["diverged"] = True
    return cell


def report(results: dict, budgets: list[int], meta: dict, floor: float, tags: dict, command: str,
           wall: float, total: float) -> str:
    """The Markdown section: header, FID table, seconds table, notes."""
    names = list(results)
    header = "| sampler | " + " | ".join(f"NFE {b}" for b in budgets) + " | settings |"
    rule = "|---" * (len(budgets) + 2) + "|"
    fid_rows, second_rows = [header, rule], ["| sampler | " + " | ".join(f"NFE {b}" for b in budgets) + " |",
                                             "|---" * (len(budgets) + 1) + "|"]
    for name in names:
        cells, seconds, note = [], [], ""
        for budget in budgets:
            cell = results[name][budget]
            if "skipped" in cell:
                cells.append(f"skipped: {cell['skipped']}")
                seconds.append("")
                continue
            note = cell["note"]
            value = "diverged" if cell.get("diverged") else f"{cell['fid']:.2f}"
            cells.append(value if cell["nfe"] == budget else f"{value} ({cell['nfe']})")
            seconds.append(f"{cell['seconds']:.1f}")
        if name == "ode_rk45":
            note = "rtol = atol per column: " + ", ".join(
                f"{results[name][b]['options'].rtol:.0e}" for b in budgets if "options" in results[name][b])
        fid_rows.append(f"| {name} | " + " | ".join(cells) + f" | {note} |")
        second_rows.append(f"| {name} | " + " | ".join(seconds) + " |")
    lines = [
        f"Command: `{command}`, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, "
        f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}, torch {torch.__version__}, {platform.machine()}, "
        f"torch threads: {torch.get_num_threads()}.",
        "",
        f"Model: {meta['steps']} training steps in {meta['seconds'] / 60:.1f} min "
        f"({'loaded from the cache' if meta['cached'] else 'trained in this run'}"
        + (f", 5-min load average {meta['load_average']:.1f} when it ended" if "load_average" in meta else "")
        + f"), final loss {meta['final_loss']:.4f}. Sampling and FID of all cells: **{wall / 60:.1f} min**; "
        f"whole run: **{total / 60:.1f} min** (5-min load average {os.getloadavg()[1]:.1f} at the end; "
        "other jobs on the machine slow every timing here).",
        "",
        f"FID ({tags.get('fid.n')} samples, classifier features, test accuracy {tags.get('fid.classifier_accuracy')}, "
        f"against the {tags.get('fid.reference_split')} split); in parentheses the actual NFE where it differs "
        f"from the column's budget. Floor (fid_reference, {tags.get('fid.n')} real test images): **{floor:.3f}**.",
        "",
        *fid_rows,
        "",
        *choices(names),
        "",
        "Sampling seconds per cell (all samples in one batch):",
        "",
        *second_rows,
        "",
        f"![FID against NFE]({PLOT_NAME})",
    ]
    return "\n".join(lines)


def choices(names: list[str]) -> list[str]:
    """How the budgets became sampler options, from the constants at the top of this file."""
    plain = ", ".join(n for n in names if n not in ("ode_heun", "pc", "annealed_langevin", "ode_rk45"))
    spacings = ", ".join(f"{name} {spacing}" for name, spacing in sorted(SPACING.items()))
    ladder = ", ".join(f"{budget}: {tol:.0e}" for budget, tol in sorted(RK45_TOLERANCES.items()))
    return [
        "How a budget becomes options (one rule per sampler, the same in every column): steps = NFE for "
        f"samplers with one network evaluation per visited time ({plain}); ode_heun steps = (NFE + 1) // 2 "
        "(Heun takes 2 steps - 1 evaluations), raised where the karras spacing rounds two times to the same grid "
        f"step; pc steps = NFE // {1 + PC_CORRECTOR_STEPS} ({PC_CORRECTOR_STEPS} corrector + 1 predictor "
        f"evaluation per step); annealed_langevin {LANGEVIN_LEVELS} levels of round((NFE - 1) / {LANGEVIN_LEVELS}) "
        f"(at least 1) Langevin steps + 1 denoising step, step_size {LANGEVIN_STEP_SIZE:g}; ode_rk45 is adaptive: "
        f"rtol = atol by budget ({ladder}), NFE = the solver's evaluations + 1 denoising step. "
        f"Spacing: {spacings}, uniform for the others. Ancestral sampling uses variance beta (as the demo's DDPM); "
        "ddim runs with eta 0, ode_heun without churn. Every cell starts from the same prior noise (seed).",
    ]


def plot(results: dict, budgets: list[int], floor: float, path: str) -> None:
    """FID against actual NFE, one line per sampler, log-log, the floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(figsize=(8, 5.5), dpi=110)
    markers = "osD^v<>phX*"
    for index, (name, row) in enumerate(results.items()):
        points = sorted((c["nfe"], c["fid"]) for c in row.values() if "fid" in c and math.isfinite(c["fid"]))
        if points:
            axes.plot(*zip(*points), marker=markers[index % len(markers)], label=name,
                      linestyle="-" if index < 10 else "--")
    axes.axhline(floor, color="black", linestyle="--", linewidth=1, label=f"floor (real data) {floor:.2f}")
    axes.set_xscale("log")
    axes.set_xticks(budgets, [str(b) for b in budgets])
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_yscale("log")
    axes.set_xlabel("NFE (network evaluations per sample)")
    axes.set_ylabel("FID (classifier features)")
    axes.set_title("Samplers on one digits model (vp, linear, T = 1000, eps)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-steps", type=int, default=3000, help="training steps of the model (default 3000)")
    parser.add_argument("--nfe", default=",".join(map(str, DEFAULT_NFE)), help="comma-separated NFE budgets")
    parser.add_argument("--n", type=int, default=360, help="samples per cell (default 360, like the demo)")
    parser.add_argument("--samplers", default="", help="comma-separated subset of samplers (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="training seed; sampling uses seed + 1")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: 2 are only ~1.3x faster on an idle 2-core machine and much "
                             "slower when other jobs share the CPU)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where trained weights are kept")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs"),
                        help="directory of BENCHMARKS.md and the plot (default docs/)")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    run_started = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    budgets = sorted({int(b) for b in args.nfe.split(",") if b.strip()})
    names = [s for s in args.samplers.split(",") if s] or SAMPLERS.names()
    for name in names:
        SAMPLERS.get(name)  # unknown names fail here, with the list
    cfg = model_config(args.train_steps, args.seed)
    dataset = load_dataset(cfg.data)
    trainer, meta = trained_model(cfg, dataset, args.cache_dir)
    trainer.ema.module.eval()

    started = time.perf_counter()
    results: dict[str, dict[int, dict]] = {}
    floor, tags = float("nan"), {}
    for name in names:
        results[name] = {}
        for budget in budgets:
            options = sampler_options(name, budget, trainer.process, args.n)
            if isinstance(options, str):
                results[name][budget] = {"skipped": options}
                print(f"{name:>18} budget {budget:>5}: skipped ({options})", file=sys.stderr, flush=True)
                continue
            cell = run_cell(trainer, dataset, options, args.seed + 1, cfg.eval)
            cell.update(options=options, note=setting_note(name, options))
            results[name][budget] = cell
            if "tags" in cell:
                floor, tags = cell["fid_reference"], cell["tags"]
            print(f"{name:>18} budget {budget:>5}: NFE {cell['nfe']:>5}  FID {cell['fid']:8.3f}  "
                  f"{cell['seconds']:6.1f} s", file=sys.stderr, flush=True)
    wall = time.perf_counter() - started

    shown = " ".join(["python benchmarks/samplers.py", *argv])
    section = report(results, budgets, meta, floor, tags, shown, wall, time.perf_counter() - run_started)
    print(section)
    if not args.no_write:
        os.makedirs(args.out, exist_ok=True)
        plot(results, budgets, floor, os.path.join(args.out, PLOT_NAME))
        write_section(section, BEGIN, END, "Samplers: FID against NFE (`make bench-samplers`)",
                      os.path.join(args.out, "BENCHMARKS.md"))
        print(f"wrote {os.path.join(args.out, 'BENCHMARKS.md')} and {os.path.join(args.out, PLOT_NAME)}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
