"""The GPU check: run on a machine with a CUDA GPU, it takes under 10 minutes and prints, for each part, images/s,
MFU and peak memory.

1. Throughput at 32x32: the training step (forward, eps-MSE loss, backward, fused Adam) of the CIFAR-10 U-Net of
   ``sweeps/cifar10_ddpm.yaml`` (Ho et al.'s, 35.7M parameters) and of its 64-channel shrink, in float32 (TF32
   where the GPU has it), under bfloat16 autocast, and under bfloat16 autocast with ``torch.compile`` (its compile
   time printed apart). MFU is the model FLOPs (``diffusion.modelsize``) per second over the matrix-product peak
   measured in the same run at the same precision.
2. A two-trial sweep at ``resources.gpu: 0.5``: two DDPM trials of the smoke sweep share one GPU; their training
   runs' times say whether they ran at once, and each logs its own images/s and peak memory.
3. With two GPUs or more: the same model trained by 1 worker and by 2 (``resources.workers``: Ray Train, DDP on
   NCCL), one after the other, with each training's images/s and peak memory.

Without a CUDA GPU it says so and exits 0. ``--device cpu`` runs the same code on the CPU, shrunk, as the test
suite does (tests/test_gpu_check.py).

    python benchmarks/gpu.py [--device cuda|cpu] [--steps N] [--no-sweep] [--no-ho]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffusion.config import ModelConfig  # noqa: E402
from diffusion.modelsize import human, model_size  # noqa: E402
from diffusion.nets import build_network  # noqa: E402

HO_CIFAR10 = dict(arch="unet", layout="ddpm", channels=128, channel_mult=[1, 2, 2, 2], num_res_blocks=2,
                  attention=True, attention_resolutions=[16], resample="conv", groups=32, dropout=0.1)


@dataclass
class Case:
    name: str
    model: dict
    batch: int


def cases(device: torch.device, ho: bool) -> list[Case]:
    if device.type == "cpu":  # the same code, shrunk to seconds
        return [Case("cifar10 U-Net, 16 channels", {**HO_CIFAR10, "channels": 16, "groups": 8}, batch=2)]
    found = [Case("cifar10 U-Net, 64 channels", {**HO_CIFAR10, "channels": 64}, batch=128)]
    if ho:
        found.append(Case("cifar10 U-Net (Ho et al., 35.7M)", HO_CIFAR10, batch=128))
    return found


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Seconds per call: the median of ``repeats`` timed calls after one untimed one."""
    run()
    synchronize(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matrix product at this precision (float32: TF32 where allowed)."""
    n = 4096 if device.type == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = timed(lambda: a @ b, device, 5)
    return 2 * n ** 3 / seconds


def train_step(network, batch: int, device: torch.device, autocast: bool) -> Callable[[], None]:
    """One training step of eps-prediction with the simple loss on random images: forward, backward, fused Adam."""
    optimizer = torch.optim.Adam(network.parameters(), lr=2e-4, fused=device.type == "cuda")
    x0 = torch.randn(batch, 3, 32, 32, device=device)

    def step() -> None:
        t = torch.rand(batch, device=device)
        eps = torch.randn_like(x0)
        alpha = torch.cos(t * torch.pi / 2)[:, None, None, None]
        sigma = torch.sin(t * torch.pi / 2)[:, None, None, None]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = (network(alpha * x0 + sigma * eps, t) - eps).float().pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def throughput(case: Case, device: torch.device, steps: int, compile_ok: bool) -> list[str]:
    cfg = ModelConfig(**case.model)
    size = model_size(cfg, (3, 32, 32))
    flops = size.step_flops(case.batch) * steps
    peaks = {torch.float32: matmul_peak(device, torch.float32), torch.bfloat16: matmul_peak(device, torch.bfloat16)}
    rows = []
    modes = [("float32" + (" (TF32)" if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else ""),
              False, False), ("bf16 autocast", True, False)]
    if compile_ok:
        modes.append(("bf16 autocast + compile", True, True))
    for label, autocast, compiled in modes:
        torch.manual_seed(0)
        network = build_network(cfg, (3, 32, 32)).to(device)
        if device.type == "cpu":
            network = network.to(memory_format=torch.channels_last)
        run_network = network
        compile_seconds = None
        if compiled:
            run_network = torch.compile(network, dynamic=False)
        step = train_step(run_network, case.batch, device, autocast)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if compiled:
            started = time.perf_counter()
            step()
            synchronize(device)
            compile_seconds = time.perf_counter() - started

        def block() -> None:
            for _ in range(steps):
                step()

        seconds = timed(block, device, 3)
        peak_memory = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
        mfu = flops / seconds / peaks[torch.bfloat16 if autocast else torch.float32]
        rows.append(f"| {case.name} | {label} | {case.batch * steps / seconds:,.1f} | {100 * mfu:.0f}% | "
                    f"{'-' if peak_memory is None else f'{peak_memory:.2f}'} | "
                    f"{'-' if compile_seconds is None else f'{compile_seconds:.0f}'} |")
        network = run_network = step = None  # the next precision's network starts on a free device
        if device.type == "cuda":
            torch.cuda.empty_cache()
    header = [f"{case.name}: {human(size.parameters)} parameters, {human(size.step_flops(case.batch), 'FLOP')} per "
              f"step of {case.batch}; matmul peak float32 {human(peaks[torch.float32], 'FLOP/s')}, bfloat16 "
              f"{human(peaks[torch.bfloat16], 'FLOP/s')}", "",
              "| network | precision | train img/s | MFU | peak memory (GiB) | compile (s) |", "|---|---|---|---|---|---|"]
    return header + rows + [""]


def run_sweep(name: str, device: torch.device, workdir: str, resources: dict, grid: dict, max_concurrent: int):
    """The smoke sweep's DDPM with ``resources`` and ``grid`` in ``workdir`` with its own MLflow store (300 steps of
    128 on CUDA, 20 on the CPU); returns (its training runs, wall seconds, steps) or (None, the failure's lines)."""
    from mlflow.tracking import MlflowClient

    smoke = yaml.safe_load(open(os.path.join(ROOT, "sweeps", "smoke.yaml")))
    base = {**smoke["base"], **smoke["variants"]["ddpm"]}
    steps = 300 if device.type == "cuda" else 20
    base["train"] = {**base["train"], "steps": steps, "batch_size": 128}
    base["eval"] = {"fid": False, "bpd": False}
    base["resources"] = resources
    path = os.path.join(workdir, f"{name}.yaml")
    with open(path, "w") as handle:
        yaml.safe_dump({"name": name, "base": base, "grid": grid, "max_concurrent": max_concurrent}, handle)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", path], cwd=workdir, env=env,
                            capture_output=True, text=True)
    wall = time.time() - started
    if result.returncode != 0:
        return None, [f"sweep {name}: FAILED (exit {result.returncode})", result.stdout[-2000:], result.stderr[-2000:]]
    client = MlflowClient(f"sqlite:///{os.path.join(workdir, 'mlflow.db')}")
    experiment = client.get_experiment_by_name(name)
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("stage") == "train"]
    return runs, (wall, steps)


def run_rows(runs, param: str) -> list[str]:
    """A table row per training run: the grid value, images/s and peak memory."""
    lines = ["| trial | train img/s | peak memory (MiB) |", "|---|---|---|"]
    for run in sorted(runs, key=lambda r: r.data.params.get(param, "")):
        metrics = run.data.metrics
        memory = metrics.get("train_peak_memory_mb")
        lines.append(f"| {param}={run.data.params.get(param, '1')} | {metrics['train_examples_per_second']:,.1f} | "
                     f"{'-' if memory is None else f'{memory:.0f}'} |")
    return lines + [""]


def shared_gpu_sweep(device: torch.device, workdir: str) -> list[str]:
    """Two trials of the smoke sweep's DDPM at ``resources.gpu: 0.5`` (on the CPU: ``gpu: 0``); their training runs'
    intervals, images/s and peak memory."""
    resources = ({"cpu": 1, "gpu": 0.5, "device": "cuda"} if device.type == "cuda"
                 else {"cpu": 1, "gpu": 0, "device": "cpu"})
    runs, figures = run_sweep("shared_gpu", device, workdir, resources, {"seed": [0, 1]}, 2)
    if runs is None:
        return figures
    wall, steps = figures
    intervals = sorted((r.info.start_time / 1000, r.info.end_time / 1000) for r in runs)
    overlap = max(0.0, min(end for _, end in intervals) - max(start for start, _ in intervals)) if len(runs) == 2 else 0
    return [f"two-trial sweep at resources.gpu {resources['gpu']} (the smoke sweep's DDPM, {steps} steps of 128): "
            f"{wall:.0f} s wall; the two trainings overlapped for {overlap:.0f} s", "", *run_rows(runs, "seed")]


def data_parallel_sweep(device: torch.device, workdir: str) -> list[str]:
    """The smoke sweep's DDPM trained on 1 GPU and on 2 (``resources.workers``, Ray Train with NCCL), one after the
    other, at the same global batch; each training's images/s (rank 0's view of the global batch) and memory."""
    resources = {"cpu": 1, "gpu": 1, "device": "cuda"}
    runs, figures = run_sweep("data_parallel", device, workdir, resources, {"resources.workers": [1, 2]}, 1)
    if runs is None:
        return figures
    wall, steps = figures
    return [f"data-parallel sweep, 1 worker then 2 workers of one GPU each ({steps} steps of 128): {wall:.0f} s wall",
            "", *run_rows(runs, "data_parallel_workers")]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=None, help="training steps per timed block (cuda 20, cpu 1)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the two-trial sweep")
    parser.add_argument("--no-ho", action="store_true", help="skip the full 35.7M network")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to check")
        return 0
    from diffusion.training import select_device

    device = select_device(args.device)  # on CUDA: TF32 allowed, as in a trial
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu check on {name}, torch {torch.__version__}\n")
    started = time.time()
    steps = args.steps or (20 if device.type == "cuda" else 1)
    for case in cases(device, not args.no_ho):
        print("\n".join(throughput(case, device, steps, compile_ok=not args.no_compile)), flush=True)
    if not args.no_sweep:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
            print("\n".join(shared_gpu_sweep(device, workdir)), flush=True)
    if device.type == "cuda" and torch.cuda.device_count() >= 2 and not args.no_sweep:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
            print("\n".join(data_parallel_sweep(device, workdir)), flush=True)
    elif device.type == "cuda":
        print("2-worker data-parallel trial: not run (one GPU)")
    print(f"\ngpu check done in {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
