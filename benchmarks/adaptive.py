"""Early stopping against the grid: ASHA on FID during training over 12 configurations of the demo's DDPM.

    python benchmarks/adaptive.py [--steps 900] [--every 150] [--grace 150] [--reduction-factor 4] [--out FILE | --no-write]

Two real sweeps (``orchestrator sweep``: Ray Tune, a local MLflow server, each in a directory of its own so that
neither reuses the other's models) over the same 12 configurations, a seeded random search (``search``) over the
learning rate (loguniform 1e-4 to 3e-3) and the noise schedule (linear or cosine) of ``sweeps/search_lr.yaml``'s
network trained ``--steps`` steps, FID during training every ``--every`` steps (128 samples, DDIM 25 steps), two
trials at a time (one CPU each), in the search's order:

- all trained: every configuration trained to the end and evaluated (final FID of 512 DDIM samples, with its stderr);
- ASHA: the same with ``scheduler: {name: asha, metric: fid, grace_period: --grace, reduction_factor: ...}``.

Figures: the training steps each used (a stopped training's steps are its stop step), the wall time, the best
configuration of each by final FID with its standard error, and whether ASHA's best is within the grid's best's
uncertainty (the difference over the two stderrs combined: |z| < 1.96). The Markdown report is printed and written
into docs/BENCHMARKS.md between the adaptive markers.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mlflow.tracking import MlflowClient  # noqa: E402

from orchestrator.scheduler import Scheduler  # noqa: E402
from report import output_options, publish  # noqa: E402  (benchmarks/report.py)

BEGIN, END = "<!-- adaptive:begin -->", "<!-- adaptive:end -->"
HEADING = "Early stopping: ASHA on FID during training against the grid (`make bench-adaptive`)"
SEARCH = {"algorithm": "random", "num_samples": 12, "metric": "fid", "mode": "min", "seed": 0,
          "space": {"train.lr": {"loguniform": [1e-4, 3e-3]}, "process.schedule": {"choice": ["linear", "cosine"]}}}


def sweep_file(directory: str, args, asha: bool) -> str:
    source = yaml.safe_load(open(os.path.join(ROOT, "sweeps", "search_lr.yaml")))
    base = source["base"]
    base["train"] = {**base["train"], "steps": args.steps, "checkpoint_every": 0}
    base["sample"] = {**base["sample"], "n": 512, "batch_size": 256, "grid": 0, "steps": 50}
    base["eval"] = {**base["eval"], "bpd": False, "every": args.every, "every_n": 128, "every_steps": 25}
    sweep = {"name": "adaptive", "base": base, "search": SEARCH, "max_concurrent": 2}
    if asha:
        sweep["scheduler"] = {"name": "asha", "metric": "fid", "mode": "min", "grace_period": args.grace,
                              "reduction_factor": args.reduction_factor}
    path = os.path.join(directory, "adaptive.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(sweep, handle)
    return path


def run_sweep(args, asha: bool) -> dict:
    """One sweep in a fresh directory: {"wall", "trials": [{name, lr, ema, steps, fid, stderr, stopped}]}."""
    directory = tempfile.mkdtemp(prefix="bench-adaptive-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", sweep_file(directory, args, asha)],
                            cwd=directory, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"the sweep exited {result.returncode}:\n{result.stdout[-3000:]}")
    client = MlflowClient(f"sqlite:///{os.path.join(directory, 'mlflow.db')}")
    experiment = client.get_experiment_by_name("adaptive")
    trials = []
    for run in client.search_runs([experiment.experiment_id], "tags.stage = 'evaluate'", max_results=100):
        metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
        stopped = "stopped_by" in tags
        trials.append({"name": tags["trial"], "lr": float(params["train.lr"]), "schedule": params["process.schedule"],
                       "steps": int(metrics["train_steps"]) if stopped else int(params["train.steps"]),
                       "fid": metrics.get("fid"), "stderr": metrics.get("fid_stderr"),
                       "stopped": int(tags["stopped_at_step"]) if stopped else None})
    return {"wall": wall, "trials": sorted(trials, key=lambda t: int(t["name"].rsplit("=", 1)[1])),
            "directory": directory}


def best(trials: list[dict]) -> dict:
    return min((t for t in trials if t["fid"] is not None), key=lambda t: t["fid"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--every", type=int, default=150)
    parser.add_argument("--grace", type=int, default=150)
    parser.add_argument("--reduction-factor", type=float, default=4)
    output_options(parser)
    args = parser.parse_args(argv)
    total = time.perf_counter()
    grid = run_sweep(args, asha=False)
    print(f"all trained: {grid['wall']:.0f} s", file=sys.stderr, flush=True)
    asha = run_sweep(args, asha=True)
    print(f"asha: {asha['wall']:.0f} s", file=sys.stderr, flush=True)
    steps = {name: sum(t["steps"] for t in sweep["trials"]) for name, sweep in (("grid", grid), ("asha", asha))}
    top = {name: best(sweep["trials"]) for name, sweep in (("grid", grid), ("asha", asha))}
    rungs = Scheduler(name="asha", grace_period=args.grace, reduction_factor=args.reduction_factor,
                      max_t=args.steps).milestones()  # Tune's, as the sweep's scheduler makes them
    z = (top["asha"]["fid"] - top["grid"]["fid"]) / math.hypot(top["asha"]["stderr"], top["grid"]["stderr"])
    command = " ".join(["python benchmarks/adaptive.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        f"Measured by `{command}` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, no GPU, "
        f"{platform.machine()}; whole run {(time.perf_counter() - total) / 60:.1f} min; 5-min load average "
        f"{os.getloadavg()[1]:.1f} at the end. 12 configurations (a random search, seed 0: learning rate loguniform "
        "1e-4 to 3e-3, schedule linear or cosine) of `sweeps/search_lr.yaml`'s DDPM, "
        f"{args.steps} steps each, FID during training every {args.every} steps (128 samples, DDIM 25 steps), final "
        "FID of 512 DDIM samples at 50 steps (classifier features), two trials at a time; ASHA: grace period "
        f"{args.grace}, reduction factor {args.reduction_factor:g} (rungs at steps "
        f"{', '.join(f'{m:g}' for m in rungs if m < args.steps)}).",
        "",
        "| method | training steps | of the grid's | wall time (s) | best configuration | its final FID ± stderr |",
        "|---|---|---|---|---|---|",
    ]
    for name, sweep in (("grid", grid), ("asha", asha)):
        t = top[name]
        label = "all trained" if name == "grid" else "ASHA"
        lines.append(f"| {label} | {steps[name]:,} | {steps[name] / steps['grid']:.0%} | {sweep['wall']:.0f} | "
                     f"{t['name']}: lr {t['lr']:.3g}, {t['schedule']} | {t['fid']:.2f} ± {t['stderr']:.2f} |")
    verdict = "within" if abs(z) < 1.96 else "outside"
    lines += ["", f"ASHA's best against the best of all trained: {top['asha']['fid'] - top['grid']['fid']:+.2f} FID, z = "
              f"{z:+.2f} ({verdict} their uncertainty at 95%), with {steps['asha'] / steps['grid']:.0%} of the grid's "
              "training steps.", "", "Each configuration (final FID ± stderr; ASHA: where it stopped):", "",
              "| trial | lr | schedule | all trained: final FID | ASHA: final FID or stop |", "|---|---|---|---|---|"]
    asha_by = {t["name"]: t for t in asha["trials"]}
    for t in grid["trials"]:
        other = asha_by[t["name"]]
        shown = (f"stopped at step {other['stopped']}" if other["stopped"] is not None
                 else f"{other['fid']:.2f} ± {other['stderr']:.2f}")
        lines.append(f"| {t['name']} | {t['lr']:.3g} | {t['schedule']} | {t['fid']:.2f} ± {t['stderr']:.2f} | {shown} |")
    publish("\n".join(lines), args, BEGIN, END, HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
