"""Per-entry locks of the model cache (:meth:`orchestrator.cache.ModelCache.lock`), across processes and nodes.

In a directory an entry's lock ``<entry>/<name>.lock`` is an ``flock``; in an object store it is also an object
holding its holder and a heartbeat. ``EntryLocks`` is mixed into ``ModelCache``, whose ``remote``, ``fs``,
``local(key, name)`` and ``_remote(key, name)`` say where an entry's files are.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Iterator, Optional

# How long a process waits for an entry's lock (another sweep training the same model, say) before giving up
# (``LockTimeout``), and after how long without a heartbeat an object-store lock counts as abandoned; seconds.
LOCK_TIMEOUT_ENV, LOCK_STALE_ENV = "ORCHESTRATOR_CACHE_LOCK_TIMEOUT", "ORCHESTRATOR_CACHE_LOCK_STALE"
DEFAULT_LOCK_TIMEOUT, DEFAULT_LOCK_STALE = 6 * 3600.0, 300.0
LOCK_POLL, LOCK_SETTLE = 1.0, 0.5  # seconds: at most between attempts; before an object-store lock is read back


class LockTimeout(RuntimeError):
    """An entry's lock stayed with a live holder for longer than the timeout."""


def lock_setting(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def _holder_text(holder: Optional[dict]) -> str:
    if not holder:
        return "an unknown holder"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    note = f", {holder['note']}" if holder.get("note") else ""
    return f"{holder.get('host', '?')}:{holder.get('pid', '?')} (since {since}{note})"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


class EntryLocks:
    """The locks of ``ModelCache``'s entries (mixed into it: see the module's docstring)."""

    @contextlib.contextmanager
    def lock(self, key: str, name: str, timeout: Optional[float] = None, stale: Optional[float] = None,
             note: str = "") -> Iterator[None]:
        """An exclusive lock ``<name>.lock`` on the entry ``key``, across processes and nodes: one training of
        a model at a time (``train``), concurrent evaluators of one model taking turns (the second finds what
        the first computed), one fit of a cached VAE or classifier.

        In a directory it is an ``flock`` on ``<entry>/<name>.lock``, which the kernel releases when its holder
        dies. In an object store it is the object ``<entry>/<name>.lock`` (holder host, pid, ``note``, and a
        heartbeat rewritten every ``stale / 4`` seconds, at most 30), taken after the flock of the local
        staging copy (processes of one node queue there). An object-store lock is taken over when abandoned:
        its holder is a dead process of this host, or its heartbeat is older than ``stale`` seconds
        ($ORCHESTRATOR_CACHE_LOCK_STALE, default 300; the nodes' clocks must agree to well within it). Taking
        it is write, wait ``LOCK_SETTLE``, read back (object stores have no compare-and-swap here): two
        takers would both need to stall that long between reading and writing it to both get it.

        A waiter gives up after ``timeout`` seconds ($ORCHESTRATOR_CACHE_LOCK_TIMEOUT, default 6 hours):
        ``LockTimeout``, naming the entry and the holder."""
        timeout = lock_setting(LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT) if timeout is None else timeout
        stale = lock_setting(LOCK_STALE_ENV, DEFAULT_LOCK_STALE) if stale is None else stale
        deadline = time.monotonic() + timeout
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "note": note,
                  "token": uuid.uuid4().hex}
        with self._file_lock(key, name, deadline, timeout, holder):
            if not self.remote:
                yield
                return
            with self._object_lock(key, name, deadline, timeout, stale, holder):
                yield

    def _timeout(self, key: str, name: str, holder: Optional[dict], timeout: float) -> LockTimeout:
        return LockTimeout(f"model cache entry {key}: {name}.lock is held by {_holder_text(holder)} and was not "
                           f"released within {timeout:.0f} s ({LOCK_TIMEOUT_ENV}); another sweep may still be "
                           "training this model: run this sweep again once it is done (it then takes the model "
                           "from the cache)")

    @contextlib.contextmanager
    def _file_lock(self, key: str, name: str, deadline: float, timeout: float, holder: dict) -> Iterator[None]:
        path = self.local(key, f"{name}.lock")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a+") as handle:
            delay = 0.05
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        try:
                            with open(path) as current:
                                found = json.loads(current.read() or "null")
                        except ValueError:
                            found = None
                        raise self._timeout(key, name, found, timeout) from None
                    time.sleep(delay)
                    delay = min(2 * delay, LOCK_POLL)
            try:
                handle.seek(0)
                handle.truncate()
                handle.write(json.dumps(holder))  # for the message of a waiter that gives up
                handle.flush()
                yield
            finally:
                handle.truncate(0)
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _lock_object(self, key: str, name: str) -> Optional[dict]:
        try:
            with self.fs[0].open_input_stream(self._remote(key, f"{name}.lock")) as stream:
                found = json.loads(stream.read().decode("utf-8"))
        except FileNotFoundError:
            return None
        except ValueError:  # damaged: nobody can be told apart from it
            return {}
        return found if isinstance(found, dict) else {}

    def _write_lock_object(self, key: str, name: str, holder: dict) -> None:
        with self.fs[0].open_output_stream(self._remote(key, f"{name}.lock")) as target:
            target.write(json.dumps({**holder, "heartbeat": time.time()}).encode("utf-8"))

    @staticmethod
    def _abandoned(found: dict, stale: float) -> bool:
        if found.get("host") == socket.gethostname() and not _pid_alive(found.get("pid")):
            return True
        try:
            return time.time() - float(found.get("heartbeat", 0)) > stale
        except (TypeError, ValueError):
            return True

    @contextlib.contextmanager
    def _object_lock(self, key: str, name: str, deadline: float, timeout: float, stale: float,
                     holder: dict) -> Iterator[None]:
        delay = 0.05
        while True:
            found = self._lock_object(key, name)
            if found == {}:  # unreadable: read while its holder rewrote it (a heartbeat), or really damaged
                time.sleep(LOCK_SETTLE)
                found = self._lock_object(key, name)
            if found is None or self._abandoned(found, stale):
                if found is not None:
                    print(f"warning: model cache entry {key}: taking over {name}.lock, abandoned by "
                          f"{_holder_text(found)}", file=sys.stderr, flush=True)
                self._write_lock_object(key, name, holder)
                time.sleep(LOCK_SETTLE)
                found = self._lock_object(key, name)
                if found is not None and found.get("token") == holder["token"]:
                    break
            if time.monotonic() >= deadline:
                raise self._timeout(key, name, found, timeout)
            time.sleep(delay)
            delay = min(2 * delay, LOCK_POLL)
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(key, name, holder, min(30.0, stale / 4), stop),
                                name=f"lock-heartbeat-{key}-{name}", daemon=True)
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
            found = self._lock_object(key, name)
            if found is not None and found.get("token") == holder["token"]:
                with contextlib.suppress(FileNotFoundError):
                    self.fs[0].delete_file(self._remote(key, f"{name}.lock"))

    def _heartbeat(self, key: str, name: str, holder: dict, interval: float, stop: threading.Event) -> None:
        while not stop.wait(interval):
            try:
                found = self._lock_object(key, name)
                if found is None or found.get("token") != holder["token"]:
                    print(f"warning: model cache entry {key}: {name}.lock was taken over by "
                          f"{_holder_text(found)} while held here", file=sys.stderr, flush=True)
                    return
                self._write_lock_object(key, name, holder)
            except OSError as error:  # the store is unreachable for a moment: try again at the next beat
                print(f"warning: model cache entry {key}: cannot renew {name}.lock ({error})", file=sys.stderr,
                      flush=True)
