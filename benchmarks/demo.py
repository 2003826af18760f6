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
        children = client.search_runs([experiment.experiment_id], filter_string="tags.`mlflow.parentRunId` != ''",
                                      max_results=1000)
    finally:
        server.stop()
    children = [r for r in children if "mlflow.parentRunId" in r.data.tags]
    training = {r.info.run_id: r for r in children if r.data.tags.get("stage") == "train"}
    runs = sorted((r for r in children if r.data.tags.get("stage") == "evaluate"), key=lambda r: r.data.tags["trial"])
    shown = " ".join(["orchestrator sweep", sweep_file, *args])
    lines = [
        f"Command: `python benchmarks/demo.py {' '.join([sweep_file, *args])}` (runs `{shown}`), "
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, "
        f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}, torch {torch.__version__}, {platform.machine()}.",
        "",
        f"Wall time of the whole sweep (Ray and MLflow start-up included): **{wall / 60:.1f} min** "
        f"for {len(sweep.trials)} trials ({len(training)} model(s) trained), exit status {result.returncode}.",
        "",
        "| trial | status | train steps | train img/s | train s | sample s | NFE | FID ± stderr | fid_reference "
        "| FID / floor | fid_inf | KID ± stderr | bpd_ode ± stderr | bpd_elbo | bpd s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        trained = training.get(run.data.tags.get("training_run_id"))
        m, p = {**(trained.data.metrics if trained else {}), **run.data.metrics}, run.data.params
        ratio = m["fid"] / m["fid_reference"] if m.get("fid") and m.get("fid_reference") else None
        cells = [run.data.tags["trial"], run.info.status, p.get("train.steps"),
                 _number(m.get("train_examples_per_second"), 0), _number(m.get("train_seconds"), 0),
                 _number(m.get("sample_seconds"), 0), _number(m.get("sample_nfe"), 0),
                 _pm(m, "fid", 3), _number(m.get("fid_reference"), 3), _number(ratio, 1), _number(m.get("fid_inf"), 3),
                 _pm(m, "kid", 4), _pm(m, "bpd_ode", 3), _number(m.get("bpd_elbo"), 3),
                 _number(m.get("bpd_seconds"), 0)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    extra = [name for name in EXTRA if any(name in run.data.metrics for run in runs)]
    if extra:  # what only some sweeps measure: guidance's class metrics, the VAE's record, inverse problems
        lines += ["", "| trial | " + " | ".join(extra) + " |", "|---" * (len(extra) + 1) + "|"]
        for run in runs:
            lines.append("| " + " | ".join([run.data.tags["trial"]] + [_number(run.data.metrics.get(k), 3) for k in extra]) + " |")
    skipped = sorted({run.data.tags["bpd.skipped"] for run in runs if "bpd.skipped" in run.data.tags})
    lines += ["", *[f"bpd.skipped: {reason}" for reason in skipped]] if skipped else []
    tags = runs[0].data.tags if runs else {}
    lines += ["", f"FID features: {tags.get('fid.extractor')} (test accuracy {tags.get('fid.classifier_accuracy')}), "
              f"{tags.get('fid.n')} samples against the {tags.get('fid.reference_split')} split; "
              "fid_reference is the FID of as many real test images against the same statistics."]
    lines += _verdicts(os.path.join(workdir, "reports", sweep.name, "report.md"))
    report = "\n".join(lines)
    print(report)
    _write(report, sweep.name, sweep_file)
    return result.returncode


EXTRA = ("class_accuracy", "class_accuracy_reference", "fid_class_mean", "fid_class_reference_mean", "vae_recon_psnr",
         "vae_kl", "inpaint_psnr", "inpaint_psnr_observed", "inpaint_ssim", "denoise_psnr", "denoise_psnr_observed",
         "denoise_ssim")


def _verdicts(report_md: str) -> list[str]:
    """The sweep report's verdicts (``orchestrator.report``), as it wrote them."""
    if not os.path.exists(report_md):
        return ["", f"(no report at {report_md})"]
    text = open(report_md, encoding="utf-8").read()
    if "## Verdicts" not in text:
        return []
    block = text.split("## Verdicts", 1)[1].strip().split("\n\n")[0]
    return ["", "Verdicts of the sweep's report (`reports/<sweep>/report.md`):", "", block]


def _pm(metrics: dict, name: str, digits: int) -> str:
    """``3.497 ± 1.201``: a metric with its standard error where it has one."""
    value, stderr = metrics.get(name), metrics.get(f"{name}_stderr")
    return _number(value, digits) + ("" if stderr is None else f" ± {_number(stderr, digits)}")


def _number(value, digits: int) -> str:
    """A metric for the table; "-" where a trial has none (e.g. bpd_elbo in continuous time)."""
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def _write(report: str, sweep_name: str, sweep_file: str) -> None:
    begin, end = markers(sweep_name)
    write_section(report, begin, end, f"Sweep `{sweep_file}`")


if __name__ == "__main__":
    sys.exit(main())
