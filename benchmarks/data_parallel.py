"""Data-parallel training on this machine's cores: 1 worker against 2 (``resources.workers``), at the same global batch.

    python benchmarks/data_parallel.py [--repeats 3] [--steps 30] [--out FILE | --no-write]

Contenders, each training the same model on the same global batch with ``Trainer`` (``diffusion.distributed`` for
two processes, on gloo, as a sweep's Ray Train workers are):

- ``1 worker, 1 thread``: one process, ``torch.set_num_threads(1)``;
- ``1 worker, 2 threads``: one process using both cores (``resources.cpu: 2``, ``workers: 1``);
- ``2 workers, 1 thread each``: two processes, each evaluating half of every batch (``cpu: 1``, ``workers: 2``).

Cases: ``8x8``, the demo's network on the digits at batch 128; ``32x32``, the CIFAR-like network shrunk to fit a
CPU (channels 32, mult [1, 2, 2, 2], attention at the lowest resolution, as in throughput.py) on random 3x32x32 images at batch 32. Each repeat times
every contender in turn (``--steps`` steps after 3 of warm-up, the processes started beforehand), so a slow phase
of the machine hits them alike; figures are medians, ratios medians of per-repeat ratios. Ray Train's start of a
worker group (about 15 s on this machine) is a fixed cost per training, not included: see the sweep test
tests/test_parallel.py. The Markdown report is printed and written into docs/BENCHMARKS.md between the
data-parallel markers.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from diffusion.config import DataConfig, ModelConfig, ProcessConfig, TrainConfig, TrialConfig  # noqa: E402
from diffusion.data import Dataset, load_dataset  # noqa: E402
from diffusion.training import Trainer  # noqa: E402
from report import output_options, publish  # noqa: E402  (benchmarks/report.py)

BEGIN, END = "<!-- data-parallel:begin -->", "<!-- data-parallel:end -->"
HEADING = "Data-parallel training: 1 worker against 2 on this 2-core CPU (`make bench-data-parallel`)"
CONTENDERS = [("1 worker, 1 thread", 1, 1), ("1 worker, 2 threads", 1, 2), ("2 workers, 1 thread each", 2, 1)]


def case(name: str) -> tuple[TrialConfig, Dataset]:
    if name == "8x8":
        cfg = TrialConfig(data=DataConfig(name="digits"), process=ProcessConfig(T=1000),
                          model=ModelConfig(channels=32, channel_mult=[1, 2], num_res_blocks=1, attention=True),
                          train=TrainConfig(batch_size=128, warmup=0, log_every=10 ** 6))
        return cfg, load_dataset(cfg.data)
    cfg = TrialConfig(data=DataConfig(name="digits"), process=ProcessConfig(T=1000),
                      model=ModelConfig(channels=32, channel_mult=[1, 2, 2, 2], num_res_blocks=1,
                                        attention=True),
                      train=TrainConfig(batch_size=32, warmup=0, log_every=10 ** 6))
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(512, 3, 32, 32, generator=generator) * 2 - 1
    return cfg, Dataset(name="random32", train=images, test=images[:64], levels=256)


def worker(rank: int, world: int, threads: int, name: str, steps: int, rendezvous: str, commands, results) -> None:
    """Build the case's trainer (joining a group of ``world``), then time ``steps`` steps for every command."""
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    cfg, dataset = case(name)
    trainer = Trainer(cfg, dataset, torch.device("cpu"))
    trainer.data_parallel()
    for _ in range(3):
        trainer.train_step()
    while commands.get() is not None:
        if world > 1:
            dist.barrier()
        started = time.perf_counter()
        for _ in range(steps):
            trainer._step()
        if world > 1:
            dist.barrier()
        if rank == 0:
            results.put(time.perf_counter() - started)
    if world > 1:
        dist.destroy_process_group()


def measure(name: str, repeats: int, steps: int) -> dict[str, list[float]]:
    """images/s of each contender per repeat."""
    context = mp.get_context("spawn")
    batch = case(name)[0].train.batch_size
    pools, rates = [], {label: [] for label, _, _ in CONTENDERS}
    with tempfile.TemporaryDirectory() as tmp:
        for index, (label, world, threads) in enumerate(CONTENDERS):
            commands, results = [context.Queue() for _ in range(world)], context.Queue()
            procs = [context.Process(target=worker, args=(rank, world, threads, name, steps,
                                                           os.path.join(tmp, f"rendezvous{index}"), commands[rank],
                                                           results)) for rank in range(world)]
            for proc in procs:
                proc.start()
            pools.append((label, commands, results, procs))
        for _ in range(repeats):
            for label, commands, results, _ in pools:
                for queue in commands:
                    queue.put(True)
                rates[label].append(steps * batch / results.get())
        for _, commands, _, procs in pools:
            for queue in commands:
                queue.put(None)
            for proc in procs:
                proc.join()
    return rates


def report(figures: dict[str, dict[str, list[float]]], repeats: int, steps: int) -> str:
    base = CONTENDERS[0][0]
    lines = [f"Measured by `python benchmarks/data_parallel.py --repeats {repeats} --steps {steps}` on "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
             "medians over the repeats, ratios medians of per-repeat ratios against 1 worker with 1 thread.", "",
             "| case | contender | training images/s | vs 1 worker, 1 thread |", "|---|---|---|---|"]
    for name, rates in figures.items():
        for label, _, _ in CONTENDERS:
            ratio = statistics.median(a / b for a, b in zip(rates[label], rates[base]))
            lines.append(f"| {name} | {label} | {statistics.median(rates[label]):.0f} | {ratio:.2f}x |")
    lines += ["", "Two workers split every batch and exchange the gathered outputs and the averaged gradients "
              "(gloo, through loopback) at every step; both cores are shared with that traffic. The fair "
              "comparison on one 2-core machine is 2 workers against 1 worker with 2 threads."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cases", nargs="+", default=["8x8", "32x32"])
    output_options(parser)
    args = parser.parse_args(argv)
    figures = {name: measure(name, args.repeats, args.steps) for name in args.cases}
    text = report(figures, args.repeats, args.steps)
    publish(text, args, BEGIN, END, HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
