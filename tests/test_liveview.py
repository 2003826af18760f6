"""orchestrator.progress: what the driver shows while a sweep runs, fed synthetic Tune events with an injected
clock; the live view rendered on a fixed-width rich terminal and read back as text, the plain view as its lines."""
import io
import re
from types import SimpleNamespace

import pytest
from rich.console import Console

from orchestrator.liveview import (LiveView, PlainView, SweepDisplay, SweepProgress, duration, results_hint,
                                   sweep_display)
from orchestrator.trial import PhaseReporter

NAMES = ["ddpm-seed=0", "ncsn-seed=0", "ddpm-seed=1", "ncsn-seed=1"]
STAMP = re.compile(r"^\d\d:\d\d:\d\d ")


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def task(name: str, train: bool) -> dict:
    return {"name": name, "train": train}


def tune_trial(name: str, train: bool, last_result=None):
    """What the callback reads of a Tune trial: its config's task and its last result."""
    return SimpleNamespace(config={"task": task(name, train)}, last_result=last_result or {})


def screen(view: LiveView, width: int = 100) -> list[str]:
    """The live lines as a person sees them on a terminal ``width`` columns wide."""
    console = Console(file=io.StringIO(), force_terminal=True, width=width, record=True, color_system="truecolor")
    console.print(view.render())
    return [line.rstrip() for line in console.export_text().splitlines()]


def row(lines: list[str], name: str) -> list[str]:
    matches = [line.split() for line in lines if line.split()[:1] == [name]]
    assert len(matches) == 1, lines
    return matches[0]


@pytest.fixture
def sweep():
    """A sweep of four trials two at a time, driven through the Tune callback: both seed-0 trials train (stage 1),
    ddpm's training fails, so ddpm-seed=1 is never run; ncsn-seed=1 is evaluated on the trained model (stage 2)."""
    from ray import tune

    clock = Clock()
    progress = SweepProgress(NAMES, concurrency=2, clock=clock, name="demo")
    view = LiveView(progress, Console(file=io.StringIO(), force_terminal=True, width=100))
    display = SweepDisplay(progress, view)
    display.stage([task("ddpm-seed=0", True), task("ncsn-seed=0", True)])
    callback = display.callback(tune)
    return SimpleNamespace(clock=clock, progress=progress, view=view, display=display, callback=callback)


def test_live_view_shows_each_running_trial_and_the_sweep(sweep):
    clock, cb = sweep.clock, sweep.callback
    cb.on_trial_start(0, [], tune_trial("ddpm-seed=0", True))
    cb.on_trial_start(0, [], tune_trial("ncsn-seed=0", True))
    clock.now = 1060.0
    cb.on_trial_result(0, [], tune_trial("ddpm-seed=0", True), {"train_loss": 0.25, "step": 300, "phase": "train",
                                                                "phase_step": 300, "phase_total": 1500})
    clock.now = 1100.0
    cb.on_trial_result(0, [], tune_trial("ncsn-seed=0", True), {"phase": "sample", "phase_step": 0,
                                                                "phase_total": 1})
    clock.now = 1120.0
    cb.on_trial_result(0, [], tune_trial("ddpm-seed=0", True), {"train_loss": 0.125, "step": 600, "phase": "train",
                                                                "phase_step": 600, "phase_total": 1500})
    cb.on_trial_result(0, [], tune_trial("ncsn-seed=0", True), {"phase": "sample", "phase_step": 250,
                                                                "phase_total": 1000})
    lines = screen(sweep.view)
    assert lines[0].split() == ["trial", "phase", "step", "elapsed", "ETA", "loss"]
    # 300 steps in 60 s: the 900 left take 3 minutes; 250 sampler steps in 20 s: the 750 left take 1 minute
    assert row(lines, "ddpm-seed=0") == ["ddpm-seed=0", "train", "600/1500", "2m00s", "3m00s", "0.1250"]
    assert row(lines, "ncsn-seed=0") == ["ncsn-seed=0", "sample", "250/1000", "2m00s", "1m00s"]
    assert lines[-1] == "sweep demo: 0/4 finished, 2 running, 0 failed, 2 pending (2m00s)"  # no ETA: none finished
    assert len(lines) == 4
    clock.now = 1150.0  # the ETA counts down between reports
    assert row(screen(sweep.view), "ddpm-seed=0")[4] == "2m30s"


def test_the_callback_of_a_live_view_can_be_pickled_as_tune_does(sweep):
    """Tune pickles its callbacks with the experiment's state; a terminal's console holds locks."""
    from ray import cloudpickle

    cloudpickle.loads(cloudpickle.dumps(sweep.callback))  # must not raise
    sweep.callback.on_trial_start(0, [], tune_trial("ddpm-seed=0", True))
    assert [t.name for t in sweep.progress.running()] == ["ddpm-seed=0"]


def test_finished_and_failed_trials_leave_the_live_lines_and_the_counts_and_eta_follow(sweep):
    clock, cb = sweep.clock, sweep.callback
    cb.on_trial_start(0, [], tune_trial("ddpm-seed=0", True))
    cb.on_trial_start(0, [], tune_trial("ncsn-seed=0", True))
    clock.now = 1300.0
    done = {"fid": 40.5, "fid_reference": 3.25, "sample_nfe": 1001.0, "bpd_ode": 4.5, "step": 1500, "phase": "done"}
    cb.on_trial_result(0, [], tune_trial("ncsn-seed=0", True), done)
    cb.on_trial_complete(0, [], tune_trial("ncsn-seed=0", True, done))
    clock.now = 1320.0
    cb.on_trial_result(0, [], tune_trial("ddpm-seed=0", True), {"failed": 1.0, "step": 0})
    cb.on_trial_complete(0, [], tune_trial("ddpm-seed=0", True, {"failed": 1.0, "step": 0}))
    # stage 2: only ncsn-seed=1 is evaluated (ddpm-seed=1's model failed to train)
    sweep.display.stage([task("ncsn-seed=1", False)], last=True)
    cb.on_trial_start(0, [], tune_trial("ncsn-seed=1", False))
    clock.now = 1330.0
    cb.on_trial_result(0, [], tune_trial("ncsn-seed=1", False), {"phase": "fid", "phase_step": 0, "phase_total": 1})
    clock.now = 1340.0
    lines = screen(sweep.view)
    assert [line.split()[0] for line in lines[1:-1]] == ["ncsn-seed=1"]  # the ended trials' lines are gone
    assert row(lines, "ncsn-seed=1") == ["ncsn-seed=1", "FID", "20s"]
    # the one finished trial took 300 s, so ncsn-seed=1 (20 s in) needs about 280 s more
    assert lines[-1] == "sweep demo: 1/4 finished, 1 running, 2 failed, 0 pending (5m40s, ETA 4m40s)"
    ended = sweep.view.console.file.getvalue()  # the lines printed above the live ones
    assert "[ncsn-seed=0] finished in 5m00s: fid 40.500 (reference 3.250), bits/dim 4.50, nfe 1001" in ended
    assert "[ddpm-seed=0] FAILED after 5m20s" in ended
    cb.on_trial_result(0, [], tune_trial("ncsn-seed=1", False), {**done, "phase": "done"})
    cb.on_trial_complete(0, [], tune_trial("ncsn-seed=1", False, done))
    assert screen(sweep.view)[-1] == "sweep demo: 2/4 finished, 0 running, 2 failed, 0 pending (5m40s)"


def test_a_live_view_stops_cleanly_on_an_interrupt_and_leaves_the_sweep_line():
    out = io.StringIO()
    out.isatty = lambda: True
    with pytest.raises(KeyboardInterrupt):
        with sweep_display(NAMES, 2, "demo", live=True, out=out) as display:
            assert display.view.live.is_started
            raise KeyboardInterrupt
    assert not display.view.live.is_started
    text = out.getvalue()
    assert "\x1b[?25h" in text  # the cursor shown again
    assert re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).rstrip().endswith(
        "sweep demo: 0/4 finished, 0 running, 0 failed, 4 pending (0s)")


def test_plain_view_prints_timestamped_rate_limited_lines_without_escapes():
    clock, out = Clock(), io.StringIO()
    progress = SweepProgress(NAMES[:2], clock=clock, name="demo")
    view = PlainView(progress, out, every=60.0)
    progress.stage([task("ddpm-seed=0", True), task("ncsn-seed=0", True)], last=True)
    view.started(progress.start("ddpm-seed=0", True))
    for step in range(10, 1510, 10):  # 150 loss reports, one every 2 s
        clock.now += 2.0
        view.updated(*progress.result("ddpm-seed=0", {"train_loss": 0.5, "step": step, "phase": "train",
                                                      "phase_step": step, "phase_total": 1500}))
    for phase in ("prepare", "sample", "fid", "bpd"):
        clock.now += 5.0
        view.updated(*progress.result("ddpm-seed=0", {"phase": phase, "phase_step": 0, "phase_total": 1}))
    clock.now += 5.0
    progress.result("ddpm-seed=0", {"phase": "done", "fid": 12.0, "fid_reference": 3.0, "sample_nfe": 1000.0})
    view.ended(progress.complete("ddpm-seed=0", False))
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue() and all(STAMP.match(line) for line in lines)
    text = [STAMP.sub("", line) for line in lines]
    train = [line for line in text if line.startswith("[ddpm-seed=0] train ")]
    assert 4 <= len(train) <= 6  # 300 s of training, one line a minute (and the first), not 150
    assert train[0] == "[ddpm-seed=0] train 10/1500 loss 0.5000 (2s)"
    assert train[1] == "[ddpm-seed=0] train 310/1500 loss 0.5000 (1m02s, ETA 3m58s)"
    assert [line.split()[1] for line in text if line.split()[1] in ("preparing", "sample", "FID", "bits/dim")] == \
        ["preparing", "sample", "FID", "bits/dim"]
    assert text[-2] == "[ddpm-seed=0] finished in 5m25s: fid 12.000 (reference 3.000), nfe 1000"
    assert text[-1] == "sweep demo: 1/2 finished, 0 running, 0 failed, 1 pending (5m25s, ETA 5m25s)"
    assert text[:2] == ["[ddpm-seed=0] started (training, then evaluation)",
                        "sweep demo: 0/2 finished, 1 running, 0 failed, 1 pending (0s)"]


def test_phase_reporter_reports_phase_changes_and_the_last_step_and_otherwise_at_most_every_second():
    clock, sent = Clock(0.0), []
    reporter = PhaseReporter(sent.append, every=1.0, clock=clock)
    for step in range(1, 101):  # 100 sampler steps, one every 1/32 s (exact in binary)
        clock.now += 1 / 32
        reporter("sample", step, 100)
    reporter("fid", 0, 1)
    assert [(r["phase"], r["phase_step"]) for r in sent] == [("sample", 1), ("sample", 33), ("sample", 65),
                                                              ("sample", 97), ("sample", 100), ("fid", 0)]
    assert all(r["phase_total"] == (100 if r["phase"] == "sample" else 1) for r in sent)


def test_duration_and_results_hint(tmp_path):
    assert [duration(s) for s in (0, 45.4, 72, 3600 + 180, None)] == ["0s", "45s", "1m12s", "1h03m", "?"]
    hint = results_hint(str(tmp_path), None)
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db --artifacts-destination " \
           f"{tmp_path}/mlartifacts" in hint
    assert results_hint(str(tmp_path), "https://mlflow.example.org") == "results: https://mlflow.example.org (MLflow)"


def test_a_data_parallel_training_task_is_shown_but_not_counted_as_a_trial():
    """``train <trial>`` (runner._task with no trials to evaluate) has its live line; the counts are the trials'."""
    clock = Clock()
    progress = SweepProgress(["dp-seed=0"], clock=clock, name="dp")
    view = LiveView(progress, Console(file=io.StringIO(), force_terminal=True, width=100))
    progress.stage([{"name": "train dp-seed=0", "train": True, "trials": []}])
    progress.start("train dp-seed=0", True)
    progress.result("train dp-seed=0", {"train_loss": 0.5, "step": 10, "phase": "train", "phase_step": 10,
                                         "phase_total": 100})
    lines = screen(view)
    assert row(lines, "train")[:4] == ["train", "dp-seed=0", "train", "10/100"]
    assert lines[-1].startswith("sweep dp: 0/1 finished, 0 running, 0 failed, 1 pending")
    progress.complete("train dp-seed=0", failed=False)
    progress.stage([{"name": "dp-seed=0", "train": False, "trials": [{}]}], last=True)
    progress.start("dp-seed=0", False)
    assert progress.counts() == {"finished": 0, "running": 1, "failed": 0, "stopped": 0, "pending": 0}
