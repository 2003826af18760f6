"""The work of a sweep on a Ray worker: train a model once into the model cache, evaluate trials on it.

A sweep's trials are grouped by training key (``diffusion.config.training_key``: everything that affects
training, never the sampler or the evaluation settings). A *task* is what one Ray Tune trial does:

- ``train``: train the group's model in its own MLflow run (tag ``stage=train``: the training curve, the
  EMA weights), checkpointing into the model cache (``orchestrator.cache``) and publishing the trained
  weights there; then evaluate the group's first trial on it;
- evaluate trials on a model from the cache: each trial has its own MLflow run (tag ``stage=evaluate``:
  samples, FID, KID, bits/dim), linked to the training run by the tags ``training_run_id`` and
  ``training_hash``.

``run_task`` is the Ray Tune function trainable; ``execute_task`` does the work and can also be called
without Ray (one process).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from diffusion.config import TrialConfig, training_spec
from diffusion.data import load_dataset
from diffusion.metrics import compute_fid, conditional_metrics
from diffusion.storage import save_atomic
from diffusion.training import Trainer, TrainingDiverged, build_trainer, select_device

from .cache import CHECKPOINT, CHECKPOINT_SUM, MODEL_FILE, ModelCache, likelihood_key, warn_damaged
from .sweepfile import flatten
from .tracking import PARENT_TAG

FAILURE_TAG = "failure_reason"
STAGE_TAG, TRAIN, EVALUATE = "stage", "train", "evaluate"
TRAINING_RUN_TAG, TRAINING_HASH_TAG = "training_run_id", "training_hash"


@dataclass
class TrialContext:
    """Where a task records itself (the tracking server, experiment and parent run) and finds models."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_name: str
    cache_root: str


@dataclass
class TrialOutcome:
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    step: int = 0


def run_task(config: dict, env: Optional[dict] = None) -> None:
    """Ray Tune function trainable: ``config`` holds "task" (see ``execute_task``) and "context". ``env``: the
    driver's credentials for a worker on a cluster the driver joined (``tune.with_parameters``: they travel in
    Ray's object store, never in a runtime_env, Tune's state or a log); set in this worker's environment."""
    from ray import tune

    os.environ.update(env or {})
    execute_task(config["task"], TrialContext(**config["context"]), report=tune.report)


def execute_task(task: dict, context: TrialContext, report: Optional[Callable[[dict], None]] = None) -> list[TrialOutcome]:
    """``task``: {"key": training key, "train": bool, "group": names of every trial of the key,
    "trials": [Trial.as_dict(), ...] to evaluate}. Trains first when "train" is set (a failed training
    fails the task's evaluations too, with the reason), then evaluates each trial.

    Idempotent within a sweep run: a training or evaluation already FINISHED under the parent run is
    not redone, an unfinished one continues in its own MLflow run (training from its last checkpoint).
    So Ray may run a task again after its worker died, and ``orchestrator resume`` may rerun the tasks
    of a killed sweep. An error the task raises itself is recorded (status FAILED, ``failure_reason``)
    and reported to Tune as ``failed``, not raised, since running it again would fail again; only lost
    contact with the tracking server is raised, for Tune to retry (``resources.max_failures``)."""
    entered = time.time()
    client = MlflowClient(context.tracking_uri)
    cache = ModelCache(context.cache_root)
    report = report or (lambda metrics: None)
    try:
        if task["train"]:
            try:
                train_model(_config(task["trials"][0]), task["key"], task["group"], context, client, cache, report,
                            entered)
            except BaseException as error:
                if not _transient(error):
                    for trial in task["trials"]:
                        record_unevaluated(client, context, trial, task["key"], f"training failed: {_reason(error)}",
                                           "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
                raise
        return [evaluate_trial(trial, task["key"], context, client, cache, report) for trial in task["trials"]]
    except Exception as error:  # recorded where it happened
        if _transient(error):
            raise
        report({"failed": 1.0, "step": 0})
        return []


def _transient(error: BaseException) -> bool:
    """Lost contact with the tracking server (after the MLflow client's own retries): worth a retry."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
        return True
    return isinstance(error, MlflowException) and any(
        word in str(error) for word in ("Max retries exceeded", "Connection refused", "ConnectionError", "timed out"))


def _config(trial: dict) -> TrialConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrialConfig), trial["config"]))


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _log_params(client: MlflowClient, run_id: str, config: dict) -> None:
    params = [Param(key, str(value)) for key, value in sorted(flatten(config).items())]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[start : start + 100])


def _fail(client: MlflowClient, run_id: str, error: BaseException) -> None:
    """Record why a run ended and end it: FAILED, or KILLED on Ctrl-C."""
    client.set_tag(run_id, FAILURE_TAG, _reason(error)[:5000])
    if not isinstance(error, (TrainingDiverged, KeyboardInterrupt)):
        client.log_text(run_id, traceback.format_exc(), "traceback.txt")
    client.set_terminated(run_id, status="KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")


def _base_tags(context: TrialContext, stage: str, key: str) -> dict:
    return {PARENT_TAG: context.parent_run_id, "sweep": context.sweep_name, STAGE_TAG: stage, TRAINING_HASH_TAG: key}


def find_run(client: MlflowClient, context: TrialContext, stage: str, **tags: str):
    """This sweep run's latest child run of ``stage`` with ``tags`` (e.g. trial=name), or None.

    The filter holds only values this code made (the parent run's id, the stage); the user's values (a trial
    name carries grid values, which may hold quotes) are compared here, never spliced into a filter string."""
    runs = client.search_runs([context.experiment_id],
                              f"tags.`{PARENT_TAG}` = '{context.parent_run_id}' and tags.{STAGE_TAG} = '{stage}'",
                              max_results=10_000, order_by=["attributes.start_time DESC"])
    return next((run for run in runs if all(run.data.tags.get(name) == value for name, value in tags.items())), None)


def _where(client: MlflowClient, run_id: str, device) -> None:
    """Tag where this attempt runs: the device, the host and process (``worker``), and the Ray node."""
    tags = {"device": str(device), "worker": f"{socket.gethostname()}:{os.getpid()}"}
    try:
        import ray

        if ray.is_initialized():
            tags["ray_node"] = ray.get_runtime_context().get_node_id()
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def _reopen(client: MlflowClient, run) -> str:
    """Continue an unfinished run: RUNNING again, its failure reason cleared, the attempt counted."""
    run_id = run.info.run_id
    client.update_run(run_id, status="RUNNING")
    if FAILURE_TAG in run.data.tags:
        client.delete_tag(run_id, FAILURE_TAG)
    client.set_tag(run_id, "attempts", str(int(run.data.tags.get("attempts", "1")) + 1))
    return run_id


# --------------------------------------------------------------------------------------------
# Training stage
# --------------------------------------------------------------------------------------------


def train_model(cfg: TrialConfig, key: str, group: list[str], context: TrialContext, client: MlflowClient,
                cache: ModelCache, report: Callable[[dict], None], entered: Optional[float] = None) -> str:
    """Train the model of ``key`` in a training run and publish it in the cache; returns the run id.

    When this sweep run already has a training run for the key, that run continues: nothing is done if it
    finished and the cache has the model; otherwise training resumes from the cache's last checkpoint
    (bit for bit: the checkpoint holds every random state), and the steps logged before are not logged
    twice; a damaged checkpoint is reported and training starts from step 0 (:func:`resume_trainer`).

    Training holds the entry's lock (``ModelCache.lock(key, "train")``): another sweep that plans to train
    the same model waits for it, then finds the model complete and does not train it; its trials are
    evaluated on that model, linked to the training run that made it, as for a model taken from the cache
    (the id returned is that run's). A waiter gives up after ``$ORCHESTRATOR_CACHE_LOCK_TIMEOUT`` seconds
    (``cache.LockTimeout``, naming the entry and the holder): the task's trials are recorded FAILED with it."""
    torch.set_num_threads(max(1, int(cfg.resources.cpu)))
    previous = find_run(client, context, TRAIN, **{TRAINING_HASH_TAG: key})
    if previous is not None and previous.info.status == "FINISHED" and cache.has(key):
        return previous.info.run_id
    with cache.lock(key, "train", note=f"sweep {context.sweep_name}, parent run {context.parent_run_id}"):
        model = cache.model(key)
        if model is not None:
            return _trained_meanwhile(client, key, model, previous)
        return _train(cfg, key, group, context, client, cache, report, entered, previous)


def _trained_meanwhile(client: MlflowClient, key: str, model: dict, previous) -> str:
    """The model of ``key`` is complete in the cache although this task was to train it (another sweep trained
    it while this one waited for the entry's lock): nothing to train. An unfinished training run of this sweep
    run for it ends: FINISHED if it is the run that published the model (its worker died just after), else
    KILLED with the reason. Returns the id of the run that trained the model."""
    trained_by = model.get("run_id", "")
    if previous is not None and previous.info.status != "FINISHED":
        if previous.info.run_id == trained_by:
            client.set_terminated(trained_by, status="FINISHED")
            return trained_by
        client.set_tag(previous.info.run_id, FAILURE_TAG, f"the model was trained meanwhile by training run "
                       f"{trained_by}: evaluated on that one")
        client.set_terminated(previous.info.run_id, status="KILLED")
    print(f"model cache entry {key}: trained meanwhile by training run {trained_by} (experiment "
          f"{model.get('experiment_id')}); evaluating on it", flush=True)
    return trained_by


def resume_trainer(cfg: TrialConfig, key: str, cache: ModelCache, model_data, device,
                   resume: bool) -> tuple[Trainer, bool, Optional[str]]:
    """A trainer for the model of ``key``: restored from the cache's checkpoint when ``resume`` and there is a
    whole one, else fresh. A damaged checkpoint (not matching its checksum, ``ModelCache.checkpoint``, or
    failing to load with ``weights_only``) is reported, removed and not used: training starts from step 0, on
    the same trajectory (every random state is seeded). Returns (trainer, restored, what was wrong or None)."""
    trainer = build_trainer(cfg, model_data, device)
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
        return build_trainer(cfg, model_data, device), False, problem
    return trainer, True, None


def _train(cfg: TrialConfig, key: str, group: list[str], context: TrialContext, client: MlflowClient,
           cache: ModelCache, report: Callable[[dict], None], entered: Optional[float], previous) -> str:
    """:func:`train_model`'s training, under the entry's lock, with this sweep run's earlier training run or None."""
    spec = training_spec(cfg)
    logged = 0
    if previous is None:
        tags = {**_base_tags(context, TRAIN, key), "trials": ",".join(group)[:5000]}
        run_id = client.create_run(context.experiment_id, run_name=f"train-{key[:8]}", tags=tags).info.run_id
        cache.remove(key, CHECKPOINT)  # another sweep's unfinished training: this run starts from step 0
        cache.remove(key, CHECKPOINT_SUM)
    else:
        run_id = _reopen(client, previous)
        logged = max((m.step for m in client.get_metric_history(run_id, "train_loss")), default=0)
    cache.write(key, "spec.json", spec)
    cache.write(key, "run.json", {"run_id": run_id, "experiment_id": context.experiment_id})
    try:
        if previous is None:
            _log_params(client, run_id, spec)
            client.log_text(run_id, OmegaConf.to_yaml(spec), "config.yaml")
        device = select_device(cfg.resources.device)
        _where(client, run_id, device)
        model_data, _, _ = _model_data(cfg, cache, client, run_id, device)
        trainer, restored, damaged = resume_trainer(cfg, key, cache, model_data, device, previous is not None)
        if restored:
            client.set_tag(run_id, "resumed_from_step", str(trainer.step))
        elif damaged:
            client.set_tag(run_id, "checkpoint_damaged", f"{damaged}: trained from step 0"[:5000])

        def on_log(step: int, loss: float) -> None:
            if step > logged:  # a resumed run repeats the steps after its checkpoint: log them once
                client.log_metric(run_id, "train_loss", loss, step=step)
            report({"train_loss": loss, "step": step})

        def on_checkpoint(step: int) -> None:
            cache.save_checkpoint(key, trainer.save)

        # orchestration overhead: from the task's start on its worker to its training loop (run, data, network)
        startup = time.time() - (entered or time.time())
        first_step, started = trainer.step, time.perf_counter()
        trainer.train(on_log=on_log, on_checkpoint=on_checkpoint)
        seconds = time.perf_counter() - started
        history = sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)
        metrics = {"train_seconds": seconds, "startup_seconds": startup,
                   "train_examples_per_second": (trainer.step - first_step) * cfg.train.batch_size / seconds}
        if trainer.learned_schedule:  # the trained VDM schedule, for plotting and comparison across trials
            t = torch.linspace(0, 1, 101, dtype=torch.float64)
            with torch.no_grad():
                log_snr = trainer.process.schedule(t).cpu()
            client.log_dict(run_id, {"t": t.tolist(), "log_snr": log_snr.tolist()}, "schedule.json")
        trainer.save_ema(cache.local(key, "ema.pt"))
        files = {"ema.pt": cache.publish_file(key, "ema.pt")}  # checksums: ModelCache.model verifies them
        client.log_artifact(run_id, cache.local(key, "ema.pt"))
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, trainer.step) for k, v in metrics.items()])
        cache.write(key, MODEL_FILE, {"run_id": run_id, "experiment_id": context.experiment_id, "steps": trainer.step,
                                      "train_loss": history[-1].value if history else float("nan"), **metrics,
                                      "files": files})
    except BaseException as error:  # recorded, then re-raised so Ray marks the trial as errored
        _fail(client, run_id, error)
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id


# --------------------------------------------------------------------------------------------
# Evaluation stage
# --------------------------------------------------------------------------------------------


def _evaluation_run(client: MlflowClient, context: TrialContext, trial: dict, key: str, training_run: str) -> Optional[str]:
    """The trial's evaluation run: a new one, or this sweep run's unfinished one reopened; None when it
    already FINISHED (nothing to do)."""
    previous = find_run(client, context, EVALUATE, trial=trial["name"])
    if previous is not None:
        if previous.info.status == "FINISHED":
            return None
        run_id = _reopen(client, previous)
        client.set_tag(run_id, TRAINING_RUN_TAG, training_run)
        return run_id
    tags = {**_base_tags(context, EVALUATE, key), "variant": trial["variant"], "trial": trial["name"],
            TRAINING_RUN_TAG: training_run}
    run_id = client.create_run(context.experiment_id, run_name=trial["name"], tags=tags).info.run_id
    _log_params(client, run_id, trial["config"])
    client.log_text(run_id, OmegaConf.to_yaml(trial["config"]), "config.yaml")
    return run_id


def record_unevaluated(client: MlflowClient, context: TrialContext, trial: dict, key: str, reason: str,
                       status: str = "FAILED") -> Optional[str]:
    """An evaluation run for a trial that cannot be evaluated (its model's training failed), ended with
    ``status`` and the reason, so that every trial of the sweep has its run."""
    training = (ModelCache(context.cache_root).training_run(key) or {}).get("run_id", "")
    run_id = _evaluation_run(client, context, trial, key, training)
    if run_id is not None:
        client.set_tag(run_id, FAILURE_TAG, reason[:5000])
        client.set_terminated(run_id, status=status)
    return run_id


def evaluate_trial(trial: dict, key: str, context: TrialContext, client: MlflowClient, cache: ModelCache,
                   report: Callable[[dict], None]) -> TrialOutcome:
    """Sample from the cached model of ``key`` with the trial's settings and measure it, in its own run."""
    cfg = _config(trial)
    torch.set_num_threads(max(1, int(cfg.resources.cpu)))
    model = cache.model(key)
    run_id = _evaluation_run(client, context, trial, key, model["run_id"] if model else "")
    if run_id is None:  # finished in an earlier attempt
        return TrialOutcome(find_run(client, context, EVALUATE, trial=trial["name"]).info.run_id)
    outcome = TrialOutcome(run_id)
    try:
        if model is None:
            raise RuntimeError(f"no trained model with training key {key} in {cache.root}")
        _evaluate(cfg, key, model, client, run_id, cache, outcome)
    except BaseException as error:  # recorded, then re-raised so Ray marks the trial as errored
        _fail(client, run_id, error)
        raise
    client.set_terminated(run_id, status="FINISHED")
    report({**outcome.metrics, "step": outcome.step})
    return outcome


def _evaluate(cfg: TrialConfig, key: str, model: dict, client: MlflowClient, run_id: str, cache: ModelCache,
              outcome: TrialOutcome) -> None:
    device = select_device(cfg.resources.device)
    _where(client, run_id, device)
    model_data, dataset, vae = _model_data(cfg, cache, client, run_id, device)
    trainer = build_trainer(cfg, model_data, device)
    trainer.load_ema(cache.fetch(key, "ema.pt"))

    labels = trainer.sample_labels(cfg.sample.n)
    classifier = _guidance_classifier(cfg, dataset, trainer, cache, client, run_id) if cfg.sample.classifier_scale else None
    started = time.perf_counter()
    samples, nfe = trainer.sample(cfg.sample.n, seed=cfg.seed + 1, labels=labels, classifier=classifier)
    if vae is not None:  # latent diffusion: the codes decoded to images, measured in pixel space
        with torch.no_grad():
            samples = torch.cat([vae.decode_codes(z.to(device)).cpu() for z in samples.split(cfg.sample.batch_size)])
    metrics = {
        "sample_seconds": time.perf_counter() - started,
        "sample_nfe": float(nfe),
        # the model's training summary, next to what was measured on it (the curve is in the training run)
        "train_loss": model["train_loss"],
        "train_seconds": model["train_seconds"],
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
        if labels is not None and dataset.is_image:
            class_metrics, tags = conditional_metrics(samples, labels, dataset, cfg.eval, device)
            metrics.update(class_metrics)
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    if cfg.eval.bpd and trainer.likelihood_note:
        client.set_tag(run_id, "bpd.skipped", trainer.likelihood_note)
    elif cfg.eval.bpd and vae is not None:
        from diffusion.latent import LIKELIHOOD_NOTE

        client.set_tag(run_id, "bpd.skipped", LIKELIHOOD_NOTE)
    elif cfg.eval.bpd and cfg.model.class_conditional and cfg.train.cond_dropout == 0:
        client.set_tag(run_id, "bpd.skipped", "class-conditional model without an unconditional half "
                       "(train.cond_dropout 0): its bits/dim of unlabelled data is not defined")
    elif cfg.eval.bpd:
        likelihood = _heldout_likelihood(trainer, cfg, key, cache, run_id)
        metrics.update(likelihood["metrics"])
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in likelihood["tags"].items()])
        if likelihood["elbo_curve"] is not None:
            client.log_dict(run_id, likelihood["elbo_curve"], "elbo_terms.json")
    if cfg.eval.inverse:
        metrics.update(_inverse_problems(trainer, dataset, cfg, client, run_id))
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, trainer.step) for k, v in metrics.items()])
    outcome.metrics, outcome.step = metrics, trainer.step


def _model_data(cfg: TrialConfig, cache: ModelCache, client: MlflowClient, run_id: str, device):
    """(the data the diffusion model sees, the data set, the VAE or None): for ``model.latent`` the VAE's codes
    (``diffusion.latent.latent_dataset``), else the data set itself."""
    dataset = load_dataset(cfg.data)
    if not cfg.model.latent:
        return dataset, dataset, None
    from diffusion.latent import latent_dataset

    vae = _vae_stage(cfg, dataset, cache, client, run_id, device)
    return latent_dataset(dataset, vae), dataset, vae


def _cached_stage(cache: ModelCache, prefix: str, spec: dict, run_id: str, fit: Callable[[], tuple],
                  build: Callable[[dict], torch.nn.Module], device, seconds_key: str) -> tuple:
    """A small network trained once per ``spec`` and kept in the model cache as ``<prefix>-<hash>``: the first
    caller trains it (``fit() -> (module, record)``) under the entry's lock and stores ``<prefix>.pt`` and
    ``<prefix>.json`` (the record, its training time under ``seconds_key``, the run that computed it and the spec);
    later callers load it into ``build(record)``. The record holds the checksum of ``<prefix>.pt`` (``files``); a
    weights file that does not match it, or does not load, is reported and the network trained again. Returns
    (module in eval mode, record, entry)."""
    entry = f"{prefix}-" + hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    weights = f"{prefix}.pt"
    with cache.lock(entry, prefix, note=f"run {run_id}"):
        record = cache.read(entry, f"{prefix}.json")
        module = None
        if record is not None:
            problem = cache.verify(entry, weights, (record.get("files") or {}).get(weights))
            if problem is None:
                try:
                    module = build(record).to(device)
                    state = torch.load(cache.fetch(entry, weights), map_location=device, weights_only=True)
                    module.load_state_dict(state)
                except Exception as error:  # noqa: BLE001 - damaged in a way its record cannot tell (no checksum)
                    module, problem = None, f"cannot be loaded: {type(error).__name__}: {str(error)[:200]}"
            if problem is not None:
                warn_damaged(entry, weights, problem, "training it again")
        if module is None:
            started = time.perf_counter()
            module, record = fit()
            record = {**record, seconds_key: time.perf_counter() - started, "computed_by_run": run_id, "spec": spec}
            save_atomic({k: v.detach().cpu() for k, v in module.state_dict().items()}, cache.local(entry, weights))
            record["files"] = {weights: cache.publish_file(entry, weights)}
            cache.write(entry, f"{prefix}.json", record)
    return module.eval(), record, entry


def _vae_stage(cfg: TrialConfig, dataset, cache: ModelCache, client: MlflowClient, run_id: str, device):
    """The VAE of latent diffusion, trained once per data set, latent options, batch size and seed and kept in the
    model cache (``vae-<hash>``, :func:`_cached_stage`): the first training that needs it trains it, later
    trainings and evaluations load it. Its reconstruction and KL on the test split are logged to the run as
    metrics, with tags naming the entry and the run that trained it."""
    from diffusion.latent import build_vae, fit_vae, vae_spec

    vae, record, entry = _cached_stage(cache, "vae", vae_spec(cfg), run_id, lambda: fit_vae(cfg, dataset, device),
                                       lambda record: build_vae(cfg, dataset.shape), device, "vae_train_seconds")
    client.log_batch(run_id, metrics=[Metric(k, float(v), int(time.time() * 1000), 0) for k, v in record.items()
                                      if k.startswith("vae_")],
                     tags=[RunTag("vae.entry", entry), RunTag("vae.computed_by_run", record["computed_by_run"]),
                           RunTag("vae.latent_shape", "x".join(map(str, record["latent_shape"]))),
                           RunTag("vae.scale", f"{record['scale']:.4f}")])
    return vae


def _guidance_classifier(cfg: TrialConfig, dataset, trainer: Trainer, cache: ModelCache, client: MlflowClient,
                         run_id: str) -> torch.nn.Module:
    """The noise-conditional classifier of classifier guidance, trained once per data set, process, step count
    and seed and kept in the model cache (``classifier-<hash>``, :func:`_cached_stage`): the first evaluation that
    needs it trains it, later ones load it. Its test accuracy at three noise levels is tagged."""
    from diffusion.guidance import build_noisy_classifier, classifier_spec, fit_noisy_classifier

    classifier, record, entry = _cached_stage(
        cache, "classifier", classifier_spec(cfg), run_id,
        lambda: fit_noisy_classifier(cfg, dataset, trainer.process, trainer.device),
        lambda record: build_noisy_classifier(record["shape"], record["num_classes"]), trainer.device, "train_seconds")
    tags = {"guidance.classifier": entry, "guidance.classifier_computed_by_run": record["computed_by_run"]}
    tags.update({f"guidance.classifier_{k}": f"{v:.4f}" for k, v in record.items() if k.startswith("accuracy_")})
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return classifier


def _inverse_problems(trainer: Trainer, dataset, cfg: TrialConfig, client: MlflowClient, run_id: str) -> dict:
    """The ``eval.inverse`` stages on the first ``eval.inverse_n`` test images with the EMA model: per stage its
    metrics (``diffusion.inverse.solve_heldout``, plus ``<stage>_seconds``), a grid ``<stage>.png`` of observed /
    restored / true images, and tags naming the solver and the measurement."""
    from diffusion.inverse import restoration_grid, solve_heldout
    from diffusion.samplers import make_timesteps

    device = trainer.device
    images = dataset.test[: cfg.eval.inverse_n].to(device)
    timesteps = make_timesteps(trainer.process, cfg.sample, device)
    metrics, tags = {}, {}
    for index, stage in enumerate(cfg.eval.inverse):
        generator = torch.Generator(device=device).manual_seed(cfg.seed + 10 + index)
        started = time.perf_counter()
        result = solve_heldout(stage, trainer.ema_denoiser(), images, timesteps, cfg.eval, generator)
        metrics.update({**result["metrics"], f"{stage}_seconds": time.perf_counter() - started})
        measurement = f"mask {cfg.eval.inverse_mask}" if stage == "inpaint" else f"sigma_y {cfg.eval.inverse_sigma_y}"
        tags[f"{stage}.solver"], tags[f"{stage}.measurement"] = cfg.eval.inverse_solver, measurement
        tags[f"{stage}.images"] = str(len(images))
        grid = restoration_grid(result["observed"], result["restored"], images, nrow=min(16, len(images)))
        client.log_image(run_id, _png(grid), artifact_file=f"{stage}.png")
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return metrics


def _png(grid: torch.Tensor):
    """An image grid [3, H, W] in [0, 1] as a PIL image, enlarged 4x (8x8 digits are otherwise too small to see)."""
    from PIL import Image

    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(array).resize((array.shape[1] * 4, array.shape[0] * 4), Image.NEAREST)


def _heldout_likelihood(trainer: Trainer, cfg: TrialConfig, key: str, cache: ModelCache, run_id: str) -> dict:
    """Bits/dim of held-out data under the model, computed once per model and likelihood settings: the
    first evaluation computes it (the others wait on the lock) and later ones read it from the cache.
    The tag ``bpd.computed_by_run`` names the run that computed it; ``bpd_seconds`` is its time there."""
    name = f"likelihood-{likelihood_key(cfg)}"
    with cache.lock(key, name):
        stored = cache.read(key, f"{name}.json")
        if stored is None:
            started = time.perf_counter()
            result = trainer.heldout_likelihood()
            metrics = {**result.metrics, "bpd_seconds": time.perf_counter() - started}
            stored = {"metrics": metrics, "tags": {**result.tags, "bpd.computed_by_run": run_id},
                      "elbo_curve": result.elbo_curve}
            cache.write(key, f"{name}.json", stored)
    return stored


def _log_sample_grid(client: MlflowClient, run_id: str, samples: torch.Tensor, is_image: bool, step: int) -> None:
    """A PNG grid of samples: ``samples.png`` in the artifacts, and under the ``samples`` image key
    (the UI's image view) at the training step."""
    if is_image:
        from torchvision.utils import make_grid

        nrow = max(1, int(math.sqrt(len(samples))))
        grid = make_grid(samples.clamp(-1, 1), nrow=nrow, padding=1, normalize=True, value_range=(-1, 1), pad_value=0.5)
        image = _png(grid)
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
