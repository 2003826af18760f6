"""What the driver of a sweep shows and how it stops: Ctrl-C (``graceful_stop``, ``InterruptWatch``), one line
per Tune result (``progress_printer``)."""
from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from . import EXIT_INTERRUPTED
from .tracking import ACTIVE_SERVERS, end_unfinished_runs

STOP_GRACE_SECONDS = float(os.environ.get("ORCHESTRATOR_STOP_GRACE", "30"))


class InterruptWatch:
    """The backstop of Ctrl-C. The main thread gets KeyboardInterrupt (at the first Ctrl-C only) and stops
    gracefully (Ray shut down, unfinished runs marked KILLED). A watcher thread learns of every SIGINT through
    ``signal.set_wakeup_fd``, which Python's C signal handler writes to even while the main thread is blocked in
    native code (where no KeyboardInterrupt can be raised). If the driver is still stopping ``grace`` seconds after
    the first Ctrl-C, or at a second Ctrl-C, the watcher calls ``stop`` (mark the runs KILLED), leaves the local
    tracking server (stopped unless another sweep in the directory uses it) and exits with status 130 without waiting for Ray (a local Ray instance's processes share the
    driver's fate). Installed only from the main thread."""

    def __init__(self, stop, grace: float = STOP_GRACE_SECONDS):
        self.stop, self.grace, self.previous, self.closed = stop, grace, None, False
        self.interrupted, self.previous_handler = False, None
        if threading.current_thread() is not threading.main_thread():
            return
        read, write = os.pipe()
        os.set_blocking(write, False)
        try:
            self.previous = signal.set_wakeup_fd(write)
        except ValueError:
            return
        self.previous_handler = signal.signal(signal.SIGINT, self._first_only)
        threading.Thread(target=self._watch, args=(read,), name="interrupt-watch", daemon=True).start()

    def _first_only(self, signum, frame) -> None:
        """The main thread's SIGINT handler: KeyboardInterrupt at the first Ctrl-C only; later ones are the
        watcher's (an exception raised into the graceful stop would cut it short)."""
        if not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt

    def _watch(self, read: int) -> None:
        interrupts, first = 0, None
        while not self.closed:
            ready, _, _ = select.select([read], [], [], 1.0)
            if ready:
                interrupts += os.read(read, 64).count(bytes([signal.SIGINT]))
            if interrupts and first is None:
                first = time.monotonic()
            if interrupts >= 2 or (first is not None and time.monotonic() - first > self.grace):
                why = "Ctrl-C again" if interrupts >= 2 else f"still stopping {self.grace:.0f} s after Ctrl-C"
                print(f"\n{why}: marking the runs KILLED and exiting without waiting for Ray", flush=True)
                try:
                    self.stop()
                finally:
                    for server in list(ACTIVE_SERVERS):  # left; stopped only if no other sweep uses it
                        server.stop(timeout=10)
                    os._exit(EXIT_INTERRUPTED)

    def close(self) -> None:
        """The graceful stop is done: the watcher ends, the previous wakeup fd is restored."""
        self.closed = True
        if self.previous is not None:
            signal.set_wakeup_fd(self.previous)
        if self.previous_handler is not None:
            signal.signal(signal.SIGINT, self.previous_handler)


@dataclass
class Stop:
    """How the stages in ``graceful_stop`` ended: ``status`` FINISHED, or KILLED by Ctrl-C; ``killed``: the child
    runs that were still running and are marked KILLED."""

    status: str = "FINISHED"
    killed: list[str] = field(default_factory=list)


@contextlib.contextmanager
def graceful_stop(client, experiment_id: str, parent_id: str) -> Iterator[Stop]:
    """Around the stages of a sweep: the first Ctrl-C stops them (status KILLED, the interrupt goes no further);
    however they end, Ray is shut down and every child run still RUNNING is marked KILLED. A stop that hangs or
    a second Ctrl-C ends the driver (``InterruptWatch``: the runs and the parent run KILLED)."""
    import ray

    stop = Stop()

    def hard_stop() -> None:
        end_unfinished_runs(client, experiment_id, parent_id, "KILLED")
        client.set_terminated(parent_id, status="KILLED")

    watch = InterruptWatch(hard_stop)
    try:
        yield stop
    except KeyboardInterrupt:
        stop.status = "KILLED"
        print("\ninterrupted: stopping every trial", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        stop.killed = end_unfinished_runs(client, experiment_id, parent_id, "KILLED")
        watch.close()


def progress_printer(tune, total: int, stage: str):
    """One line per reported result and per finished task (instead of Tune's large tables)."""

    class ProgressPrinter(tune.Callback):
        def __init__(self):
            self.done = 0

        def on_trial_start(self, iteration, trials, trial, **info):
            task = trial.config["task"]
            print(f"[{task['name']}] started ({'training, then evaluation' if task['train'] else 'evaluation'})",
                  flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            name = trial.config["task"]["name"]
            if "fid" in result:
                print(f"[{name}] fid {result['fid']:.3f} (reference {result['fid_reference']:.3f}), "
                      f"nfe {result['sample_nfe']:.0f}", flush=True)
            elif "train_loss" in result:
                print(f"[{name}] step {result['step']} train_loss {result['train_loss']:.4f}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            outcome = "FAILED" if (trial.last_result or {}).get("failed") else "finished"
            print(f"[{trial.config['task']['name']}] {outcome} ({self.done}/{total} {stage} tasks)", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            print(f"[{trial.config['task']['name']}] FAILED ({self.done}/{total} {stage} tasks)", flush=True)

    return ProgressPrinter()
