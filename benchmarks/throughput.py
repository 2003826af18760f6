"""Training and sampling throughput of the U-Net against diffusers' UNet2DModel, MFU and the Trainer's overhead.

    python benchmarks/throughput.py [--threads 1] [--repeats 7] [--quick] [--no-compile] [--no-ho]
                                    [--out FILE | --no-write]

Everything is measured in one process, interleaved: every repeat times each contender in turn (a block of steps
each), so that a slow phase of a noisy CPU hits all of them alike; figures are medians over the repeats and
ratios are medians of the per-repeat ratios. Cases:

- ``8x8``: the demo's network (sweeps/ddpm_vs_ncsn.yaml: channels 32, mult [1, 2], 1 ResBlock per level,
  attention) on 1x8x8 images, batch 128 (the demo's);
- ``32x32``: a CIFAR-like network shrunk to fit a CPU (channels 32, mult [1, 2, 2, 2], 1 ResBlock, attention at
  the lowest resolution) on 3x32x32 images, batch 32;
- ``32x32-ho``: Ho et al.'s CIFAR-10 width and depth (channels 128, mult [1, 2, 2, 2], 2 ResBlocks), timed for
  ONE training step and one sampling call only (``--no-ho`` skips it).

Our networks are built by ``diffusion.nets.build_network(ModelConfig(...), shape)``, so architecture options of
nets.py flow in. Diffusers' ``UNet2DModel`` (``pip install '.[bench]'``) gets the same levels and ResBlocks per
level, attention at the lowest resolution, and the base width whose parameter count is nearest ours.

Figures: training images/s (forward, eps-MSE loss, backward, Adam step), sampling images/s (one network call
under ``torch.inference_mode``, i.e. image-NFE/s), FLOPs per training step and per sampling call from
``torch.utils.flop_counter.FlopCounterMode`` and MFU against the fp32 matmul peak measured in the same run (a
large square matmul timed). Then, on our U-Net: the training-step options (per-tensor, foreach and fused Adam,
channels_last, bf16 autocast, torch.compile with its compile time) against the plain step, and the overhead of
``Trainer.train`` (EMA, clipping, the process's tables, label and time sampling) over a hand-written
forward + backward + Adam step of the same network and loss. The Markdown report is printed and written into
docs/BENCHMARKS.md between the throughput markers (``--out FILE`` elsewhere, ``--no-write`` nowhere).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from diffusion.config import (  # noqa: E402
    DataConfig, EvalConfig, ModelConfig, ProcessConfig, SampleConfig, TrainConfig, TrialConfig,
)
from diffusion.data import Dataset, load_dataset  # noqa: E402
from diffusion.factory import build_process  # noqa: E402
from diffusion.nets import build_network  # noqa: E402
from diffusion.training import ADAM_OPTIONS, Trainer  # noqa: E402
from report import output_options, publish  # noqa: E402  (benchmarks/report.py)

BEGIN, END = "<!-- throughput:begin -->", "<!-- throughput:end -->"
HEADING = "Throughput: training and sampling images/s, MFU, the Trainer's overhead (`make bench-throughput`)"


@dataclass
class Case:
    name: str
    shape: tuple[int, int, int]
    model: dict
    batch: int  # training batch
    sample_batch: int  # images per sampling call
    steps: int  # training steps per timed block
    calls: int  # sampling calls per timed block
    one_step: bool = False  # time one step and one call only (no repeats)


DEMO_MODEL = dict(arch="unet", channels=32, channel_mult=[1, 2], num_res_blocks=1, attention=True)
CASES = [
    Case("8x8", (1, 8, 8), DEMO_MODEL, batch=128, sample_batch=360, steps=5, calls=5),
    Case("32x32", (3, 32, 32), dict(arch="unet", channels=32, channel_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     attention=True), batch=32, sample_batch=64, steps=3, calls=3),
    Case("32x32-ho", (3, 32, 32), dict(arch="unet", channels=128, channel_mult=[1, 2, 2, 2], num_res_blocks=2,
                                        attention=True), batch=16, sample_batch=16, steps=1, calls=1, one_step=True),
]
T = 1000


# --- timing ----------------------------------------------------------------------------------------------
def interleaved(contenders: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each contender: every repeat runs each once, in turn (one warm-up round first)."""
    for run in contenders.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratio(times: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over repeats of time(slow) / time(fast): how many times faster ``fast`` is."""
    return median([a / b for a, b in zip(times[slow], times[fast])])


MATMUL_N, MATMUL_CALLS = 1024, 3
MATMUL_FLOPS = 2 * MATMUL_N**3


def matmul_block(calls: int = MATMUL_CALLS) -> Callable[[], None]:
    """``calls`` fp32 matmuls of two MATMUL_N-square matrices: the peak, timed in every round beside the
    contenders so that MFU divides by the peak of the same moment (other processes share the cores)."""
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    out = torch.empty(MATMUL_N, MATMUL_N)

    def run():
        for _ in range(calls):
            torch.mm(a, b, out=out)
    return run


def with_peak(contenders: dict[str, Callable[[], None]]) -> dict[str, Callable[[], None]]:
    return {**contenders, "matmul peak": matmul_block()}


def peak_rates(times: dict[str, list[float]]) -> list[float]:
    """FLOP/s of the matmul in each round."""
    return [MATMUL_CALLS * MATMUL_FLOPS / t for t in times["matmul peak"]]


def mfu(times: dict[str, list[float]], name: str, flops_per_block: float) -> float:
    """Median over rounds of (FLOPs / time) / (the matmul's FLOP/s in the same round)."""
    return median([flops_per_block / t / peak for t, peak in zip(times[name], peak_rates(times))])


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


# --- networks ----------------------------------------------------------------------------------------------
def parameter_count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def diffusers_unet(case: Case, base: int):
    from diffusers import UNet2DModel

    mult = case.model["channel_mult"]
    widths = tuple(base * m for m in mult)
    levels = len(mult)
    return UNet2DModel(
        sample_size=case.shape[1], in_channels=case.shape[0], out_channels=case.shape[0],
        block_out_channels=widths, layers_per_block=case.model["num_res_blocks"],
        down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        norm_num_groups=8, attention_head_dim=widths[-1],  # one head, as ours
    )


def matched_diffusers(case: Case, target: int):
    """Diffusers' UNet2DModel with the base width (a multiple of 8) whose parameter count is nearest ``target``."""
    best = None
    for base in range(8, 4 * case.model["channels"] + 1, 8):  # the count grows with the width: stop past the target
        count = parameter_count(diffusers_unet(case, base))
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (base, count)
        if count > target:
            break
    torch.manual_seed(0)
    return diffusers_unet(case, best[0]), best[0]


class Diffusers(torch.nn.Module):
    """UNet2DModel with our signature: (x, t in [0, 1]) -> eps; it is fed the step index t T, as its users do."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x, t * T).sample


# --- steps ------------------------------------------------------------------------------------------------
class BareStep:
    """A hand-written DDPM training step (Ho et al. 2020, Algorithm 1, eps-MSE) of ``net`` on ``data``: batch and
    times drawn on the data's device, float32 tables, forward, backward, Adam."""

    def __init__(self, net, data: torch.Tensor, batch: int, *, adam: Optional[dict] = None, autocast: bool = False,
                 channels_last: bool = False, compile: bool = False):
        process = build_process(ProcessConfig(), tuple(data.shape[1:]))
        self.alphas, self.sigmas = process.alphas.float(), process.sigmas.float()
        self.net, self.data, self.batch, self.autocast = net, data, batch, autocast
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
            self.data = self.data.contiguous(memory_format=torch.channels_last)
        self.model = torch.compile(self.net, dynamic=False) if compile else self.net
        self.optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, **(ADAM_OPTIONS if adam is None else adam))
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self) -> torch.Tensor:
        g = self.generator
        x0 = self.data[torch.randint(len(self.data), (self.batch,), generator=g)]
        i = torch.randint(1, T + 1, (self.batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g).contiguous(memory_format=torch.preserve_format)
        x_t = self.alphas[i].view(-1, 1, 1, 1) * x0 + self.sigmas[i].view(-1, 1, 1, 1) * eps
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = F.mse_loss(self.model(x_t, i.float() / T).float(), eps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def repeat(run: Callable[[], object], k: int) -> Callable[[], None]:
    def block():
        for _ in range(k):
            run()
    return block


def sampler_call(net, shape, batch: int, *, mode: str = "inference") -> Callable[[], None]:
    x = torch.randn(batch, *shape)
    t = torch.full((batch,), 0.5)
    context = torch.inference_mode if mode == "inference" else torch.no_grad

    def call():
        with context():
            net(x, t)
    net.eval()
    return call


def step_flops(net, data: torch.Tensor, batch: int) -> tuple[int, int]:
    """(FLOPs of one training step's forward + backward, FLOPs of one forward at ``batch``) by FlopCounterMode."""
    step = BareStep(net, data, batch)
    with FlopCounterMode(display=False) as counter:
        step()
    train = counter.get_total_flops()
    x, t = torch.randn(batch, *data.shape[1:]), torch.full((batch,), 0.5)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, t)
    return train, counter.get_total_flops()


def synthetic(shape: tuple[int, int, int], n: int = 2048) -> Dataset:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, *shape, generator=g) * 2 - 1
    return Dataset(name="cifar10", train=images, test=images[:256], levels=256)


def dataset_for(case: Case) -> Dataset:
    return load_dataset(DataConfig(name="digits")) if case.shape == (1, 8, 8) else synthetic(case.shape)


# --- the report ------------------------------------------------------------------------------------------------
def fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def compare_with_diffusers(case: Case, peaks: list[float], repeats: int) -> tuple[list[str], dict]:
    data = dataset_for(case).train
    torch.manual_seed(0)
    ours = build_network(ModelConfig(**case.model), case.shape)
    theirs, base = matched_diffusers(case, parameter_count(ours))
    theirs = Diffusers(theirs)
    flops = {"ours": step_flops(ours, data, case.batch), "diffusers": step_flops(theirs, data, case.batch)}
    sample_flops = {name: step_flops(net, data, case.sample_batch)[1] for name, net in (("ours", ours), ("diffusers", theirs))}
    steps = {"ours": repeat(BareStep(ours, data, case.batch), case.steps),
             "diffusers": repeat(BareStep(theirs, data, case.batch), case.steps)}
    calls = {"ours": repeat(sampler_call(ours, case.shape, case.sample_batch), case.calls),
             "diffusers": repeat(sampler_call(theirs, case.shape, case.sample_batch), case.calls)}
    reps = 1 if case.one_step else repeats
    train_times = interleaved(with_peak(steps), reps)
    sample_times = interleaved(with_peak(calls), reps)
    peaks += peak_rates(train_times) + peak_rates(sample_times)
    rows, figures = [], {}
    for name, net in (("ours", ours), ("diffusers", theirs)):
        step_s = median(train_times[name]) / case.steps
        call_s = median(sample_times[name]) / case.calls
        train_mfu = mfu(train_times, name, flops[name][0] * case.steps)
        sample_mfu = mfu(sample_times, name, sample_flops[name] * case.calls)
        figures[name] = dict(train_ips=case.batch / step_s, sample_ips=case.sample_batch / call_s, mfu=train_mfu)
        label = "ours (build_network)" if name == "ours" else f"diffusers UNet2DModel (base {base})"
        rows.append(f"| {case.name} | {label} | {parameter_count(net) / 1e6:.3f} M | "
                    f"{flops[name][0] / case.batch / 1e6:,.1f} | {fmt(case.batch / step_s)} | {100 * train_mfu:.0f}% | "
                    f"{fmt(case.sample_batch / call_s)} | {100 * sample_mfu:.0f}% |")
    train_ratio = ratio(train_times, "diffusers", "ours")
    sample_ratio = ratio(sample_times, "diffusers", "ours")
    figures["train_ratio"], figures["sample_ratio"] = train_ratio, sample_ratio
    rows.append(f"| {case.name} | **ours / diffusers** | | {flops['ours'][0] / flops['diffusers'][0]:.2f}x FLOPs | "
                f"**{train_ratio:.2f}x** | | **{sample_ratio:.2f}x** | |")
    return rows, figures


def step_options(case: Case, peaks: list[float], repeats: int, compile: bool) -> list[str]:
    """Our U-Net's bare training step under each option, interleaved, against the per-tensor-Adam fp32 step."""
    data = dataset_for(case).train

    def net():
        torch.manual_seed(0)
        return build_network(ModelConfig(**case.model), case.shape)

    flops = step_flops(net(), data, case.batch)[0]
    variants = {
        "per-tensor Adam (foreach=False)": BareStep(net(), data, case.batch, adam={"foreach": False}),
        "foreach Adam": BareStep(net(), data, case.batch, adam={"foreach": True}),
        "fused Adam": BareStep(net(), data, case.batch, adam={"fused": True}),
        f"Trainer's Adam {ADAM_OPTIONS} + channels_last": BareStep(net(), data, case.batch, channels_last=True),
        f"Trainer's Adam {ADAM_OPTIONS} + bf16 autocast": BareStep(net(), data, case.batch, autocast=True),
    }
    compile_s = None
    if compile:
        torch._dynamo.reset()  # a fresh compile per case (a second shape would otherwise turn dynamic)
        compiled = BareStep(net(), data, case.batch, compile=True)
        start = time.perf_counter()
        compiled()
        compile_s = time.perf_counter() - start
        variants[f"Trainer's Adam {ADAM_OPTIONS} + torch.compile"] = compiled
    baseline, trainers = "per-tensor Adam (foreach=False)", f"{next(iter(ADAM_OPTIONS))} Adam"
    times = interleaved(with_peak({name: repeat(step, case.steps) for name, step in variants.items()}), repeats)
    peaks += peak_rates(times)
    rows = []
    for name in variants:
        step_s = median(times[name]) / case.steps
        note = f" (compile: {compile_s:.0f} s)" if "compile" in name and compile_s is not None else ""
        rows.append(f"| {case.name} | {name}{note} | {fmt(case.batch / step_s)} | "
                    f"{100 * mfu(times, name, flops * case.steps):.0f}% | "
                    f"{ratio(times, baseline, name):.3f}x | {ratio(times, trainers, name):.3f}x |")
    return rows


class ZeroNetwork(torch.nn.Module):
    """A network that costs nothing: what the loss costs around the network (times, noise, the process's tables,
    the parameterization and weighting)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, labels=None):
        return x * self.scale


def trainer_overhead(case: Case, repeats: int, amp="auto") -> tuple[list[str], float]:
    """Trainer.train (the demo's DDPM options) against BareStep on the same network, data, batch and loss, and
    what the Trainer's extra parts cost per step, as a share of the bare step."""
    dataset = dataset_for(case)
    cfg = TrialConfig(data=DataConfig(name="digits" if case.shape == (1, 8, 8) else "cifar10"),
                      process=ProcessConfig(name="vp", schedule="linear", T=T),
                      model=ModelConfig(**case.model, parameterization="eps", variance="beta"),
                      train=TrainConfig(steps=10**6, batch_size=case.batch, lr=1e-4, warmup=100, ema_decay=0.995,
                                        log_every=50, checkpoint_every=0),
                      sample=SampleConfig(), eval=EvalConfig())
    trainer = Trainer(cfg, dataset, torch.device("cpu"), amp=amp)
    bare = BareStep(trainer.network, trainer.train_data, case.batch, autocast=trainer.amp)
    zero, x0 = ZeroNetwork(), trainer.train_data[:case.batch]
    grads = [torch.randn_like(p) for p in trainer._parameters]

    def trained():
        trainer.train(until=trainer.step + case.steps)

    def loss_around_network():
        trainer.family.batch_losses(zero, x0, None, trainer.generator)

    def clip():
        torch.nn.utils.clip_grad_norm_(grads, cfg.train.grad_clip, foreach=True)

    parts = {"Trainer.train": trained, "bare step": repeat(bare, case.steps),
             "loss around the network (times, noise, float64 tables, weighting)": repeat(loss_around_network, case.steps),
             "EMA update (foreach lerp)": repeat(trainer.update_ema, case.steps),
             "grad clipping (foreach norm)": repeat(clip, case.steps)}
    times = interleaved(parts, repeats)
    overhead = ratio(times, "Trainer.train", "bare step") - 1
    trainer_s, bare_s = (median(times[n]) / case.steps for n in ("Trainer.train", "bare step"))
    rows = [f"| {case.name} | Trainer.train against the bare step: {fmt(case.batch / trainer_s)} against "
            f"{fmt(case.batch / bare_s)} img/s | **{100 * overhead:+.1f}%** |"]
    for name in list(parts)[2:]:
        share = median([a / b for a, b in zip(times[name], times["bare step"])])
        rows.append(f"| {case.name} | {name} | {100 * share:.1f}% |")
    return rows, overhead


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per comparison (default 7)")
    parser.add_argument("--quick", action="store_true", help="3 repeats, 8x8 only, no compile (a smoke run)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-ho", action="store_true", help="skip the one-step Ho et al. CIFAR-10 case")
    output_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    cases = CASES[:1] if args.quick else [c for c in CASES if not (args.no_ho and c.one_step)]
    compile = not (args.quick or args.no_compile)
    try:
        import diffusers
    except ImportError:
        print("benchmarks/throughput.py needs diffusers: pip install '.[bench]'", file=sys.stderr)
        return 2
    import warnings
    warnings.filterwarnings("ignore")
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    peaks: list[float] = []  # the matmul's FLOP/s in every round
    shown = " ".join(["python benchmarks/throughput.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        f"Command: `{shown}`, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), {args.threads} torch thread(s), no GPU, torch "
        f"{torch.__version__}, diffusers {diffusers.__version__}. Interleaved in one process, {repeats} repeats; "
        f"medians, ratios are medians of per-repeat ratios.",
        "",
        "PEAK_LINE",
        "",
        "### Ours against diffusers' UNet2DModel at matched parameter count",
        "",
        "Bare training step (forward, eps-MSE, backward, the Trainer's Adam); sampling: one network call under "
        "inference_mode (images/s = image-NFE/s).",
        "",
        "| case | network | params | train MFLOP/img | train img/s | train MFU | sample img/s | sample MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        rows, _ = compare_with_diffusers(case, peaks, repeats)
        lines += rows
        print("\n".join(rows), flush=True)
    lines += ["", "### Training-step options on our U-Net (bare step)", "",
              f"| case | step | train img/s | MFU | speed-up over per-tensor Adam | over {next(iter(ADAM_OPTIONS))} Adam "
              "(the Trainer's) |", "|---|---|---|---|---|---|"]
    for case in cases:
        if case.one_step:
            continue
        rows = step_options(case, peaks, repeats, compile)
        lines += rows
        print("\n".join(rows), flush=True)
    lines += ["", "### Sampling calls: torch.no_grad against torch.inference_mode (our U-Net)", "",
              "| case | no_grad img/s | inference_mode img/s | inference_mode speed-up |", "|---|---|---|---|"]
    for case in cases:
        if case.one_step:
            continue
        torch.manual_seed(0)
        net = build_network(ModelConfig(**case.model), case.shape)
        times = interleaved({mode: repeat(sampler_call(net, case.shape, case.sample_batch, mode=mode), case.calls)
                             for mode in ("no_grad", "inference")}, repeats)
        ips = {mode: case.sample_batch * case.calls / median(times[mode]) for mode in times}
        row = (f"| {case.name} | {fmt(ips['no_grad'])} | {fmt(ips['inference'])} | "
               f"{ratio(times, 'no_grad', 'inference'):.3f}x |")
        lines.append(row)
        print(row, flush=True)
    lines += ["", "### Trainer.train against the bare step", "",
              "The demo's DDPM options (vp linear T = 1000, eps, simple loss, EMA, grad_clip 1, warm-up); the bare "
              "step draws the same batch and times with the same Adam. Below it, the Trainer's own parts timed alone "
              "(interleaved with the two), per step as a share of the bare step.", "",
              "| case | what | per step, against the bare step |", "|---|---|---|"]
    for case in cases:
        if case.one_step:
            continue
        rows, _ = trainer_overhead(case, repeats)
        lines += rows
        print("\n".join(rows), flush=True)
    lines += ["", f"Run time: {(time.perf_counter() - started) / 60:.1f} min; load average (1 min) {load_start:.1f} at "
              f"the start, {os.getloadavg()[0]:.1f} at the end (other processes share the cores: only the interleaved "
              "ratios are comparable between rows)."]
    peak_line = (f"fp32 matmul peak ({MATMUL_N}^3 matmuls, timed in every round beside the contenders): median "
                 f"**{median(peaks) / 1e9:.1f} GFLOP/s** (best {max(peaks) / 1e9:.1f}, worst {min(peaks) / 1e9:.1f} over "
                 f"{len(peaks)} rounds). MFU = FLOPs counted by FlopCounterMode (convolutions, matmuls, attention) / "
                 "time / the peak of the same round, median over rounds.")
    report = "\n".join(peak_line if line == "PEAK_LINE" else line for line in lines)
    publish(report, args, BEGIN, END, HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
