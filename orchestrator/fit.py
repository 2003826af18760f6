"""The training loop of one model for its training run, shared by a trial's own process (``trial._train``) and each
Ray Train worker of a data-parallel training (``orchestrator.parallel``): the trainer resumed from the model cache's
checkpoint, ``train_loss`` and FID during training logged and reported, checkpoints, and the trained model published
in the cache."""
from __future__ import annotations

import os
import socket
import time
from typing import Callable, Optional

import torch
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from diffusion.evaluation import fid_during_training
from diffusion.training import Trainer, build_trainer, select_device

from . import stages
from .cache import MODEL_FILE, ModelCache
from .keys import training_key, training_spec
from .scheduler import STOPPED_MODEL_TAG, STOPPED_STEP_TAG, STOPPED_TAG, TIME_ATTR, stopped_config
from .schema import SweepTrialConfig


class _StopNow(Exception):
    """Raised out of the training loop when the sweep's scheduler stopped this training at the step just reported."""


def trial_config(trial: dict) -> SweepTrialConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepTrialConfig), trial["config"]))


def where(client: MlflowClient, run_id: str, device) -> None:
    """Tag where this attempt runs: the device, the host and process (``worker``), and the Ray node."""
    tags = {"device": str(device), "worker": f"{socket.gethostname()}:{os.getpid()}"}
    try:
        import ray

        if ray.is_initialized():
            tags["ray_node"] = ray.get_runtime_context().get_node_id()
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def resume_trainer(cfg: SweepTrialConfig, key: str, cache: ModelCache, model_data, device,
                   resume: bool) -> tuple[Trainer, bool, Optional[str]]:
    """A trainer for the model of ``key``: restored from the cache's checkpoint when ``resume`` and there is a
    whole one, else fresh. A damaged checkpoint (not matching its checksum, ``ModelCache.checkpoint``, or
    failing to load with ``weights_only``) is reported, removed and not used: training starts from step 0, on
    the same trajectory (every random state is seeded). Returns (trainer, restored, what was wrong or None)."""
    trainer = build_trainer(cfg, model_data, device, cfg.resources.amp)
    if not resume:
        return trainer, False, None
    path, problem = cache.checkpoint(key)
    if path is None:
        return trainer, False, problem
    try:
        trainer.load(path)
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file: the trainer may be half loaded
        problem = f"cannot be loaded: {type(error).__name__}: {str(error)[:200]}"
        cache.discard_checkpoint(key, problem)
        return build_trainer(cfg, model_data, device, cfg.resources.amp), False, problem
    return trainer, True, None


def fit_model(cfg: SweepTrialConfig, key: str, run_id: str, experiment_id: str, client: MlflowClient, cache: ModelCache,
              report: Callable[[dict], None], entered: Optional[float], resume: bool,
              device: Optional[torch.device] = None, scheduler: Optional[dict] = None) -> Optional[dict]:
    """Train the model of ``key`` for the training run ``run_id``, from the cache's checkpoint when ``resume``, and
    publish it in the cache: the EMA weights, then the entry's ``model.json``. ``train_loss`` is logged at the steps
    not logged before (a resumed run repeats the steps after its checkpoint) and reported to Tune with the phase.

    ``scheduler`` ({"name", "metric", "note"}: the sweep's early stopping, ``orchestrator.scheduler``): after each
    report of its metric the entry's stop note (``note``) is read; a note for that step ends training there, and
    the model is published under the key of the config with ``train.steps`` = that step (``stopped_config``), the
    run tagged. Returns the stop ({"by", "step", "metric", "value", "model_key", "planned"}) or None.

    On each process of a data-parallel training (``orchestrator.parallel``) the trainer joins the process group
    (``Trainer.data_parallel``); rank 0 alone logs, checkpoints and publishes, and every rank reports (Ray Train's
    report is a barrier)."""
    device = device or select_device(cfg.resources.device)
    logged = max((m.step for m in client.get_metric_history(run_id, "train_loss")), default=0) if resume else 0
    model_data, dataset, vae = stages.model_data(cfg, cache, client, run_id, device)
    trainer, restored, damaged = resume_trainer(cfg, key, cache, model_data, device, resume)
    trainer.data_parallel()
    lead = trainer.rank == 0
    if lead:
        where(client, run_id, device)
        if restored:
            client.set_tag(run_id, "resumed_from_step", str(trainer.step))
        elif damaged:
            client.set_tag(run_id, "checkpoint_damaged", f"{damaged}: trained from step 0"[:5000])

    stopped: dict = {}

    def heed(step: int, metrics: dict) -> None:  # Tune has judged the report just made: stopped there?
        if scheduler is None or scheduler["metric"] not in metrics or step >= cfg.train.steps:
            return  # at the last step the training has finished: nothing to stop
        note = cache.read(key, scheduler["note"])
        if note is not None and note.get("step") == step:
            stopped.update(note)
            raise _StopNow()

    def on_log(step: int, loss: float) -> None:
        if lead and step > logged:
            client.log_metric(run_id, "train_loss", loss, step=step)
        report({"train_loss": loss, "step": step, TIME_ATTR: step, "phase": "train", "phase_step": step,
                "phase_total": cfg.train.steps})
        heed(step, {"train_loss": loss})

    def on_checkpoint(step: int) -> None:
        if lead:
            cache.save_checkpoint(key, trainer.save)

    evaluated = max((m.step for m in client.get_metric_history(run_id, "fid")), default=0) if resume else 0
    prepared = []

    def on_eval(step: int) -> None:  # eval.every: FID during training (rank 0 measures; every rank reports)
        metrics = {}
        if lead:
            if not prepared:  # FID's extractor and reference: made by the driver's Ray task, or here, once
                prepared.append(stages.fid_features(cfg, dataset, cache, f"training run {run_id}"))
            metrics = fid_during_training(trainer, dataset, cfg, vae)
            if step > evaluated:
                now = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        measured = {k: v for k, v in metrics.items() if k in ("fid", "kid")}
        report({**measured, "step": step, TIME_ATTR: step, "phase": "train", "phase_step": step,
                "phase_total": cfg.train.steps})
        heed(step, measured)

    # orchestration overhead: from the task's start on its worker to its training loop (run, data, network)
    startup = time.time() - (entered or time.time())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_step, started = trainer.step, time.perf_counter()
    try:
        trainer.train(on_log=on_log, on_checkpoint=on_checkpoint, on_eval=on_eval)
    except _StopNow:
        pass
    seconds = time.perf_counter() - started
    if not lead:
        return None
    history = sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)
    metrics = {"train_seconds": seconds, "startup_seconds": startup,
               "train_examples_per_second": (trainer.step - first_step) * cfg.train.batch_size / seconds}
    if device.type == "cuda":  # what the trial needs of a GPU it shares (resources.gpu below 1)
        metrics["train_peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    if trainer.learned_schedule:  # the trained VDM schedule, for plotting and comparison across trials
        t = torch.linspace(0, 1, 101, dtype=torch.float64)
        with torch.no_grad():
            log_snr = trainer.process.schedule(t).cpu()
        client.log_dict(run_id, {"t": t.tolist(), "log_snr": log_snr.tolist()}, "schedule.json")
    publish = key
    if stopped:  # the weights are those of this config trained for trainer.step steps: that key describes them
        stopped_cfg = stopped_config(cfg, trainer.step)
        publish = training_key(stopped_cfg)
        stopped.update(model_key=publish, planned=cfg.train.steps)
        client.log_batch(run_id, tags=[RunTag(STOPPED_TAG, stopped["by"]), RunTag(STOPPED_STEP_TAG, str(trainer.step)),
                                       RunTag(STOPPED_MODEL_TAG, publish)])
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, trainer.step) for k, v in metrics.items()])
    if stopped and cache.has(publish):  # trained before to that step: the same weights, the entry kept as it is
        return stopped
    trainer.save_ema(cache.local(publish, "ema.pt"))
    client.log_artifact(run_id, cache.local(publish, "ema.pt"))
    files = {"ema.pt": cache.publish_file(publish, "ema.pt")}  # checksums: ModelCache.model verifies them
    record = {"run_id": run_id, "experiment_id": experiment_id, "steps": trainer.step,
              "train_loss": history[-1].value if history else float("nan"), **metrics, "files": files}
    if cfg.eval.every:  # the FID curve stays with the cached model (also the training run's metrics fid and kid)
        record["fid_curve"] = fid_curve(client, run_id)
    if stopped:
        record["stopped"] = {k: stopped[k] for k in ("by", "step", "metric", "value", "planned") if k in stopped}
        cache.write(publish, "spec.json", training_spec(stopped_cfg))
        cache.write(publish, "run.json", {"run_id": run_id, "experiment_id": experiment_id})
    cache.write(publish, MODEL_FILE, record)
    return stopped or None


def fid_curve(client: MlflowClient, run_id: str) -> list[dict]:
    """The training run's FID during training: [{"step", "fid", "kid"}, ...] by step."""
    curve: dict[int, dict] = {}
    for name in ("fid", "kid"):
        for metric in client.get_metric_history(run_id, name):
            curve.setdefault(metric.step, {"step": metric.step})[name] = metric.value
    return [curve[step] for step in sorted(curve)]
