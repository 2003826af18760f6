"""How the driver of a sweep stops: the first Ctrl-C gracefully (``graceful_stop``), a stop that hangs or a second
Ctrl-C at once (``InterruptWatch``). What it shows meanwhile is ``liveview``'s."""
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
from .liveview import ACTIVE_VIEWS
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
                for view in list(ACTIVE_VIEWS):  # the terminal left sane: live lines stopped, cursor shown
                    with contextlib.suppress(Exception):
                        view.stop()
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
