"""Data-parallel training of one model (``resources.workers`` > 1) on Ray Train, inside the sweep's Tune trial.

The trial's Tune task keeps what it does for any training (the MLflow training run, the model cache's entry and
its lock, ``trial._train``) and hands the training loop to a ``TorchTrainer``: ``resources.workers`` workers, each
with the trial's ``cpu``, ``gpu`` and ``custom`` resources, in a process group on NCCL (GPUs) or gloo (CPUs). Each
worker runs ``fit.fit_model`` on its shard of the global batch (``diffusion.distributed``); rank 0 logs to
MLflow, checkpoints into the model cache and publishes the EMA weights there, as a one-process training does.

When a worker dies, Ray Train starts the group again (``resources.max_failures`` times) and every worker resumes
from the cache's last checkpoint; the steps logged before are not logged twice. A diverged training is not
retried: rank 0 returns it and the task raises ``TrainingDiverged`` as a one-process training would.

The Tune task itself asks for no CPU (a little memory: Tune needs a non-empty request), so that a 2-worker trial of
1 CPU each fits a 2-CPU node; the group's first evaluation is a task of its own (``tuning.plan_tasks``).
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
from typing import Optional

import torch

from diffusion.training import TrainingDiverged

from .schema import ResourcesConfig, SweepTrialConfig

# What the Tune task of a data-parallel training asks for itself: its workers hold the CPUs and GPUs.
DRIVER_RESOURCES = {"cpu": 0, "memory": 256 * 2**20}


def task_resources(resources: dict, train: bool) -> dict:
    """The Tune task's own request (``tuning._fit``): a data-parallel training's is :data:`DRIVER_RESOURCES`."""
    if train and resources.get("workers", 1) > 1:
        return dict(DRIVER_RESOURCES)
    return {"cpu": resources["cpu"], "gpu": resources["gpu"], **dict(resources["custom"])}


def worker_resources(resources: ResourcesConfig) -> dict:
    """What each Ray Train worker asks for: the trial's resources."""
    return {"CPU": resources.cpu, "GPU": resources.gpu, **dict(resources.custom)}


def train_data_parallel(cfg: SweepTrialConfig, key: str, run_id: str, context, entered: Optional[float]) -> None:
    """Train the model of ``key`` for the training run ``run_id`` on ``cfg.resources.workers`` Ray Train workers
    and return when rank 0 has published it in the cache; raises ``TrainingDiverged``, or Ray Train's
    ``TrainingFailedError`` once the group's restarts are spent."""
    import dataclasses

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.config import LoggingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    from .tracking import worker_env

    res = cfg.resources
    in_tune = _in_tune_session()
    callbacks = []
    if in_tune:  # the workers' reports (train_loss, phase) reach the sweep's live view through the Tune trial
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
        storage = tune.get_context().get_trial_dir()
    else:
        storage = tempfile.mkdtemp(prefix="orchestrator-train-")
    config = {"trial_config": dataclasses.asdict(cfg), "key": key, "run_id": run_id,
              "context": dataclasses.asdict(context), "entered": entered,
              # credentials for workers on a joined cluster: in Ray's object store, never in a spec Ray logs
              "env": ray.put(worker_env())}
    trainer = TorchTrainer(
        _worker, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if res.gpu > 0 else "gloo"),
        scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=res.gpu > 0,
                                     resources_per_worker=worker_resources(res)),
        run_config=RunConfig(name="data-parallel", storage_path=storage, callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=res.max_failures),
                             # not a line per worker and log point on the console (the live view shows progress)
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    outcome = trainer.fit().return_value or {}
    if "diverged" in outcome:
        raise TrainingDiverged(*outcome["diverged"])


def _worker(config: dict) -> dict:
    """One Ray Train worker: ``fit.fit_model`` from the cache's checkpoint (this run's, if any: a new training
    run removes another's), after tagging the run with every worker's host:pid (``data_parallel_workers``) and
    counting the group's starts (``worker_group_starts``)."""
    import ray
    import ray.train
    import torch.distributed as dist
    from mlflow.tracking import MlflowClient

    from .cache import ModelCache
    from .fit import fit_model, trial_config

    os.environ.update(ray.get(config["env"]))
    cfg = trial_config({"config": config["trial_config"]})
    context = config["context"]  # trial.TrialContext as a dict
    client, cache, run_id = MlflowClient(context["tracking_uri"]), ModelCache(context["cache_root"]), config["run_id"]
    torch.set_num_threads(max(1, int(cfg.resources.cpu)))
    device = ray.train.torch.get_device() if cfg.resources.gpu > 0 else torch.device("cpu")
    workers = [None] * dist.get_world_size()
    dist.all_gather_object(workers, f"{socket.gethostname()}:{os.getpid()}")
    if dist.get_rank() == 0:
        run = client.get_run(run_id)
        starts = int(run.data.tags.get("worker_group_starts", "0")) + 1
        client.set_tag(run_id, "data_parallel_workers", ",".join(workers))
        client.set_tag(run_id, "worker_group_starts", str(starts))
    try:
        fit_model(cfg, config["key"], run_id, context["experiment_id"], client, cache, ray.train.report,
                  config["entered"], resume=True, device=device)
    except TrainingDiverged as error:  # the same on every worker: a restart would diverge again
        return {"diverged": [error.step, error.loss]}
    return {"finished": time.time()}
