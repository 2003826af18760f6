"""A sweep file's scheduler section (orchestrator.scheduler): its validation, ASHA's rungs against Tune's own, and the
cooperative stop (orchestrator.taskqueue.early_stopping) on Tune's real schedulers fed results by hand. The sweep that
really stops a training is in test_adaptive."""
import pytest
import yaml
from ray.tune import register_trainable
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from diffusion.errors import ConfigError
from orchestrator.scheduler import TIME_ATTR, Scheduler
from orchestrator.sweepfile import load_sweep
from orchestrator.taskqueue import early_stopping, replay


def write(tmp_path, scheduler: dict, every: int = 20, steps: int = 100, **base) -> str:
    sweep = {"name": "s", "base": {"data": {"name": "digits"}, "train": {"steps": steps, "log_every": 10},
                                   "eval": {"fid": True, "every": every}, **base},
             "grid": {"train.lr": [1e-3, 2e-3]}, "scheduler": scheduler}
    path = tmp_path / "scheduler.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return str(path)


def test_asha_defaults_and_rungs_are_tunes(tmp_path):
    scheduler = load_sweep(write(tmp_path, {"name": "asha", "reduction_factor": 2})).scheduler
    assert (scheduler.metric, scheduler.mode, scheduler.grace_period, scheduler.max_t) == ("fid", "min", 20, 100)
    tune = AsyncHyperBandScheduler(**scheduler.tune_options())
    assert sorted(m for m, _ in tune._brackets[0]._rungs) == scheduler.milestones() == [20, 40, 80]
    assert "rungs at steps 20, 40, 80, keeping the best 1/2" in scheduler.describe()
    fifo = load_sweep(write(tmp_path, {"name": "fifo"})).scheduler
    assert not fifo.stops and "no early stopping" in fifo.describe()
    loss = load_sweep(write(tmp_path, {"name": "median", "metric": "train_loss"}, every=0)).scheduler
    assert loss.grace_period == 10 and loss.min_samples_required == 3  # the first log step


@pytest.mark.parametrize("scheduler, extra, key, fragment", [
    ({"name": "pbt"}, {}, "scheduler.name", "not built yet"),
    ({"name": "hyperband"}, {}, "scheduler.name", "fifo, asha, median"),
    ({"name": "asha", "metric": "bpd_ode"}, {}, "scheduler.metric", "reported during training"),
    ({"name": "asha", "metric": "kid"}, {"every": 0}, "scheduler.metric", "eval.every 0"),
    ({"name": "asha", "mode": "lowest"}, {}, "scheduler.mode", "min or max"),
    ({"name": "asha", "grace_period": 100}, {}, "scheduler.grace_period", "from 1 to 99"),
    ({"name": "asha", "grace_period": 0}, {}, "scheduler.grace_period", "from 1 to 99"),
    ({"name": "asha", "reduction_factor": 1}, {}, "scheduler.reduction_factor", "above 1"),
    ({"name": "asha", "max_t": 20}, {}, "scheduler.max_t", "above grace_period (20)"),
    ({"name": "asha", "min_samples_required": 2}, {}, "scheduler.min_samples_required", "the keys of asha"),
    ({"name": "median", "min_samples_required": 0}, {}, "scheduler.min_samples_required", "an integer >= 1"),
    ({"name": "fifo", "metric": "fid"}, {}, "scheduler.metric", "the keys of fifo: name"),
    ("asha", {}, "scheduler", "a mapping"),
])
def test_bad_scheduler_sections_are_refused_naming_the_key(tmp_path, scheduler, extra, key, fragment):
    with pytest.raises(ConfigError) as error:
        load_sweep(write(tmp_path, scheduler, **extra))
    assert error.value.key == key and fragment in str(error.value)


def test_a_data_parallel_sweep_is_refused_early_stopping(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_sweep(write(tmp_path, {"name": "asha"}, resources={"workers": 2}))
    assert error.value.key == "scheduler.name" and "data-parallel" in str(error.value)


class Controller:
    """What the median rule asks of Tune's controller: the live trials (one pending, so that it would pause)."""

    def __init__(self, trials):
        self.trials = trials

    def get_live_trials(self):
        return self.trials


@pytest.mark.parametrize("name", ["asha", "median"])
def test_a_stop_goes_to_the_training_and_tune_is_told_to_continue(name):
    """Tune's own scheduler decides; the wrapper hands its STOP to the hook and tells Tune CONTINUE (the training
    ends itself at that step). Results without the time attribute (evaluations) are never judged."""
    scheduler = Scheduler(name=name, metric="fid", grace_period=10, reduction_factor=2, max_t=100,
                          min_samples_required=1)
    stops = []
    tune = early_stopping(scheduler, lambda trial_id, result: stops.append((trial_id, result[TIME_ATTR])))
    register_trainable("fake", lambda config: None)
    good, poor = Trial("fake", trial_id="good"), Trial("fake", trial_id="poor")
    for trial in (good, poor):
        tune.on_trial_add(None, trial)
    controller = Controller([good, poor])
    assert tune.on_trial_result(controller, good, {TIME_ATTR: 10, "fid": 5.0}) == TrialScheduler.CONTINUE
    assert tune.on_trial_result(controller, good, {TIME_ATTR: 20, "fid": 4.0}) == TrialScheduler.CONTINUE
    assert tune.on_trial_result(controller, poor, {"fid": 90.0, "phase": "done"}) == TrialScheduler.CONTINUE  # evaluation
    assert stops == []
    assert tune.on_trial_result(controller, poor, {TIME_ATTR: 10, "fid": 50.0}) == TrialScheduler.CONTINUE
    assert stops == [("poor", 10)]
    assert tune.__getstate__()["on_stop"] is None  # Tune pickles it with the experiment: the driver's hook stays out


@pytest.mark.parametrize("name", ["asha", "median"])
def test_a_resumed_sweep_judges_new_trainings_against_the_replayed_ones(name):
    """``replay`` gives the scheduler what trainings of an earlier run reported (read back from MLflow when a sweep
    is resumed): a new training worse than them is stopped at its first judgement, as it would have been had the
    driver not died; a replayed training the scheduler would have stopped is not "stopped" again."""
    scheduler = Scheduler(name=name, metric="fid", grace_period=10, reduction_factor=2, max_t=100,
                          min_samples_required=1)
    register_trainable("fake", lambda config: None)
    for replayed in (False, True):
        stops = []
        tune = early_stopping(scheduler, lambda trial_id, result: stops.append(trial_id))
        if replayed:
            replay(tune, {"good": [{TIME_ATTR: 10, "fid": 5.0}, {TIME_ATTR: 20, "fid": 4.0}],
                          "worse": [{TIME_ATTR: 10, "fid": 60.0}]})
        poor = Trial("fake", trial_id="poor")
        tune.on_trial_add(None, poor)
        tune.on_trial_result(Controller([poor]), poor, {TIME_ATTR: 10, "fid": 50.0})
        assert stops == (["poor"] if replayed else [])
