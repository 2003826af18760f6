"""A sweep file's ``scheduler`` section: trainings stopped early by Ray Tune's trial schedulers, on a metric the
trainings report while they train.

    scheduler:
      name: asha                 # fifo (none: the default) | asha | median
      metric: fid                # fid or kid (FID during training: eval.every > 0), or train_loss
      mode: min
      grace_period: 500          # steps a training runs before it can be stopped
      reduction_factor: 2        # asha: keep the best 1/reduction_factor at each rung
      max_t: 3000                # asha: the longest training's steps (the default)
      min_samples_required: 3    # median: trainings that must have reached a step before one is judged there

The schedulers are Tune's (``AsyncHyperBandScheduler``, ``MedianStoppingRule``), judging the training tasks by
their reports' ``train_step`` (Tune's time attribute here) and the metric. Evaluations report neither, so they are
never judged. How a stop happens (``taskqueue.early_stopping``): Tune's decision is taken, the training's model-cache
entry gets a note (``stop-<parent run>.json``: the scheduler, the step, the value) and Tune lets the trial go on;
the training reads the note right after that report, so it ends at exactly the step it was judged at. It publishes
its EMA weights under the training key of its config with ``train.steps`` set to that step (:func:`stopped_config`:
nothing in training depends on ``train.steps`` but when it ends, so that key describes the weights exactly), ends
its training run FINISHED with the tags ``stopped_by`` and ``stopped_at_step``, and the trials of that model are
recorded as stopped, not evaluated: their evaluation runs end FINISHED with the same tags and say how to evaluate
the model (a sweep with ``train.steps`` at the stop step finds it in the cache).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from diffusion.errors import ConfigError

NAMES = ("fifo", "asha", "median", "pbt")
KEYS = {
    "fifo": ("name",),
    "asha": ("name", "metric", "mode", "grace_period", "reduction_factor", "max_t"),
    "median": ("name", "metric", "mode", "grace_period", "min_samples_required"),
}
METRICS = ("fid", "kid", "train_loss")  # reported while training: FID during training, the training loss
TIME_ATTR = "train_step"  # what a training's reports carry and no evaluation's does
STOPPED_TAG, STOPPED_STEP_TAG, STOPPED_MODEL_TAG = "stopped_by", "stopped_at_step", "stopped_model_key"


@dataclass
class Scheduler:
    name: str = "fifo"
    metric: str = "train_loss"
    mode: str = "min"
    grace_period: int = 1
    reduction_factor: float = 4.0
    max_t: int = 1
    min_samples_required: int = 3

    @property
    def stops(self) -> bool:
        """Whether it stops trainings (fifo never does)."""
        return self.name != "fifo"

    def describe(self) -> str:
        if not self.stops:
            return "scheduler: fifo (no early stopping)"
        rule = (f"rungs at steps {', '.join(f'{m:g}' for m in self.milestones())}, keeping the best 1/{self.reduction_factor:g}"
                if self.name == "asha" else
                f"a training whose best {self.metric} is worse than the median of the others' running means at the "
                f"same step is stopped (at least {self.min_samples_required} others)")
        return (f"scheduler: {self.name} on {self.metric} ({self.mode}) during training, from step {self.grace_period}"
                f"; {rule}")

    def milestones(self) -> list[float]:
        """ASHA's rungs as Tune makes them: grace_period x reduction_factor^k, k from 0 while it stays within max_t
        (a rung at a training's last step judges a finished training: it is not stopped)."""
        if self.name != "asha":
            return []
        count = int(math.log(self.max_t / self.grace_period) / math.log(self.reduction_factor) + 1)
        return [self.grace_period * self.reduction_factor ** k for k in range(count)]

    def task(self) -> dict:
        """What a training task is told: the scheduler and the metric after whose reports it reads the stop note."""
        return {"name": self.name, "metric": self.metric}

    def tune_options(self) -> dict:
        """The arguments of Tune's scheduler (``taskqueue.early_stopping`` builds it). ASHA's stop_last_trials is
        off: a training that reaches max_t has finished, not been stopped."""
        options = {"time_attr": TIME_ATTR, "metric": self.metric, "mode": self.mode, "grace_period": self.grace_period}
        if self.name == "asha":
            return {**options, "reduction_factor": self.reduction_factor, "max_t": self.max_t, "stop_last_trials": False}
        return {**options, "min_samples_required": self.min_samples_required}


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_scheduler(raw: Any, trials: list) -> Scheduler:
    """The ``scheduler`` section checked against the sweep's trials: ConfigError naming ``scheduler.<key>``."""
    if not isinstance(raw, dict):
        raise ConfigError("scheduler", raw, "a mapping with name (" + ", ".join(NAMES[:3]) + ") and its options")
    name = raw.get("name", "fifo")
    if name == "pbt":
        raise ConfigError("scheduler.name", name, ", ".join(KEYS),
                          detail="population-based training (checkpoints copied through the model cache, mutated "
                                 "hyperparameters) is not built yet")
    if name not in KEYS:
        raise ConfigError("scheduler.name", name, ", ".join(KEYS))
    unknown = sorted(str(k) for k in raw if k not in KEYS[name])
    if unknown:
        raise ConfigError(f"scheduler.{unknown[0]}", raw[unknown[0]], f"the keys of {name}: " + ", ".join(KEYS[name]),
                          detail="unknown key")
    scheduler = Scheduler(name=name)
    if name == "fifo":
        return scheduler
    workers = next((t for t in trials if t.config.resources.workers > 1), None)
    if workers is not None:
        raise ConfigError("scheduler.name", name, "fifo", detail=f"trial {workers.name} trains data-parallel "
                          f"(resources.workers {workers.config.resources.workers}): early stopping of data-parallel "
                          "trainings is not built yet")
    metric = raw.get("metric", "fid")
    if metric not in METRICS:
        raise ConfigError("scheduler.metric", metric, ", ".join(METRICS) + " (a metric reported during training)")
    off = next((t for t in trials if metric != "train_loss" and not (t.config.eval.fid and t.config.eval.every)), None)
    if off is not None:
        raise ConfigError("scheduler.metric", metric, "train_loss, or fid/kid with eval.fid and eval.every > 0 in every "
                          "trial", detail=f"trial {off.name} measures no {metric} during training (eval.every "
                          f"{off.config.eval.every}, eval.fid {off.config.eval.fid})")
    mode = raw.get("mode", "min")
    if mode not in ("min", "max"):
        raise ConfigError("scheduler.mode", mode, "min or max")
    shortest = min(t.config.train.steps for t in trials)
    first = max((t.config.eval.every if metric != "train_loss" else t.config.train.log_every) for t in trials)
    grace = raw.get("grace_period", first)  # default: every training has reported the metric once
    if not _integer(grace) or not 1 <= grace < shortest:
        raise ConfigError("scheduler.grace_period", grace, f"an integer number of steps from 1 to {shortest - 1} "
                          "(below the shortest training's train.steps)")
    scheduler.metric, scheduler.mode, scheduler.grace_period = metric, mode, grace
    if name == "asha":
        factor = raw.get("reduction_factor", 4)
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 1 < factor <= 1000:
            raise ConfigError("scheduler.reduction_factor", factor, "a number above 1 (Tune's default: 4)")
        longest = max(t.config.train.steps for t in trials)
        max_t = raw.get("max_t", longest)
        if not _integer(max_t) or not grace < max_t:
            raise ConfigError("scheduler.max_t", max_t, f"an integer number of steps above grace_period ({grace}); "
                              f"default: the longest training's train.steps ({longest})")
        scheduler.reduction_factor, scheduler.max_t = float(factor), max_t
    else:
        samples = raw.get("min_samples_required", 3)
        if not _integer(samples) or samples < 1:
            raise ConfigError("scheduler.min_samples_required", samples, "an integer >= 1 (Tune's default: 3)")
        scheduler.min_samples_required = samples
    return scheduler


def stop_note(parent_run_id: str) -> str:
    """The name of the stop note in a training's model-cache entry, per sweep run (another sweep training the same
    model is not stopped by it)."""
    return f"stop-{parent_run_id}.json"


def stopped_config(cfg, step: int):
    """``cfg`` with ``train.steps`` = ``step``: the config whose training key describes a training stopped there."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=step))


def stopped_line(stop: dict, planned: int) -> str:
    """How a stopped trial is described: ``stopped by asha at step 500 of 2000 (fid 41.2)``."""
    value = f" ({stop['metric']} {stop['value']:.4g})" if isinstance(stop.get("value"), (int, float)) else ""
    return f"stopped by {stop['by']} at step {stop['step']} of {planned}{value}"
