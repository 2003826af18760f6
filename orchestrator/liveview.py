"""What the driver shows while a sweep runs: one line per running trial and one for the sweep (``sweep_display``),
redrawn in place on a terminal (``LiveView``, rich's ``Live``) and timestamped lines elsewhere (``PlainView``), fed
Tune's events by ``SweepDisplay.callback``; and how to open the results once the sweep is done (``results_hint``)."""
from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

# --------------------------------------------------------------------------------------------
# The live view: one line per running trial, one for the sweep
# --------------------------------------------------------------------------------------------

# what a trial reports to Tune besides its metrics: {"phase": one of these, "phase_step": i, "phase_total": n}
# (``trial.phase_reporter``; the evaluation's phases are ``diffusion.evaluation.PHASES``)
PHASE_LABELS = {"start": "starting", "prepare": "preparing", "train": "train", "classifier": "classifier",
                "sample": "sample", "fid": "FID", "bpd": "bits/dim", "inpaint": "inpaint", "denoise": "denoise",
                "done": "done"}
PROGRESS_EVERY = float(os.environ.get("ORCHESTRATOR_PROGRESS_EVERY", "30"))  # plain output: s between a trial's lines
ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")


def duration(seconds: Optional[float]) -> str:
    """A short duration: 45s, 1m12s, 1h03m; "?" when unknown."""
    if seconds is None or seconds != seconds or seconds == math.inf:
        return "?"
    seconds = int(round(max(0.0, seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class TrialProgress:
    """One trial (a Tune task, named after the trial it evaluates) as the driver last heard of it."""

    name: str
    train: bool  # trains its model first
    started: float
    phase: str = "start"
    step: int = 0
    total: int = 0
    anchor: Optional[tuple[float, int]] = None  # (time, step) of the phase's first report: the rate's origin
    updated: float = 0.0  # time of the last report
    loss: Optional[float] = None
    status: str = "running"  # running, finished, failed, stopped (by the sweep's scheduler)
    ended: Optional[float] = None
    metrics: dict = field(default_factory=dict)

    def eta(self, now: float) -> Optional[float]:
        """Seconds left in the current phase at the rate since its first report, counted down between reports;
        None when there is no rate yet."""
        if self.total <= 0 or self.anchor is None or self.step <= self.anchor[1]:
            return None
        rate = (self.updated - self.anchor[0]) / (self.step - self.anchor[1])
        return max(0.0, rate * (self.total - self.step) - (now - self.updated))

    def elapsed(self, now: float) -> float:
        return (self.ended if self.ended is not None else now) - self.started

    def steps(self) -> str:
        """"step 200/1500" in a phase with steps, "" in one reported as a whole (FID, bits/dim)."""
        return f"{self.step}/{self.total}" if self.total > 1 else ""


class SweepProgress:
    """A sweep's trials as Tune's events tell them (``start``, ``result``, ``complete``), for the views; ``clock``
    injected (tests). ``trials``: the names of every trial to run; ``concurrency``: the sweep's max_concurrent
    (None: as many as run at once)."""

    def __init__(self, trials: list[str], concurrency: Optional[int] = None, clock=time.time, name: str = ""):
        self.clock, self.name, self.concurrency = clock, name, concurrency
        self.started = clock()
        self.names = list(dict.fromkeys(trials))
        self.trials: dict[str, TrialProgress] = {}
        self.trains: set[str] = set()  # the tasks that train their model first
        self.training_only: set[str] = set()  # tasks that train and evaluate nothing (data-parallel): not trials
        self.unrun: set[str] = set()  # trials left out of every stage (their model failed to train): failed
        self.unrun_stopped: set[str] = set()  # trials left out because the scheduler stopped their model's training

    def stage(self, tasks: list[dict], last: bool = False) -> None:
        """A Tune stage starts with ``tasks`` (``tuning._task``); ``last``: no other stage follows, so a trial not
        started by now is never run (recorded FAILED: its model failed to train)."""
        self.trains |= {task["name"] for task in tasks if task["train"]}
        self.training_only |= {task["name"] for task in tasks if task["train"] and task.get("trials") == []}
        if last:
            planned = {task["name"] for task in tasks}
            self.unrun = {name for name in self.names if name not in self.trials and name not in planned}

    def drop(self, names: list[str], stopped: bool = False) -> None:
        """Trials that will not run: their model failed to train, so they are recorded FAILED (counted failed), or
        (``stopped``) the sweep's scheduler stopped its training (counted stopped)."""
        dropped = {name for name in names if name not in self.trials}
        if stopped:
            self.unrun_stopped |= dropped
        else:
            self.unrun |= dropped

    def start(self, name: str, train: bool) -> TrialProgress:
        now = self.clock()
        trial = self.trials.get(name)
        if trial is None or trial.status != "running":  # a retried trial starts over
            trial = self.trials[name] = TrialProgress(name, train, now, updated=now)
        if name not in self.names and name not in self.training_only:
            self.names.append(name)
        return trial

    def result(self, name: str, result: dict) -> tuple[TrialProgress, bool]:
        """A reported result; returns the trial and whether its phase changed."""
        now = self.clock()
        trial = self.trials.get(name) or self.start(name, "train_loss" in result)
        if result.get("failed"):
            trial.status, trial.ended = "failed", now
            return trial, True
        phase = result.get("phase")
        if phase is None:  # a result without a phase: training's loss (before phases were reported) or metrics
            phase = "train" if "train_loss" in result and "fid" not in result and "sample_nfe" not in result else "done"
        changed = phase != trial.phase
        if changed:
            trial.phase, trial.anchor = phase, None
        trial.step = int(result.get("phase_step", result.get("step", 0)) or 0)
        trial.total = int(result.get("phase_total", 0) or 0)
        trial.updated = now
        if trial.anchor is None or trial.step < trial.anchor[1]:
            trial.anchor = (now, trial.step)
        if phase == "train" and "train_loss" in result:
            trial.loss = float(result["train_loss"])
        if phase == "done":
            trial.metrics = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        return trial, changed

    def complete(self, name: str, failed: bool) -> TrialProgress:
        now = self.clock()
        trial = self.trials.get(name) or self.start(name, False)
        trial.status = "failed" if failed or trial.status == "failed" else "stopped" if trial.metrics.get("stopped") \
            else "finished"
        trial.ended = trial.ended or now
        return trial

    def counts(self) -> dict[str, int]:
        """finished, running, failed and pending trials (a data-parallel training's own task is shown, not
        counted: its trials are)."""
        states = [t.status for name, t in self.trials.items() if name not in self.training_only]
        counts = {s: states.count(s) for s in ("finished", "running", "failed", "stopped")}
        counts["failed"] += len(self.unrun)
        counts["stopped"] += len(self.unrun_stopped)
        counts["pending"] = max(0, len(self.names) - len(states) - len(self.unrun) - len(self.unrun_stopped))
        return counts

    def running(self) -> list[TrialProgress]:
        return [t for t in self.trials.values() if t.status == "running"]

    def eta(self, now: float) -> Optional[float]:
        """Seconds until the sweep ends: each running trial's remaining time and each pending trial's duration at
        the mean duration of the finished trials of its kind (training or evaluation only, else any), shared by
        the trials that run at once; None before a trial finished and once none is left."""
        done = [t for t in self.trials.values() if t.status == "finished" and t.ended is not None]
        running = self.running()
        pending = [n for n in self.names if n not in self.trials and n not in self.unrun | self.unrun_stopped]
        if not done or not (running or pending):
            return None

        def expected(train: bool) -> float:
            same = [t.elapsed(now) for t in done if t.train == train] or [t.elapsed(now) for t in done]
            return sum(same) / len(same)

        left = sum(max(0.0, expected(t.train) - t.elapsed(now)) for t in running)
        left += sum(expected(n in self.trains) for n in pending)
        slots = self.concurrency or max(1, len(running))
        return left / max(1, min(slots, max(1, len(running) + len(pending))))

    def trial_line(self, trial: TrialProgress, now: float) -> str:
        """``[ddpm-seed=0] train 200/1500 loss 0.0831 (1m12s, ETA 4m)``: phase, steps, elapsed, the phase's ETA."""
        parts = [f"[{trial.name}]", PHASE_LABELS.get(trial.phase, trial.phase)]
        if trial.steps():
            parts.append(trial.steps())
        if trial.phase == "train" and trial.loss is not None:
            parts.append(f"loss {trial.loss:.4f}")
        eta = trial.eta(now)
        timing = duration(trial.elapsed(now)) + (f", ETA {duration(eta)}" if eta is not None else "")
        return " ".join(parts) + f" ({timing})"

    def end_line(self, trial: TrialProgress, now: float) -> str:
        """A finished trial with what it measured, or a failed one."""
        if trial.status == "failed":
            return f"[{trial.name}] FAILED after {duration(trial.elapsed(now))} (the reason: summary below)"
        m, shown = trial.metrics, []
        if m.get("stopped"):
            return (f"[{trial.name}] stopped early by the scheduler at step {m.get('step', 0):.0f} after "
                    f"{duration(trial.elapsed(now))}: not evaluated")
        if "fid" in m:
            shown.append(f"fid {m['fid']:.3f}" + (f" (reference {m['fid_reference']:.3f})" if "fid_reference" in m
                                                  else ""))
        if "bpd_ode" in m:
            shown.append(f"bits/dim {m['bpd_ode']:.2f}")
        if "sample_nfe" in m:
            shown.append(f"nfe {m['sample_nfe']:.0f}")
        return f"[{trial.name}] finished in {duration(trial.elapsed(now))}" + (": " + ", ".join(shown) if shown else "")

    def sweep_line(self, now: float) -> str:
        """``sweep smoke: 1/4 finished, 1 running, 0 failed, 2 pending (3m12s, ETA 5m)``."""
        c = self.counts()
        eta = self.eta(now)
        timing = duration(now - self.started) + (f", ETA {duration(eta)}" if eta is not None else "")
        name = f"sweep {self.name}" if self.name else "sweep"
        stopped = f", {c['stopped']} stopped early" if c["stopped"] else ""
        return (f"{name}: {c['finished']}/{len(self.names)} finished, {c['running']} running, {c['failed']} failed"
                f"{stopped}, {c['pending']} pending ({timing})")


class PlainView:
    """For a stdout that is not a terminal (CI, ``| tee``, a log file): timestamped lines, a trial's progress at
    most every ``every`` seconds, and every phase change, start, finish and failure with the sweep's line."""

    def __init__(self, progress: SweepProgress, out=None, every: float = PROGRESS_EVERY):
        self.progress, self.out, self.every = progress, out, every
        self.last: dict[str, float] = {}  # a trial's last line

    def _print(self, line: str, now: float) -> None:
        out = self.out or sys.stdout
        print(f"{time.strftime('%H:%M:%S', time.localtime(now))} {line}", file=out, flush=True)

    def started(self, trial: TrialProgress) -> None:
        now = self.progress.clock()
        work = "training, then evaluation" if trial.train else "evaluation"
        self._print(f"[{trial.name}] started ({work})", now)
        self._print(self.progress.sweep_line(now), now)
        self.last[trial.name] = now

    def updated(self, trial: TrialProgress, changed: bool) -> None:
        now = self.progress.clock()
        if trial.status != "running" or trial.phase == "done":
            return  # the end line says it
        if changed or now - self.last.get(trial.name, -math.inf) >= self.every:
            self._print(self.progress.trial_line(trial, now), now)
            self.last[trial.name] = now

    def ended(self, trial: TrialProgress) -> None:
        now = self.progress.clock()
        self._print(self.progress.end_line(trial, now), now)
        self._print(self.progress.sweep_line(now), now)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class LiveView:
    """For a terminal: the running trials and the sweep, one line each, redrawn in place (rich's ``Live``, twice
    a second); a trial that ends leaves its line above them. ``stop`` erases the live lines and prints the sweep's
    line; whatever else is printed meanwhile (Ray's worker logs) appears above them."""

    def __init__(self, progress: SweepProgress, console=None):
        from rich.console import Console
        from rich.live import Live

        self.progress = progress
        self.console = console or Console()
        self.live = Live(console=self.console, get_renderable=self.render, refresh_per_second=2, transient=True,
                         redirect_stdout=True, redirect_stderr=True)

    def render(self):
        """What the live lines show now: a table of the running trials (trial, phase, step/total, elapsed, ETA of
        the phase, loss) and the sweep's line."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        now = self.progress.clock()
        table = Table(box=None, show_header=True, header_style="bold", pad_edge=False, padding=(0, 1))
        for column in ("trial", "phase", "step", "elapsed", "ETA", "loss"):
            table.add_column(column, no_wrap=True, justify="right" if column in ("step", "elapsed", "ETA") else "left")
        for trial in self.progress.running():
            eta = trial.eta(now)
            table.add_row(trial.name, PHASE_LABELS.get(trial.phase, trial.phase), trial.steps(),
                          duration(trial.elapsed(now)), duration(eta) if eta is not None else "",
                          f"{trial.loss:.4f}" if trial.phase == "train" and trial.loss is not None else "")
        return Group(table, Text(self.progress.sweep_line(now), style="bold"))

    def started(self, trial: TrialProgress) -> None:
        self.live.refresh()

    def updated(self, trial: TrialProgress, changed: bool) -> None:
        if changed:
            self.live.refresh()

    def ended(self, trial: TrialProgress) -> None:
        now = self.progress.clock()
        line = self.progress.end_line(trial, now)
        self.live.console.print(f"{time.strftime('%H:%M:%S', time.localtime(now))} {line}", markup=False,
                                highlight=False, style="red" if trial.status == "failed" else None)
        self.live.refresh()

    def start(self) -> None:
        self.live.start()

    def stop(self) -> None:
        """Idempotent: the live lines erased, the cursor shown, the sweep's line printed once."""
        if self.live.is_started:
            self.live.stop()
            self.console.print(self.progress.sweep_line(self.progress.clock()), markup=False, highlight=False)
            self.console.show_cursor(True)


ACTIVE_VIEWS: list = []  # the views shown now (InterruptWatch stops them before a hard exit)
_DISPLAYS: dict = {}  # id -> SweepDisplay, for its Tune callbacks (``SweepDisplay.callback``)


class _StripAnsi:
    """A text stream that drops ANSI escape sequences (Ray's coloured worker prefixes, coloured log records)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(ANSI.sub("", text))
        return len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _handle(key: int, event: str, trial, *args) -> None:
    """A Tune event for the display ``_DISPLAYS[key]`` (module level: pickled by reference, with no display)."""
    display = _DISPLAYS.get(key)
    if display is None:
        return
    progress, view = display.progress, display.view
    name = trial.config["task"]["name"]
    if event == "start":
        view.started(progress.start(name, trial.config["task"]["train"]))
    elif event == "result":
        state, changed = progress.result(name, args[0])
        if state.status == "running":
            view.updated(state, changed)
    else:
        view.ended(progress.complete(name, event == "error" or bool((trial.last_result or {}).get("failed"))))


class SweepDisplay:
    """What the driver shows while a sweep's stages run: a ``SweepProgress`` fed by Tune's events (``callback``)
    and drawn by a ``LiveView`` on a terminal or a ``PlainView`` elsewhere. ``open`` starts the view (and, for plain
    output, strips ANSI escapes from everything the driver prints); ``close`` stops it, however the stages end."""

    def __init__(self, progress: SweepProgress, view):
        self.progress, self.view = progress, view
        self._streams = None

    def open(self) -> "SweepDisplay":
        if isinstance(self.view, PlainView):
            self._streams = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = _StripAnsi(sys.stdout), _StripAnsi(sys.stderr)
        self.view.start()
        ACTIVE_VIEWS.append(self.view)
        return self

    def close(self) -> None:
        _DISPLAYS.pop(id(self), None)
        if self.view in ACTIVE_VIEWS:
            ACTIVE_VIEWS.remove(self.view)
        try:
            self.view.stop()
        finally:
            if self._streams is not None:
                sys.stdout, sys.stderr = self._streams
                self._streams = None

    def stage(self, tasks: list[dict], last: bool = False) -> None:
        """A stage of ``tasks`` starts (``last``: the sweep's last stage; see ``SweepProgress.stage``)."""
        self.progress.stage(tasks, last)

    def drop(self, names: list[str], stopped: bool = False) -> None:
        """Trials that will not run (see ``SweepProgress.drop``)."""
        self.progress.drop(names, stopped)

    def callback(self, tune):
        """The Tune callback that feeds the display Tune's events. Tune pickles its callbacks with the experiment's
        state, and a terminal's console cannot be pickled: the callback holds only the display's key in
        ``_DISPLAYS`` (a copy unpickled elsewhere finds no display and shows nothing)."""
        key = id(self)
        _DISPLAYS[key] = self
        handle = functools.partial(_handle, key)

        class ProgressCallback(tune.Callback):
            def on_trial_start(self, iteration, trials, trial, **info):
                handle("start", trial)

            def on_trial_result(self, iteration, trials, trial, result, **info):
                handle("result", trial, result)

            def on_trial_complete(self, iteration, trials, trial, **info):
                handle("complete", trial)

            def on_trial_error(self, iteration, trials, trial, **info):
                handle("error", trial)

        return ProgressCallback()


@contextlib.contextmanager
def sweep_display(trials: list[str], concurrency: Optional[int] = None, name: str = "", live: Optional[bool] = None,
                  out=None) -> Iterator[SweepDisplay]:
    """The display of a sweep's stages: live on a terminal (``live`` None: whether stdout is one), plain timestamped
    lines otherwise; stopped however the body ends (Ctrl-C, errors), leaving the terminal as it was."""
    stream = out or sys.stdout
    if live is None:
        live = stream.isatty() and os.environ.get("TERM") != "dumb"
    progress = SweepProgress(trials, concurrency, name=name)
    if live:
        from rich.console import Console

        view = LiveView(progress, Console(file=out) if out is not None else None)
    else:
        view = PlainView(progress, out)
    display = SweepDisplay(progress, view).open()
    try:
        yield display
    finally:
        display.close()


def results_hint(workdir: str, uri: Optional[str] = None, view: str = "") -> str:
    """How to look at the results once the sweep's tracking server is gone: ``mlflow ui`` over the directory's
    database and artifacts (``tracking.LocalServer``'s), or the tracking server ``uri`` ($MLFLOW_TRACKING_URI);
    ``view``: the page to open, a path such as ``/#/experiments/1/runs?...`` (the sweep's comparison view)."""
    if uri and not uri.startswith(("file:", "sqlite:")) and "://" in uri:
        return f"results: {uri.rstrip('/')}{view} (MLflow)"
    import shlex

    workdir = os.path.abspath(workdir)
    command = (f"mlflow ui --backend-store-uri {shlex.quote('sqlite:///' + os.path.join(workdir, 'mlflow.db'))} "
               f"--artifacts-destination {shlex.quote(os.path.join(workdir, 'mlartifacts'))}")
    return f"results: {command}   (then open http://127.0.0.1:5000{view})"
