"""Benchmark the orchestration: trainings saved by train-once, overhead per trial, one node against two.

    python benchmarks/orchestration.py [--samplers 3] [--seeds 2] [--steps 300] [--trials 6] [--repeats 3] [--no-write]
    python benchmarks/orchestration.py --launch [--before DIR] [--repeats 3] [--no-write]

Every sweep here is real (`orchestrator sweep`, Ray Tune, a real MLflow server on loopback) on small digits
models (the smoke sweep's network, --steps training steps, no FID or bits/dim, 16 samples), so what is
measured is the orchestration around the training rather than the models:

1. Train once, evaluate many: a sweep of S samplers x M seeds trains M models; a plain grid (every trial
   trains its own model) trains S x M. Measured in one run: the sweep once, then S one-sampler sweeps of the
   same M seeds with --no-cache (what a plain grid costs), counting training runs in MLflow and the wall time.
2. Overhead per trial, from the runs of part 1: Ray and driver start-up (the sweep's parent run created ->
   its first training run created), a task's start on its worker -> its training loop (the training run's
   `startup_seconds`: MLflow run, data, network), and the end of an evaluation -> its run FINISHED (the last
   metric's timestamp -> the run's end time: the final logging).
3. Throughput: the same sweep of --trials trials (one model each) on a one-node Ray cluster and on a
   two-node one (orchestrator.localcluster, 1 CPU per node, both nodes on this machine), in trials per hour:
   --repeats runs of each in alternating order (so neither size always runs first, on a cold cache), the
   median wall time, and the mean time of the models' own training loops (what contention would slow).

The Markdown report is printed and written into docs/BENCHMARKS.md between the orchestration markers.

4. ``--launch`` (its own section, between the launch markers): the fixed cost of a sweep. The smoke sweep
   (sweeps/smoke.yaml, ``base.train.log_every=1``) run as a user runs it: a fresh directory (its own MLflow server,
   no model in the cache), ``--repeats`` times each, cold (an empty FID classifier cache: ``eval.cache_dir``) and
   warm (the cache the cold run filled). Figures: launch (the CLI process started) -> first training step (the
   timestamp of the first ``train_loss``, logged after step 1), and the wall time divided by the trials' own work
   (the training loops' ``train_seconds`` plus each evaluation's ``sample_seconds`` and ``bpd_seconds``).
   ``--before DIR``: the same measured on another checkout's code (PYTHONPATH=DIR), alternating with this one.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mlflow.tracking import MlflowClient  # noqa: E402

from orchestrator.localcluster import LocalCluster  # noqa: E402
from orchestrator.tracking import LocalServer  # noqa: E402
from report import write_section  # noqa: E402  (benchmarks/report.py)

BEGIN, END = "<!-- orchestration:begin -->", "<!-- orchestration:end -->"
LAUNCH_BEGIN, LAUNCH_END = "<!-- launch:begin -->", "<!-- launch:end -->"
SAMPLERS = ("ancestral", "ddim", "euler_maruyama", "dpm_solver_2m")


def sweep_file(path: str, name: str, steps: int, samplers: list[str], seeds: list[int]) -> str:
    smoke = yaml.safe_load(open(os.path.join(ROOT, "sweeps", "smoke.yaml")))
    base = {**smoke["base"], **smoke["variants"]["ddpm"]}
    base["train"] = {**base["train"], "steps": steps, "log_every": 50, "checkpoint_every": 0}
    base["sample"] = {**base["sample"], "n": 16, "batch_size": 16, "grid": 0, "steps": 10}
    base["eval"] = {"fid": False, "bpd": False}
    grid = {"seed": seeds}
    if len(samplers) > 1:
        grid["sample.sampler"] = samplers
    else:
        base["sample"]["sampler"] = samplers[0]
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump({"name": name, "base": base, "grid": grid}, handle)
    return path


def run(args: list[str], cwd: str, env: dict) -> float:
    """Run the CLI; returns its wall seconds (raises on a non-zero exit)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise RuntimeError(f"orchestrator {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}")
    return time.perf_counter() - started


def runs(client: MlflowClient, name: str) -> dict:
    experiment = client.get_experiment_by_name(name)
    found = client.search_runs([experiment.experiment_id], max_results=1000)
    out = {"parent": [], "train": [], "evaluate": []}
    for r in found:
        out[r.data.tags.get("stage", "parent") if "mlflow.parentRunId" in r.data.tags else "parent"].append(r)
    return out


def overheads(client: MlflowClient, name: str) -> dict:
    found = runs(client, name)
    parent = found["parent"][0]
    first_training = min(r.info.start_time for r in found["train"])
    startup = [r.data.metrics["startup_seconds"] for r in found["train"]]
    ends = []
    for r in found["evaluate"]:
        last = max(client.get_metric_history(r.info.run_id, key)[-1].timestamp for key in r.data.metrics)
        ends.append((r.info.end_time - last) / 1000)
    return {"ray": (first_training - parent.info.start_time) / 1000, "startup": startup, "end": ends}


def describe(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} (max {max(values):.2f}, n = {len(values)})"


def smoke_once(code: str, cache_dir: str, env: dict) -> dict:
    """The smoke sweep in a fresh directory with the code of ``code``, its FID classifier cache in ``cache_dir``:
    {"first_step": launch -> first training step (s), "wall": s, "work": the trials' own work (s)}."""
    workdir = tempfile.mkdtemp(prefix="bench-launch-")
    env = {**env, "PYTHONPATH": code}
    args = ["sweep", os.path.join(ROOT, "sweeps", "smoke.yaml"), f"base.eval.cache_dir={cache_dir}",
            "base.train.log_every=1"]
    launched = time.time()
    wall = run(args, workdir, env)
    client = MlflowClient(f"sqlite:///{os.path.join(workdir, 'mlflow.db')}")
    found = runs(client, "smoke")
    first = min(min(m.timestamp for m in client.get_metric_history(r.info.run_id, "train_loss"))
                for r in found["train"])
    work = sum(r.data.metrics["train_seconds"] for r in found["train"])
    work += sum(r.data.metrics.get(k, 0.0) for r in found["evaluate"] for k in ("sample_seconds", "bpd_seconds"))
    return {"first_step": first / 1000 - launched, "wall": wall, "work": work}


def launch(args, argv: list[str]) -> int:
    """Part 4 (``--launch``): launch -> first training step, warm and cold, and wall / own work, per code tree."""
    total = time.perf_counter()
    trees = {"this tree": ROOT, **({"before": os.path.abspath(args.before)} if args.before else {})}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    measured = {(tree, kind): [] for tree in trees for kind in ("cold", "warm")}
    for repeat in range(args.repeats):
        order = list(trees) if repeat % 2 == 0 else list(reversed(trees))
        for tree in order:
            cache_dir = tempfile.mkdtemp(prefix="bench-launch-cache-")
            for kind in ("cold", "warm"):  # the warm run uses the classifier the cold one trained
                figures = smoke_once(trees[tree], cache_dir, env)
                measured[(tree, kind)].append(figures)
                print(f"{tree} {kind}: first step {figures['first_step']:.1f} s, wall {figures['wall']:.1f} s, "
                      f"own work {figures['work']:.1f} s", file=sys.stderr, flush=True)

    def cell(tree: str, kind: str, figure) -> str:
        values = [figure(m) for m in measured[(tree, kind)]]
        return f"{statistics.median(values):.1f} ({', '.join(f'{v:.1f}' for v in values)})"

    command = " ".join(["python benchmarks/orchestration.py", *argv])
    lines = [
        f"Command: `{command}`, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, no GPU, {platform.machine()}; "
        f"whole run {(time.perf_counter() - total) / 60:.1f} min (5-min load average {os.getloadavg()[1]:.1f} at the "
        f"end). The smoke sweep (2 trials, 30 training steps each, `base.train.log_every=1`), each run in a fresh "
        "directory (its own MLflow server, local Ray, no model cached); cold: an empty FID classifier cache, warm: the "
        f"one the cold run filled. Median of {args.repeats} (each run's figure in brackets)"
        + (f"; before: the code of `{args.before}`." if args.before else "."),
        "",
        "| code | cache | launch -> first training step (s) | wall time (s) | trials' own work (s) | wall / own work |",
        "|---|---|---|---|---|---|",
    ]
    for tree in trees:
        for kind in ("warm", "cold"):
            lines.append(f"| {tree} | {kind} | {cell(tree, kind, lambda m: m['first_step'])} | "
                         f"{cell(tree, kind, lambda m: m['wall'])} | {cell(tree, kind, lambda m: m['work'])} | "
                         f"{cell(tree, kind, lambda m: m['wall'] / m['work'])} |")
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section(section, LAUNCH_BEGIN, LAUNCH_END, "The fixed cost of a sweep: launch to first training step "
                      "(`python benchmarks/orchestration.py --launch`)")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samplers", type=int, default=3, help=f"S: samplers from {', '.join(SAMPLERS)}")
    parser.add_argument("--seeds", type=int, default=2, help="M: seeds (models)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per model")
    parser.add_argument("--trials", type=int, default=6, help="trials of the throughput sweep")
    parser.add_argument("--repeats", type=int, default=3,
                        help="throughput runs per cluster size, in alternating order (1, 2, 2, 1, 1, 2, ...)")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    parser.add_argument("--launch", action="store_true",
                        help="measure the fixed cost of a sweep instead (part 4): launch -> first training step, "
                             "warm and cold, and wall time / the trials' own work, on the smoke sweep")
    parser.add_argument("--before", default=None,
                        help="with --launch: also measure the code of this checkout (PYTHONPATH=BEFORE)")
    args = parser.parse_args(argv)
    if args.launch:
        return launch(args, argv)
    total = time.perf_counter()
    samplers, seeds = list(SAMPLERS[: args.samplers]), list(range(args.seeds))
    work = tempfile.mkdtemp(prefix="bench-orchestration-")
    server = LocalServer(os.path.join(work)).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=server.uri, PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0")
    client = MlflowClient(server.uri)
    try:
        # 1. train once against a plain grid
        path = sweep_file(os.path.join(work, "once.yaml"), "once", args.steps, samplers, seeds)
        once = run(["sweep", path], work, env)
        trained_once = len(runs(client, "once")["train"])
        plain, trained_plain = 0.0, 0
        for sampler in samplers:
            path = sweep_file(os.path.join(work, f"plain-{sampler}.yaml"), "plain", args.steps, [sampler], seeds)
            plain += run(["sweep", path, "--no-cache"], work, env)
        trained_plain = len(runs(client, "plain")["train"])
        print(f"train once: {trained_once} trainings in {once:.0f} s; plain grid: {trained_plain} in {plain:.0f} s",
              file=sys.stderr, flush=True)
        # 2. overheads, from the train-once sweep
        costs = overheads(client, "once")
        # 3. one node against two
        walls = {1: [], 2: []}  # wall seconds of each repeat
        training = {1: [], 2: []}  # train_seconds of every training run (the model's own training loop)
        order = [n for r in range(args.repeats) for n in ((1, 2) if r % 2 == 0 else (2, 1))]
        for attempt, nodes in enumerate(order):
            cluster = LocalCluster()
            name = f"nodes{nodes}-{attempt}"
            try:
                for index in range(nodes):
                    cluster.start_node(f"node{index}", 1, {f"node{index}": 1})
                # fresh seeds every time: nothing is reused from the model cache
                seeds_here = list(range(100 + attempt * args.trials, 100 + (attempt + 1) * args.trials))
                path = sweep_file(os.path.join(work, f"{name}.yaml"), name, args.steps, ["ddim"], seeds_here)
                seconds = run(["sweep", path, "--address", cluster.address], work, {**env, **cluster.env,
                                                                                     "MLFLOW_TRACKING_URI": server.uri})
            finally:
                cluster.stop()
            walls[nodes].append(seconds)
            training[nodes] += [r.data.metrics["train_seconds"] for r in runs(client, name)["train"]]
            print(f"{nodes} node(s): {args.trials} trials in {seconds:.0f} s", file=sys.stderr, flush=True)
        throughput = {n: (statistics.median(walls[n]), args.trials * 3600 / statistics.median(walls[n])) for n in walls}
    finally:
        server.stop()

    S, M = len(samplers), len(seeds)
    command = " ".join(["python benchmarks/orchestration.py", *argv])
    lines = [
        f"Command: `{command}`, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, no GPU, {platform.machine()}; "
        f"whole run {(time.perf_counter() - total) / 60:.1f} min (5-min load average {os.getloadavg()[1]:.1f} at the end). "
        f"Small digits models ({args.steps} training steps, 16 samples, no FID or bits/dim), local Ray unless said.",
        "",
        f"**Train once, evaluate many**: S = {S} samplers ({', '.join(samplers)}) x M = {M} seeds.",
        "",
        "| | training runs | wall time |",
        "|---|---|---|",
        f"| one sweep, train once | {trained_once} (= M) | {once:.0f} s |",
        f"| plain grid ({S} sweeps of {M} trials, `--no-cache`) | {trained_plain} (= S x M) | {plain:.0f} s |",
        f"| ratio | {trained_plain / trained_once:.1f}x | {plain / once:.2f}x |",
        "",
        "**Overhead per trial** (seconds; the train-once sweep):",
        "",
        f"- Ray and driver start-up, parent run created -> first training run created: {costs['ray']:.1f}",
        f"- task start on its worker -> training loop (`startup_seconds`: MLflow run and params, data, network): "
        f"{describe(costs['startup'])}",
        f"- last evaluation metric -> evaluation run FINISHED: {describe(costs['end'])}",
        "",
        f"**Throughput**: {args.trials} trials (one model each, 1 CPU each) on a Ray cluster of one node against two "
        "(orchestrator.localcluster: `ray start` nodes of 1 CPU each, both on this 2-core machine), "
        f"{args.repeats} runs each in alternating order ({', '.join(map(str, order))} nodes), fresh seeds every run:",
        "",
        "| nodes | wall time, median (runs) | trials per hour | training loop per model, mean |",
        "|---|---|---|---|",
        *[f"| {n} | {throughput[n][0]:.0f} s ({', '.join(f'{w:.0f}' for w in walls[n])}) | {throughput[n][1]:.0f} | "
          f"{statistics.mean(training[n]):.1f} s |" for n in (1, 2)],
        f"| ratio (2 / 1) | | {throughput[2][1] / throughput[1][1]:.2f}x | |",
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section(section, BEGIN, END, "Orchestration: train once, overhead, nodes (`make bench-orchestration`)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
