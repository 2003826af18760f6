"""Benchmark a sweep end to end: wall time, training throughput and each trial's FID against its floor.

    python benchmarks/demo.py [SWEEP] [key=value ...]

Runs `orchestrator sweep` on the sweep file (default sweeps/ddpm_vs_ncsn.yaml, the demo) in a fresh
temporary directory, reads every trial back from MLflow, prints a Markdown report and writes it
into docs/BENCHMARKS.md between the sweep's markers (``<!-- demo:begin -->`` for the demo,
``<!-- sweep:NAME:begin -->`` for the others; a missing section is appended).
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time

import torch
from mlflow.tracking import MlflowClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from orchestrator.sweepfile import load_sweep  # noqa: E402
from orchestrator.tracking import LocalServer  # noqa: E402
from report import write_section  # noqa: E402  (benchmarks/report.py)



def markers(sweep_name: str) -> tuple[str, str]:
    tag = "demo" if sweep_name == "ddpm_vs_ncsn" else f"sweep:{sweep_name}"
    return f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"


def main() -> int:
    args = sys.argv[1:]
    sweep_file = args.pop(0) if args and not "=" in args[0] else os.path.join("sweeps", "ddpm_vs_ncsn.yaml")
    sweep = load_sweep(os.path.join(ROOT, sweep_file) if not os.path.isabs(sweep_file) else sweep_file, args)
    workdir = tempfile.mkdtemp(prefix="bench-demo-")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = ROOT
    command = [sys.executable, "-m", "orchestrator", "sweep", os.path.abspath(os.path.join(ROOT, sweep_file)), *args]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=workdir, env=env)
    wall = time.perf_counter() - started
    server = LocalServer(workdir).start()
    try:
        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name(sweep.name)
        runs = client.search_runs([experiment.experiment_id], filter_string="tags.`mlflow.parentRunId` != ''")
    finally:
        server.stop()
    runs = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.data.tags["trial"])
    shown = " ".join(["orchestrator sweep", sweep_file, *args])
    lines = [
        f"Command: `python benchmarks/demo.py {' '.join([sweep_file, *args])}` (runs `{shown}`), "
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, "
        f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}, torch {torch.__version__}, {platform.machine()}.",
        "",
        f"Wall time of the whole sweep (Ray and MLflow start-up included): **{wall / 60:.1f} min** "
        f"for {len(sweep.trials)} trials, exit status {result.returncode}.",
        "",
        "| trial | status | train steps | train img/s | train s | sample s | NFE | FID | fid_reference | FID / floor "
        "| KID | bpd_ode | bpd_elbo | bpd s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        m, p = run.data.metrics, run.data.params
        ratio = m["fid"] / m["fid_reference"] if m.get("fid") and m.get("fid_reference") else float("nan")
        lines.append(
            f"| {run.data.tags['trial']} | {run.info.status} | {p.get('train.steps')} "
            f"| {m.get('train_examples_per_second', float('nan')):.0f} | {m.get('train_seconds', float('nan')):.0f} "
            f"| {m.get('sample_seconds', float('nan')):.0f} | {m.get('sample_nfe', float('nan')):.0f} "
            f"| {m.get('fid', float('nan')):.3f} | {m.get('fid_reference', float('nan')):.3f} | {ratio:.1f} "
            f"| {m.get('kid', float('nan')):.4f} | {m.get('bpd_ode', float('nan')):.3f} "
            f"| {m.get('bpd_elbo', float('nan')):.3f} | {m.get('bpd_seconds', float('nan')):.0f} |"
        )
    tags = runs[0].data.tags if runs else {}
    lines += ["", f"FID features: {tags.get('fid.extractor')} (test accuracy {tags.get('fid.classifier_accuracy')}), "
              f"{tags.get('fid.n')} samples against the {tags.get('fid.reference_split')} split; "
              "fid_reference is the FID of as many real test images against the same statistics."]
    report = "\n".join(lines)
    print(report)
    _write(report, sweep.name, sweep_file)
    return result.returncode


def _write(report: str, sweep_name: str, sweep_file: str) -> None:
    begin, end = markers(sweep_name)
    write_section(report, begin, end, f"Sweep `{sweep_file}`")


if __name__ == "__main__":
    sys.exit(main())
