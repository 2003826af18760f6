"""What FID during training (``eval.every``) costs: its seconds over the training's own, on the demo's DDPM.

    python benchmarks/fid_during_training.py [--every 500] [--steps 1500] [--out FILE | --no-write]

Trains the DDPM of ``sweeps/ddpm_vs_ncsn.yaml`` (seed 0, one torch thread, as a sweep's trial at ``cpu: 1``) with
``eval.every`` and the other options at their defaults (``eval.every_n`` 256 samples of DDIM at 50 steps, FID and
KID against the train split in the classifier's features, prepared once before training as a sweep's FID task
does). The training's time is the step loop less the measurements; the ratio is the measurements' over it. The FID
curve is printed too (it should fall). The Markdown report is printed and written into docs/BENCHMARKS.md between
the fid-during-training markers.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from diffusion.data import load_dataset  # noqa: E402
from diffusion.evaluation import fid_during_training  # noqa: E402
from diffusion.metrics import get_extractor, reference_features  # noqa: E402
from diffusion.training import build_trainer  # noqa: E402
from orchestrator.sweepfile import load_sweep  # noqa: E402
from report import output_options, publish  # noqa: E402  (benchmarks/report.py)

BEGIN, END = "<!-- fid-during-training:begin -->", "<!-- fid-during-training:end -->"
HEADING = "FID during training (`eval.every`): its cost on the demo's DDPM (`make bench-fid-during-training`)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--steps", type=int, default=1500)
    output_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sweep = load_sweep(os.path.join(ROOT, "sweeps", "ddpm_vs_ncsn.yaml"),
                       [f"base.eval.every={args.every}", f"base.train.steps={args.steps}"])
    cfg = next(t.config for t in sweep.trials if t.variant == "ddpm" and t.config.seed == 0)
    dataset = load_dataset(cfg.data)
    name, extract, info = get_extractor(cfg.eval.extractor, dataset, classifier_steps=cfg.eval.classifier_steps,
                                        cache_dir=cfg.eval.cache_dir)  # FID's preparation: not training's cost
    reference_features(dataset, cfg.eval.reference_split, name, extract, info, cfg.eval.cache_dir)
    trainer = build_trainer(cfg, dataset, torch.device("cpu"), cfg.resources.amp)
    curve = []

    def on_eval(step: int) -> None:
        curve.append((step, fid_during_training(trainer, dataset, cfg)))

    started = time.perf_counter()
    trainer.train(on_eval=on_eval)
    total = time.perf_counter() - started
    measuring = sum(metrics["every_seconds"] for _, metrics in curve)
    training = total - measuring
    lines = [f"Measured by `python benchmarks/fid_during_training.py --every {args.every} --steps {args.steps}` on "
             f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, 1 torch thread), torch "
             f"{torch.__version__}: the demo's DDPM (batch 128), `eval.every: {args.every}` with the defaults "
             f"(`every_n` {cfg.eval.every_n}, `{cfg.eval.every_sampler}` at 50 steps, FID and KID in the "
             f"`{name}` features).", "",
             "| training steps | training s | measurements | measuring s | cost over training |", "|---|---|---|---|---|",
             f"| {args.steps} | {training:.1f} | {len(curve)} | {measuring:.1f} | {100 * measuring / training:.1f}% |",
             "", "| step | FID | KID | seconds |", "|---|---|---|---|"]
    lines += [f"| {step} | {m['fid']:.2f} | {m.get('kid', float('nan')):.4f} | {m['every_seconds']:.1f} |"
              for step, m in curve]
    text = "\n".join(lines)
    publish(text, args, BEGIN, END, HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
