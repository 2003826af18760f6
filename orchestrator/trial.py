"""One trial: train, sample, evaluate, and record everything in one MLflow child run.

``run_trial`` is the Ray Tune function trainable; ``execute_trial`` does the work and can also be
called without Ray (one process, one trial).
"""
from __future__ import annotations

import io
import math
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from diffusion.config import TrialConfig
from diffusion.data import load_dataset
from diffusion.metrics import compute_fid
from diffusion.training import Trainer, TrainingDiverged, select_device

from .sweepfile import flatten

FAILURE_TAG = "failure_reason"


@dataclass
class TrialContext:
    """Where a trial records itself: the tracking server, experiment and parent run."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_name: str


@dataclass
class TrialOutcome:
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    step: int = 0


def run_trial(config: dict) -> None:
    """Ray Tune function trainable: ``config`` holds "trial" (Trial.as_dict()) and "context"."""
    from ray import tune

    execute_trial(config["trial"], TrialContext(**config["context"]), report=tune.report)


def execute_trial(trial: dict, context: TrialContext, report: Optional[Callable[[dict], None]] = None) -> TrialOutcome:
    cfg: TrialConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrialConfig), trial["config"]))
    torch.set_num_threads(max(1, int(cfg.resources.cpu)))
    client = MlflowClient(context.tracking_uri)
    tags = {
        "mlflow.parentRunId": context.parent_run_id,
        "sweep": context.sweep_name,
        "variant": trial["variant"],
        "trial": trial["name"],
    }
    run = client.create_run(context.experiment_id, run_name=trial["name"], tags=tags)
    run_id = run.info.run_id
    outcome = TrialOutcome(run_id)
    report = report or (lambda metrics: None)
    try:
        _log_params(client, run_id, trial["config"])
        client.log_text(run_id, OmegaConf.to_yaml(trial["config"]), "config.yaml")
        _train_and_evaluate(cfg, client, run_id, outcome, report)
    except BaseException as error:  # recorded, then re-raised so Ray marks the trial as errored
        reason = f"{type(error).__name__}: {error}"
        client.set_tag(run_id, FAILURE_TAG, reason[:5000])
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        if not isinstance(error, (TrainingDiverged, KeyboardInterrupt)):
            client.log_text(run_id, traceback.format_exc(), "traceback.txt")
        client.set_terminated(run_id, status=status)
        raise
    client.set_terminated(run_id, status="FINISHED")
    report({**outcome.metrics, "step": outcome.step})
    return outcome


def _log_params(client: MlflowClient, run_id: str, config: dict) -> None:
    params = [Param(key, str(value)) for key, value in sorted(flatten(config).items())]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[start : start + 100])


def _train_and_evaluate(cfg: TrialConfig, client: MlflowClient, run_id: str, outcome: TrialOutcome, report) -> None:
    device = select_device(cfg.resources.device)
    client.set_tag(run_id, "device", str(device))
    dataset = load_dataset(cfg.data)
    trainer = Trainer(cfg, dataset, device)
    workdir = tempfile.mkdtemp(prefix="trial-")

    def on_log(step: int, loss: float) -> None:
        client.log_metric(run_id, "train_loss", loss, step=step)
        report({"train_loss": loss, "step": step})

    def on_checkpoint(step: int) -> None:
        trainer.save(os.path.join(workdir, "checkpoint.pt"))

    started = time.perf_counter()
    trainer.train(on_log=on_log, on_checkpoint=on_checkpoint)
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    samples, nfe = trainer.sample(cfg.sample.n, seed=cfg.seed + 1)
    sample_seconds = time.perf_counter() - started
    metrics = {
        "train_seconds": train_seconds,
        "train_examples_per_second": cfg.train.steps * cfg.train.batch_size / train_seconds,
        "sample_seconds": sample_seconds,
        "sample_nfe": float(nfe),
    }
    finite = torch.isfinite(samples).all().item()
    client.set_tag(run_id, "samples_finite", str(bool(finite)))
    if cfg.sample.grid:
        shown = samples[: cfg.sample.grid] if dataset.is_image else samples  # 2-D: every point
        _log_sample_grid(client, run_id, shown, dataset.is_image, trainer.step)
    if cfg.eval.fid:
        if not finite:
            raise RuntimeError("samples contain NaN or infinite values: FID cannot be computed")
        result = compute_fid(samples, dataset, cfg.eval, device)
        metrics.update({"fid": result.fid, "fid_reference": result.fid_reference})
        if result.kid is not None:
            metrics.update({"kid": result.kid, "kid_reference": result.kid_reference})
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in result.tags.items()])
    if cfg.eval.bpd:
        started = time.perf_counter()
        likelihood = trainer.heldout_likelihood()
        metrics.update(likelihood.metrics)
        metrics["bpd_seconds"] = time.perf_counter() - started
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in likelihood.tags.items()])
        if likelihood.elbo_curve is not None:
            client.log_dict(run_id, likelihood.elbo_curve, "elbo_terms.json")
    if trainer.process.learned:  # the trained VDM schedule, for plotting and comparison across trials
        t = torch.linspace(0, 1, 101, dtype=torch.float64)
        with torch.no_grad():
            log_snr = trainer.process.schedule(t).cpu()
        client.log_dict(run_id, {"t": t.tolist(), "log_snr": log_snr.tolist()}, "schedule.json")
    ema_path = os.path.join(workdir, "ema.pt")
    trainer.save_ema(ema_path)
    client.log_artifact(run_id, ema_path)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, trainer.step) for k, v in metrics.items()])
    outcome.metrics, outcome.step = metrics, trainer.step


def _log_sample_grid(client: MlflowClient, run_id: str, samples: torch.Tensor, is_image: bool, step: int) -> None:
    """A PNG grid of samples: ``samples.png`` in the artifacts, and under the ``samples`` image key
    (the UI's image view) at the training step."""
    from PIL import Image

    if is_image:
        from torchvision.utils import make_grid

        nrow = max(1, int(math.sqrt(len(samples))))
        grid = make_grid(samples.clamp(-1, 1), nrow=nrow, padding=1, normalize=True, value_range=(-1, 1), pad_value=0.5)
        array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        image = Image.fromarray(array).resize((array.shape[1] * 4, array.shape[0] * 4), Image.NEAREST)
    else:
        image = _scatter_image(samples)
    client.log_image(run_id, image, artifact_file="samples.png")
    client.log_image(run_id, image, key="samples", step=step)


def _scatter_image(points: torch.Tensor):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    figure, axes = plt.subplots(figsize=(4, 4), dpi=100)
    axes.scatter(points[:, 0].numpy(), points[:, 1].numpy(), s=2)
    axes.set_aspect("equal")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
