"""What training in bfloat16 does to FID: the demo's DDPM trained in fp32 and under bf16 autocast, compared.

    python benchmarks/bf16_fid.py [--steps 400] [--seeds 0 1] [--out FILE | --no-write]

The DDPM of ``sweeps/ddpm_vs_ncsn.yaml`` (its network, optimizer, process and data; one torch thread) trained for
``--steps`` steps per seed twice, as ``resources.amp: false`` and ``resources.amp: true`` (bf16 autocast of the
training step, the same seed, so the same initial weights, batches, times and noise: only the precision differs). Both
EMA models then sample in fp32 (DDIM, 100 steps, the demo's 720 samples) and are measured with the demo's FID
(classifier features against the train split, with its standard error). Figures: each seed's FID in fp32 and bf16
with stderrs, the difference with its z, the mean difference over seeds, and the training time of each (bf16 is
emulated on a CPU without AMX: much slower). The Markdown report is printed and written into docs/BENCHMARKS.md
between the bf16-fid markers.
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
from diffusion.data import load_dataset  # noqa: E402
from diffusion.metrics import compute_fid  # noqa: E402
from diffusion.training import build_trainer  # noqa: E402
from orchestrator.sweepfile import load_sweep  # noqa: E402
from report import output_options, publish  # noqa: E402  (benchmarks/report.py)

BEGIN, END = "<!-- bf16-fid:begin -->", "<!-- bf16-fid:end -->"
HEADING = "bf16 training and FID: the demo's DDPM trained in fp32 and under bf16 autocast (`python benchmarks/bf16_fid.py`)"


def measure(cfg, dataset, amp: bool) -> dict:
    trainer = build_trainer(cfg, dataset, torch.device("cpu"), amp)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    trainer.amp = False  # both models sample in fp32: the difference is the training's
    samples, _ = trainer.sample(cfg.sample.n, seed=cfg.seed + 1)
    e = cfg.eval
    fid = compute_fid(samples, dataset, extractor=e.extractor, reference=e.reference, reference_split=e.reference_split,
                      kid=False, classifier_steps=e.classifier_steps, cache_dir=e.cache_dir, fid_inf=False)
    return {"fid": fid.fid, "stderr": fid.fid_stderr, "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    output_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sweep = load_sweep(os.path.join(ROOT, "sweeps", "ddpm_vs_ncsn.yaml"),
                       [f"base.train.steps={args.steps}", "variants.ddpm.sample.sampler=ddim",
                        "variants.ddpm.sample.steps=100"])
    total = time.perf_counter()
    rows, differences = [], []
    for seed in args.seeds:
        cfg = next(t.config for t in sweep.trials if t.variant == "ddpm" and t.config.seed == seed)
        dataset = load_dataset(cfg.data)
        fp32, bf16 = measure(cfg, dataset, False), measure(cfg, dataset, True)
        difference = bf16["fid"] - fp32["fid"]
        z = difference / math.hypot(fp32["stderr"], bf16["stderr"])
        differences.append(difference)
        rows.append(f"| {seed} | {fp32['fid']:.2f} ± {fp32['stderr']:.2f} | {bf16['fid']:.2f} ± {bf16['stderr']:.2f} | "
                    f"{difference:+.2f} (z = {z:+.2f}) | {fp32['seconds']:.0f} | {bf16['seconds']:.0f} "
                    f"({bf16['seconds'] / fp32['seconds']:.1f}x) |")
        print(rows[-1], file=sys.stderr, flush=True)
    command = " ".join(["python benchmarks/bf16_fid.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"Measured by `{command}` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
             f"one torch thread; whole run {(time.perf_counter() - total) / 60:.1f} min. The demo's DDPM, {args.steps} "
             "training steps per seed in fp32 and under bf16 autocast (same seed: same weights, batches and noise), "
             "both sampled in fp32 (DDIM, 100 steps, 720 samples), FID in the classifier's features against the "
             "train split.", "",
             "| seed | FID, fp32 training | FID, bf16 training | bf16 - fp32 | fp32 training (s) | bf16 training (s) |",
             "|---|---|---|---|---|---|", *rows, "",
             f"Mean difference over {len(differences)} seed(s): {sum(differences) / len(differences):+.2f} FID."]
    publish("\n".join(lines), args, BEGIN, END, HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
