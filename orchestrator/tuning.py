"""A sweep's trials on Ray Tune: the tasks (``plan_tasks``: trainings, evaluations waiting for their model), one Tune
experiment running them (``run_trials``, ``_fit``: ``taskqueue.TaskQueue`` as its search algorithm, per-task
resources, the sweep's scheduler as Tune's, ``taskqueue.early_stopping``) and where Tune keeps its state. ``run``
is the driver's ``runner.SweepRun`` (this module does not import the runner, which imports it). Ray is imported in the
functions that use it."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re

from .cache import filesystem, is_uri, local_path
from .preflight import keep_credentials_out_of_tune


def plan_tasks(run, pending: list[tuple]) -> tuple[list[dict], dict[str, list[dict]]]:
    """The sweep's Tune tasks: (those that can start now, the evaluations waiting for a model, by training key).
    A model not in the cache is trained by a task that then evaluates its group's first pending trial; the group's
    other trials wait for that task. A data-parallel training (``resources.workers`` > 1, ``orchestrator.parallel``)
    is a task of its own, named ``train <its first trial>``, and every trial of its group waits for it. A cached
    model's trials are evaluated at once, one task each. Training tasks come first: they are the longest, and the
    others wait for them."""
    training, ready, waiting = [], [], {}
    for group, trials in pending:
        if run.cache.has(group.key):
            ready += [_task(group, [trial], train=False) for trial in trials]
            continue
        if group.trials[0].config.resources.workers > 1:  # its Ray Train workers hold the resources: train only
            training.append(_task(group, [], train=True))
            waiting[group.key] = [_task(group, [trial], train=False) for trial in trials]
            continue
        training.append(_task(group, trials[:1], train=True))
        if trials[1:]:
            waiting[group.key] = [_task(group, [trial], train=False) for trial in trials[1:]]
    scheduler = run.sweep.scheduler
    if scheduler is not None and scheduler.stops:  # the trainings heed its stops (fit.fit_model)
        for task in training:
            task["scheduler"] = scheduler.task()
    return training + ready, waiting


def run_trials(run, pending: list[tuple]) -> None:
    """Every pending trial in one Tune experiment (``_fit``): the trainings and the evaluations on cached models
    start at once; the other evaluations of a model start as soon as its training task ends, not when every training
    has (``TaskQueue``). The trials of a model that failed to train are recorded FAILED, not evaluated."""
    from .trial import record_stopped, record_unevaluated, stop_of

    ready, waiting = plan_tasks(run, pending)
    stops: dict[str, dict] = {}  # training key -> the scheduler's stop (the note its training reads)

    def model_ready(key: str) -> bool:
        return run.cache.has(key)

    def not_evaluated(key: str, tasks: list[dict]) -> None:
        training = (run.cache.training_run(key) or {}).get("run_id", "none")
        stop = stop_of(run.client.get_run(training)) if key in stops and training != "none" else None
        for task in tasks:
            for trial in task["trials"]:
                if stop is not None:  # the training ended where the scheduler stopped it: not evaluated
                    record_stopped(run.client, run.context, trial, key, {**stops[key], **stop})
                else:
                    record_unevaluated(run.client, run.context, trial, key,
                                       f"training failed (training run {training}): not evaluated")
        if run.display is not None:
            run.display.drop([task["name"] for task in tasks], stopped=stop is not None)

    from .taskqueue import TaskQueue, early_stopping  # Ray Tune: imported by the commands that run trials only

    queue = TaskQueue(ready, waiting, dataclasses.asdict(run.context), model_ready, not_evaluated)
    scheduler = None
    if run.sweep.scheduler is not None and run.sweep.scheduler.stops:
        scheduler = early_stopping(run.sweep.scheduler, lambda trial_id, result: stop_training(run, queue, stops,
                                                                                              trial_id, result))
        if run.resume:  # the scheduler's state: what the earlier runs' trainings reported
            from .taskqueue import replay

            replay(scheduler, past_reports(run))
    _fit(run, queue, scheduler)


def past_reports(run) -> dict[str, list[dict]]:
    """The scheduler's metric as the trainings that ended in earlier runs of this (resumed) sweep reported it, read
    back from MLflow: training run id -> [{train_step, metric}, ...] in step order."""
    from .scheduler import TIME_ATTR
    from .trial import STAGE_TAG, TRAIN

    metric = run.sweep.scheduler.metric
    trainings = run.client.search_runs(
        [run.context.experiment_id], f"tags.`mlflow.parentRunId` = '{run.context.parent_run_id}' and "
        f"tags.{STAGE_TAG} = '{TRAIN}' and attributes.status = 'FINISHED'", max_results=10_000,
        order_by=["attributes.start_time ASC"])
    return {t.info.run_id: [{TIME_ATTR: m.step, metric: m.value} for m in
                            sorted(run.client.get_metric_history(t.info.run_id, metric), key=lambda m: m.step)]
            for t in trainings}


def stop_training(run, queue, stops: dict, trial_id: str, result: dict) -> None:
    """The sweep's scheduler stops the training of Tune's trial ``trial_id`` at the step of ``result``: the note
    the training reads right after that report (``scheduler.stop_note``, in its model-cache entry)."""
    from .scheduler import TIME_ATTR, stop_note

    task = queue.task_of(trial_id)
    if task is None or not task["train"] or TIME_ATTR not in result:
        return
    metric = run.sweep.scheduler.metric
    note = {"by": run.sweep.scheduler.name, "step": int(result[TIME_ATTR]), "metric": metric,
            "value": result.get(metric)}
    run.cache.write(task["key"], stop_note(run.context.parent_run_id), note)
    stops[task["key"]] = note


def _task(group, trials: list, train: bool) -> dict:
    """One Ray Tune trial's work (``trial.execute_task``), named after its first trial (a training that evaluates
    none: ``train <the group's first trial>``), with the resources of that trial."""
    resources = dataclasses.asdict((trials[0] if trials else group.trials[0]).config.resources)
    task = {"name": trials[0].name if trials else f"train {group.trials[0].name}", "key": group.key, "train": train,
            "group": [t.name for t in group.trials], "trials": [t.as_dict() for t in trials], "resources": resources,
            "max_failures": resources["max_failures"]}
    if not trials:  # the trial whose config the model is trained with
        task["trains"] = group.trials[0].as_dict()
    return task


def _fit(run, queue, scheduler=None) -> None:
    """Run the tasks of ``queue`` (a ``taskqueue.TaskQueue``) on Ray Tune, each with the resources of its trials, as the Tune experiment
    ``<sweep>-<parent run>-trials<suffix>``. ``run.env``: the credentials workers of a joined cluster need,
    handed over through Ray's object store (``tune.with_parameters``), never in Tune's config."""
    from ray import tune

    from .parallel import task_resources
    from .trial import run_task

    tasks = queue.tasks
    if run.display is not None:
        run.display.stage(tasks, last=True)
    if not tasks:
        return
    sweep = run.sweep

    def resources(config: dict) -> dict:
        return task_resources(config["task"]["resources"], config["task"]["train"])

    keep_credentials_out_of_tune()
    # Tune keeps one trial pending at a time for a search algorithm of its own (TaskQueue): every task that can start
    # may be pending at once, so that the first trials' workers start together
    pending_set = "TUNE_MAX_PENDING_TRIALS_PG" not in os.environ  # a value the user set wins
    if pending_set:
        os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(len(tasks))
    # a scheduler's metric is in the trainings' reports that measure it only, never in the evaluations'
    strict_set = scheduler is not None and "TUNE_DISABLE_STRICT_METRIC_CHECKING" not in os.environ
    if strict_set:
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    trainable = tune.with_resources(tune.with_parameters(run_task, env=run.env), resources)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=queue,
            **({"scheduler": scheduler} if scheduler is not None else {}),
            num_samples=len(tasks),  # one trial per task; fewer when a model fails to train (TaskQueue)
            max_concurrent_trials=sweep.max_concurrent,
            # a trial's worker process (its imports, its data) serves the next trial; not with data-parallel
            # trainings, which wait for CPUs that an idle cached worker would keep
            reuse_actors=not any(task["resources"]["workers"] > 1 for task in tasks),
            trial_name_creator=lambda t: t.config["task"]["name"],
            trial_dirname_creator=lambda t: trial_dirname(t.config["task"]["name"]),
        ),
        run_config=tune.RunConfig(
            name=f"{sweep.name}-{run.context.parent_run_id[:8]}-trials{run.suffix}",
            **_tune_storage(sweep.storage, run.workdir),
            # a task whose worker died runs again and continues where it stopped (trial.execute_task)
            failure_config=tune.FailureConfig(max_failures=max(t["max_failures"] for t in tasks)),
            callbacks=[run.display.callback(tune)] if run.display is not None else [],
            verbose=0,
        ),
    )
    try:
        tuner.fit()
    finally:
        if pending_set:
            os.environ.pop("TUNE_MAX_PENDING_TRIALS_PG", None)
        if strict_set:
            os.environ.pop("TUNE_DISABLE_STRICT_METRIC_CHECKING", None)



_UNSAFE_IN_PATH = re.compile(r"[^A-Za-z0-9_.,=+-]")

def trial_dirname(name: str) -> str:
    """A directory name for a trial: its name where that is a safe one, else the name with every character
    outside [A-Za-z0-9_.,=+-] replaced and a hash of the whole name appended (grid values may hold '/', quotes,
    spaces; two names that differ only there still get two directories)."""
    safe = _UNSAFE_IN_PATH.sub("_", name)[:100]
    if safe == name:
        return name
    return f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _tune_storage(storage: str, workdir: str) -> dict:
    """RunConfig arguments for Tune's state: a directory, or an object store through the same pyarrow file
    system as the model cache (``cache.filesystem``: endpoint and credentials from the environment)."""
    if not is_uri(storage):
        return {"storage_path": storage_path(storage, workdir)}
    fs, path = filesystem(storage)
    return {"storage_path": path, "storage_filesystem": fs}


def storage_path(storage: str, workdir: str) -> str:
    return storage if is_uri(storage) else os.path.join(workdir, local_path(storage))
