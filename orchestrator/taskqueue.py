"""The order of a sweep's trials on Ray Tune: each evaluation starts as soon as its own model is trained
(``TaskQueue``); a scheduler's stops carried out by the trainings themselves (``early_stopping``)."""
from __future__ import annotations

import json
from typing import Callable, Optional

from ray.tune.schedulers import AsyncHyperBandScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.search import Searcher


class TaskQueue(Searcher):
    """Tune's source of a sweep's trials (its search algorithm): it hands out the tasks that can run (``suggest``)
    and holds back each evaluation whose model is being trained until that model's training task ends
    (``on_trial_complete``): then they can run if the model is in the cache (``model_ready(key)``), else they are
    given to ``not_evaluated(key, tasks)`` (recorded FAILED) and not run. The sweep ends when no task is left.
    Tune pickles its search algorithm with the experiment's state: the driver's hooks are left out of that."""

    def __init__(self, ready: list[dict], waiting: dict[str, list[dict]], context: dict,
                 model_ready: Optional[Callable[[str], bool]] = None,
                 not_evaluated: Optional[Callable[[str, list[dict]], None]] = None):
        super().__init__()
        self.ready, self.waiting, self.context = list(ready), {k: list(v) for k, v in waiting.items()}, context
        self.model_ready, self.not_evaluated = model_ready, not_evaluated
        self.running: dict[str, dict] = {}  # Tune's trial id -> its task

    @property
    def tasks(self) -> list[dict]:
        """Every task not handed out yet: those that can run, then those waiting for their model."""
        return self.ready + [task for tasks in self.waiting.values() for task in tasks]

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str):
        if self.ready:
            task = self.running[trial_id] = self.ready.pop(0)
            return {"task": task, "context": self.context}
        return None if self.waiting else Searcher.FINISHED  # None: asked again once a trial ends

    def task_of(self, trial_id: str) -> Optional[dict]:
        return self.running.get(trial_id)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        task = self.running.pop(trial_id, None)
        if task is None or not task["train"] or task["key"] not in self.waiting:
            return
        waiting = self.waiting.pop(task["key"])
        if self.model_ready is None or self.model_ready(task["key"]):
            self.ready.extend(waiting)
        elif self.not_evaluated is not None:
            self.not_evaluated(task["key"], waiting)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "model_ready": None, "not_evaluated": None}

    def save(self, checkpoint_path: str) -> None:
        """Tune's experiment checkpoint: the tasks left (a resumed sweep plans again from MLflow and the cache)."""
        with open(checkpoint_path, "w", encoding="utf-8") as handle:
            json.dump({"ready": self.ready, "waiting": self.waiting}, handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, encoding="utf-8") as handle:
            state = json.load(handle)
        self.ready, self.waiting = state["ready"], state["waiting"]


class _Cooperative:
    """A Tune scheduler whose stops the trainings carry out themselves (``orchestrator.scheduler``): a STOP is handed
    to ``on_stop(trial_id, result)``, which leaves the training a note, and Tune is told to CONTINUE, so the
    training, blocked in its report until then, reads the note and ends at that very step, its model published.
    (Tune's own stop would end the trial's process while it was still recording.) Evaluations never carry the time
    attribute, so the schedulers never judge them."""

    on_stop: Optional[Callable[[str, dict], None]] = None

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and self.on_stop is not None:
            self.on_stop(trial.trial_id, result)
        # never PAUSE either (the median rule pauses a trial to let pending ones catch up): a training's state is in
        # the model cache's checkpoints, not in Tune's, so a paused trial would start over
        return TrialScheduler.CONTINUE if decision in (TrialScheduler.STOP, TrialScheduler.PAUSE) else decision

    def __getstate__(self) -> dict:
        return {**self.__dict__, "on_stop": None}


class CooperativeASHA(_Cooperative, AsyncHyperBandScheduler):
    pass


class CooperativeMedian(_Cooperative, MedianStoppingRule):
    pass


def early_stopping(scheduler, on_stop: Callable[[str, dict], None]):
    """Tune's scheduler for ``scheduler`` (an ``orchestrator.scheduler.Scheduler`` that stops trainings: asha or
    median), its stops handed to ``on_stop(trial_id, result)``."""
    kind = CooperativeASHA if scheduler.name == "asha" else CooperativeMedian
    tune = kind(**scheduler.tune_options())
    tune.on_stop = on_stop
    return tune


class _Past:
    """A training of an earlier run of the sweep, as Tune's schedulers see a trial (``replay``)."""

    status = "TERMINATED"

    def __init__(self, trial_id: str):
        self.trial_id = trial_id

    def __repr__(self) -> str:
        return f"past training {self.trial_id}"


class _NoLiveTrials:
    def get_live_trials(self) -> list:
        return []


def replay(tune, histories: dict[str, list[dict]]) -> None:
    """Give Tune's scheduler ``tune`` (``early_stopping``'s) the reports of trainings an earlier run of the sweep
    made (a resumed sweep: ``histories``, training run id -> its results in step order, each with the time attribute
    and the metric), as if it had seen them: ASHA's rungs and the median rule's running means hold them, so that the
    trainings still to come are judged against them. Nothing is stopped while replaying."""
    hook, tune.on_stop = tune.on_stop, None
    try:
        for run_id, results in histories.items():
            trial = _Past(run_id)
            tune.on_trial_add(_NoLiveTrials(), trial)
            for result in results:
                tune.on_trial_result(_NoLiveTrials(), trial, result)
            if results:
                tune.on_trial_complete(_NoLiveTrials(), trial, results[-1])
    finally:
        tune.on_stop = hook
