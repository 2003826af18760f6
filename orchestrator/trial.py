"""The work of a sweep on a Ray worker: train a model once into the model cache, evaluate trials on it.

A sweep's trials are grouped by training key (``orchestrator.keys.training_key``: everything that affects
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

import contextlib
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from diffusion.evaluation import SAMPLES_IMAGE, Report, evaluate
from diffusion.training import TrainingDiverged, build_trainer, select_device

from . import stages
from .keys import training_spec
from .cache import CHECKPOINT, CHECKPOINT_SUM, ModelCache
from .schema import SweepTrialConfig
from .sweepfile import flatten
from .fit import fit_model, trial_config, where
from .scheduler import STOPPED_MODEL_TAG, STOPPED_STEP_TAG, STOPPED_TAG, stop_note, stopped_line
from .tracking import PARENT_TAG

FAILURE_TAG = "failure_reason"
STAGE_TAG, TRAIN, EVALUATE = "stage", "train", "evaluate"
TRAINING_RUN_TAG, TRAINING_HASH_TAG, MODEL_CACHE_TAG = "training_run_id", "training_hash", "model_cache"


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
    "trials": [Trial.as_dict(), ...] to evaluate (none for a data-parallel training, whose "trains" is the trial
    it trains with)}. Trains first when "train" is set (a failed training
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
                trains = task["trials"][0] if task["trials"] else task["trains"]
                train_model(trial_config(trains), task["key"], task["group"], context, client, cache, report, entered,
                            task.get("scheduler"))
            except Stopped as stopped:  # by the sweep's scheduler: its trials are not evaluated
                for trial in task["trials"]:
                    record_stopped(client, context, trial, task["key"], stopped.stop)
                report({"stopped": 1.0, "step": stopped.stop["step"], "phase": "done"})
                return []
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


class PhaseReporter:
    """Tells Tune how far a task has got: ``report({"phase", "phase_step", "phase_total", **extra})`` at every
    phase change, at a phase's last step, and otherwise at most every ``every`` seconds (a sampler calls back at
    every step; each report is a round trip to Tune and a line in its result files). Phases: ``prepare``,
    ``train`` and those of ``diffusion.evaluation.PHASES``; the driver's view reads them (``progress``)."""

    def __init__(self, report: Callable[[dict], None], every: float = 1.0, clock=time.monotonic):
        self.report, self.every, self.clock = report, every, clock
        self.phase, self.last = None, -float("inf")

    def __call__(self, phase: str, done: int, total: int, **extra) -> None:
        now = self.clock()
        if phase != self.phase or done >= total or now - self.last >= self.every or extra:
            self.phase, self.last = phase, now
            self.report({"phase": phase, "phase_step": int(done), "phase_total": int(total), **extra})


def _transient(error: BaseException) -> bool:
    """Lost contact with the tracking server (after the MLflow client's own retries): worth a retry."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
        return True
    return isinstance(error, MlflowException) and any(
        word in str(error) for word in ("Max retries exceeded", "Connection refused", "ConnectionError", "timed out"))


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
    """Every child run's tags; ``model_cache``: where its model is kept (``orchestrator.results.load_model`` finds
    the weights there)."""
    return {PARENT_TAG: context.parent_run_id, "sweep": context.sweep_name, STAGE_TAG: stage, TRAINING_HASH_TAG: key,
            MODEL_CACHE_TAG: context.cache_root}


def find_run(client: MlflowClient, context: TrialContext, stage: str, **tags: str):
    """This sweep run's latest child run of ``stage`` with ``tags`` (e.g. trial=name), or None.

    The filter holds only values this code made (the parent run's id, the stage); the user's values (a trial
    name carries grid values, which may hold quotes) are compared here, never spliced into a filter string."""
    runs = client.search_runs([context.experiment_id],
                              f"tags.`{PARENT_TAG}` = '{context.parent_run_id}' and tags.{STAGE_TAG} = '{stage}'",
                              max_results=10_000, order_by=["attributes.start_time DESC"])
    return next((run for run in runs if all(run.data.tags.get(name) == value for name, value in tags.items())), None)


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


class Stopped(Exception):
    """A training the sweep's scheduler stopped (``orchestrator.scheduler``): its run ended FINISHED and tagged, its
    model published under the key of the steps it trained; ``stop`` says by what, where and under which key."""

    def __init__(self, stop: dict):
        super().__init__(f"stopped by {stop['by']} at step {stop['step']}")
        self.stop = stop


def train_model(cfg: SweepTrialConfig, key: str, group: list[str], context: TrialContext, client: MlflowClient,
                cache: ModelCache, report: Callable[[dict], None], entered: Optional[float] = None,
                scheduler: Optional[dict] = None) -> str:
    """Train the model of ``key`` in a training run and publish it in the cache; returns the run id. ``scheduler``:
    the sweep's early stopping (``Scheduler.task()``); a training it stops raises :class:`Stopped`.

    When this sweep run already has a training run for the key, that run continues: nothing is done if it
    finished and the cache has the model; otherwise training resumes from the cache's last checkpoint
    (bit for bit: the checkpoint holds every random state), and the steps logged before are not logged
    twice; a damaged checkpoint is reported and training starts from step 0 (:func:`resume_trainer`).

    Training holds the entry's lock (``ModelCache.lock(key, "train")``): another sweep that plans to train
    the same model waits for it, then finds the model complete and does not train it; its trials are
    evaluated on that model, linked to the training run that made it, as for a model taken from the cache
    (the id returned is that run's). A waiter gives up after ``$ORCHESTRATOR_CACHE_LOCK_TIMEOUT`` seconds
    (``locks.LockTimeout``, naming the entry and the holder): the task's trials are recorded FAILED with it."""
    torch.set_num_threads(max(1, int(cfg.resources.cpu)))
    previous = find_run(client, context, TRAIN, **{TRAINING_HASH_TAG: key})
    if previous is not None and previous.info.status == "FINISHED":
        if cache.has(key):
            return previous.info.run_id
        stop = stop_of(previous)
        if stop is not None:  # stopped by the scheduler in an earlier run of this sweep: not continued
            raise Stopped(stop)
    with cache.lock(key, "train", note=f"sweep {context.sweep_name}, parent run {context.parent_run_id}"):
        model = cache.model(key)
        if model is not None:
            return _trained_meanwhile(client, key, model, previous)
        if scheduler is not None:
            scheduler = {**scheduler, "note": stop_note(context.parent_run_id)}
        return _train(cfg, key, group, context, client, cache, report, entered, previous, scheduler)


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


NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI (Markdown)


def training_run_name(group: list[str]) -> str:
    """A training run's name: its trial's (``train ddpm-seed=0``); a model several trials share is named after the
    first, with the count of the others. The training key is the tag ``training_hash``."""
    return f"train {group[0]}" + (f" (+{len(group) - 1} sharing it)" if len(group) > 1 else "")


def evaluation_note(trial: dict, experiment_id: str, training_run: str) -> str:
    """An evaluation run's description: its trial and variant, and a link to the run that trained its model."""
    link = f"[{training_run}](#/experiments/{experiment_id}/runs/{training_run})" if training_run else "none recorded"
    return (f"Trial `{trial['name']}` of variant `{trial['variant']}`: the evaluation (samples, FID, bits/dim) of the "
            f"model trained in run {link}.")


def _train(cfg: SweepTrialConfig, key: str, group: list[str], context: TrialContext, client: MlflowClient,
           cache: ModelCache, report: Callable[[dict], None], entered: Optional[float], previous,
           scheduler: Optional[dict] = None) -> str:
    """:func:`train_model`'s training, under the entry's lock, with this sweep run's earlier training run or None:
    in this process (:func:`fit_model`), or data-parallel on ``resources.workers`` Ray Train workers
    (``orchestrator.parallel``)."""
    spec = training_spec(cfg)
    if previous is None:
        tags = {**_base_tags(context, TRAIN, key), "trials": ",".join(group)[:5000]}
        run_id = client.create_run(context.experiment_id, run_name=training_run_name(group), tags=tags).info.run_id
        cache.remove(key, CHECKPOINT)  # another sweep's unfinished training: this run starts from step 0
        cache.remove(key, CHECKPOINT_SUM)
    else:
        run_id = _reopen(client, previous)
    cache.write(key, "spec.json", spec)
    cache.write(key, "run.json", {"run_id": run_id, "experiment_id": context.experiment_id})
    try:
        if previous is None:
            _log_params(client, run_id, spec)
            client.log_text(run_id, OmegaConf.to_yaml(spec), "config.yaml")
        report({"phase": "prepare", "phase_step": 0, "phase_total": 1})
        if cfg.resources.workers > 1:
            from .parallel import train_data_parallel  # Ray Train: imported by data-parallel trials only

            train_data_parallel(cfg, key, run_id, context, entered)
        else:
            stop = fit_model(cfg, key, run_id, context.experiment_id, client, cache, report, entered,
                             resume=previous is not None, scheduler=scheduler)
    except BaseException as error:  # recorded, then re-raised so Ray marks the trial as errored
        _fail(client, run_id, error)
        raise
    client.set_terminated(run_id, status="FINISHED")
    if stop:
        raise Stopped(stop)
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
        client.set_tag(run_id, NOTE_TAG, evaluation_note(trial, context.experiment_id, training_run))
        return run_id
    tags = {**_base_tags(context, EVALUATE, key), "variant": trial["variant"], "trial": trial["name"],
            TRAINING_RUN_TAG: training_run, NOTE_TAG: evaluation_note(trial, context.experiment_id, training_run)}
    run_id = client.create_run(context.experiment_id, run_name=trial["name"], tags=tags).info.run_id
    _log_params(client, run_id, {**trial["config"], "variant": trial["variant"]})
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


def stop_of(training_run) -> Optional[dict]:
    """The stop a training run's tags record (``fit_model``), or None: {"by", "step", "model_key"}."""
    tags = training_run.data.tags
    if STOPPED_TAG not in tags:
        return None
    return {"by": tags[STOPPED_TAG], "step": int(tags[STOPPED_STEP_TAG]), "model_key": tags.get(STOPPED_MODEL_TAG, "")}


def record_stopped(client: MlflowClient, context: TrialContext, trial: dict, key: str, stop: dict) -> Optional[str]:
    """An evaluation run for a trial whose training the sweep's scheduler stopped: not evaluated, ended FINISHED
    with the tags ``stopped_by`` and ``stopped_at_step``, the training's time and steps (``train_seconds``,
    ``train_steps``: the compute it used), and a description saying how to evaluate the model it has."""
    training = (ModelCache(context.cache_root).training_run(key) or {}).get("run_id", "")
    run_id = _evaluation_run(client, context, trial, key, training)
    if run_id is None:
        return None
    line = stopped_line(stop, trial["config"]["train"]["steps"])
    note = (evaluation_note(trial, context.experiment_id, training) + f"\n\nNot evaluated: its training was {line}. "
            f"The model at that step is in the model cache as `{stop.get('model_key', '')}`: a sweep of this trial "
            f"with `train.steps: {stop['step']}` evaluates it without training it.")
    tags = [RunTag(STOPPED_TAG, stop["by"]), RunTag(STOPPED_STEP_TAG, str(stop["step"])),
            RunTag(STOPPED_MODEL_TAG, stop.get("model_key", "")), RunTag(NOTE_TAG, note)]
    seconds = client.get_run(training).data.metrics.get("train_seconds") if training else None
    now = int(time.time() * 1000)
    metrics = [Metric("train_steps", float(stop["step"]), now, 0)]
    if seconds is not None:
        metrics.append(Metric("train_seconds", seconds, now, 0))
    client.log_batch(run_id, metrics=metrics, tags=tags)
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def evaluate_trial(trial: dict, key: str, context: TrialContext, client: MlflowClient, cache: ModelCache,
                   report: Callable[[dict], None]) -> TrialOutcome:
    """Sample from the cached model of ``key`` with the trial's settings and measure it, in its own run."""
    cfg = trial_config(trial)
    torch.set_num_threads(max(1, int(cfg.resources.cpu)))
    model = cache.model(key)
    run_id = _evaluation_run(client, context, trial, key, model["run_id"] if model else "")
    if run_id is None:  # finished in an earlier attempt
        return TrialOutcome(find_run(client, context, EVALUATE, trial=trial["name"]).info.run_id)
    outcome = TrialOutcome(run_id)
    try:
        if model is None:
            raise RuntimeError(f"no trained model with training key {key} in {cache.root}")
        _evaluate(cfg, key, model, client, run_id, cache, outcome, PhaseReporter(report))
    except BaseException as error:  # recorded, then re-raised so Ray marks the trial as errored
        _fail(client, run_id, error)
        raise
    client.set_terminated(run_id, status="FINISHED")
    report({**outcome.metrics, "step": outcome.step, "phase": "done"})
    return outcome


def _evaluate(cfg: SweepTrialConfig, key: str, model: dict, client: MlflowClient, run_id: str, cache: ModelCache,
              outcome: TrialOutcome, progress: Optional[PhaseReporter] = None) -> None:
    """The model of ``key`` loaded from the cache with what its evaluation keeps there (``orchestrator.stages``: the
    VAE, the guidance classifier, the held-out likelihood), measured by ``diffusion.evaluation.evaluate``, and its
    report recorded on the run with the model's training summary. When the evaluation fails, what it measured
    before (tags, images, files; no metrics) is recorded all the same. ``progress(phase, done, total)``: told of
    each phase (``prepare``, then the evaluation's)."""
    progress = progress or (lambda phase, done, total: None)
    progress("prepare", 0, 1)
    device = select_device(cfg.resources.device)
    where(client, run_id, device)
    model_data, dataset, vae = stages.model_data(cfg, cache, client, run_id, device)
    # FID's extractor and reference: made by the driver's Ray task (waited for here when it is still at it) or here
    fid = stages.fid_features(cfg, dataset, cache, f"evaluation run {run_id}") if cfg.eval.fid else None
    trainer = build_trainer(cfg, model_data, device, cfg.resources.amp)
    trainer.load_ema(cache.fetch(key, "ema.pt"))
    # obtained before evaluate: neither drawing the labels nor the classifier's training consume shared random state
    classifier = None
    if cfg.sample.classifier_scale:
        progress("classifier", 0, 1)
        classifier = stages.guidance_classifier(cfg, dataset, trainer, cache, client, run_id)
    report = Report()
    if fid is not None:  # who trained (or first loaded) FID's extractor for this sweep's cache, and where
        report.tags["fid.prepared_by"] = f"{fid['prepared_by']} ({fid['host']}:{fid['pid']})"
    try:
        evaluate(trainer, dataset, cfg, vae=vae, classifier=classifier,
                 likelihood=stages.likelihood_memo(cfg, key, cache, run_id), report=report, progress=progress)
    except BaseException:
        with contextlib.suppress(Exception):  # the evaluation's own error is the one to record
            record_report(client, run_id, report, metrics=False)
        raise
    # the model's training summary, next to what was measured on it (the curve is in the training run)
    report.metrics.update({"train_loss": model["train_loss"], "train_seconds": model["train_seconds"]})
    record_report(client, run_id, report)
    outcome.metrics, outcome.step = report.metrics, report.step


def record_report(client: MlflowClient, run_id: str, report: Report, metrics: bool = True) -> None:
    """An evaluation's report on its run: the tags, each image as an artifact (``samples.png`` also under the image
    key ``samples`` at the training step: the UI's image view), each file as a JSON artifact, and (``metrics``)
    the metrics at the training step."""
    tags = [RunTag(k, v) for k, v in report.tags.items()]
    for start in range(0, len(tags), 100):  # MLflow takes at most 100 tags per batch
        client.log_batch(run_id, tags=tags[start : start + 100])
    for name, image in report.images.items():
        client.log_image(run_id, image, artifact_file=name)
        if name == SAMPLES_IMAGE:
            client.log_image(run_id, image, key="samples", step=report.step)
    for name, content in report.files.items():
        client.log_dict(run_id, content, name)
    if metrics:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, report.step) for k, v in report.metrics.items()])
