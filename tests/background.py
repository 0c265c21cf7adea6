"""Subprocess checks run in the background while the in-process tests run.

Most of the suite's time is XLA compiling on one core; the checks that need their own process (8 simulated
devices, a notebook's kernel) compile there on their own core. A test module registers such a check with
`job(__file__, fixture)`: when collection finishes, the checks whose fixture a selected test uses start one at a
time, in the order the tests will want them (tests/conftest.py moves the tests that use them to the end of the
run), and the fixture waits for its check's result. The check itself is unchanged: the same command, the same
timeout, its exit status and output handed to the test as they would be from subprocess.run.

REALM_TEST_BACKGROUND=0 runs every check in the foreground, when its fixture asks for it (as before).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import threading
import time
from collections.abc import Callable

_REGISTRY: dict[tuple[str, str], Job] = {}  # (module file, fixture name) -> job


@dataclasses.dataclass(eq=False)
class Job:
    name: str
    make: Callable[[], tuple[list[str], dict[str, str], float]]  # -> (argv, env, timeout); run when it starts
    wants: Callable[[object], bool] | None = None  # which collected tests want it (default: its fixture's)
    where: str = ""  # the module's file name
    queued: bool = False
    started: bool = False
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: subprocess.CompletedProcess | BaseException | None = None
    seconds: float = 0.0

    def run(self) -> None:
        """subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env), which `WORKER.stop`
        ends if pytest ends first."""
        self.started = True
        WORKER.ran.append(self)
        t0 = time.monotonic()
        try:
            argv, env, timeout = self.make()
            with WORKER.lock:
                if WORKER.stopped:
                    raise RuntimeError("the test session ended before this check started")
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                WORKER.running.add(proc)
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except BaseException:  # a timeout (raised in the test that waits, as subprocess.run raises it)
                _end(proc)
                raise
            finally:
                WORKER.running.discard(proc)
            self.result = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
        except BaseException as e:  # handed to the test that waits
            self.result = e
        self.seconds = time.monotonic() - t0
        self.done.set()


def _end(proc: subprocess.Popen) -> None:
    """Kills a check (as subprocess.run does on a timeout; a notebook's kernel ends with its parent)."""
    proc.kill()
    proc.wait()


def job(module_file: str, key: str, wants: Callable[[object], bool] | None = None):
    """Decorator: `make` () -> (argv, env, timeout) is the check `key` of the module `module_file`, which
    the module's tests that use the fixture named `key` want (or those for which `wants(item)` holds)."""

    def register(make):
        _REGISTRY[(os.path.realpath(module_file), key)] = Job(key, make, wants, os.path.basename(module_file))
        return make

    return register


def jobs_for(item) -> list[Job]:
    """The registered checks that a collected test wants."""
    path = os.path.realpath(str(item.path))
    names = getattr(item, "fixturenames", ())
    return [j for (module_file, key), j in _REGISTRY.items()
            if module_file == path and (j.wants(item) if j.wants is not None else key in names)]


class _Worker:
    def __init__(self) -> None:
        self.queue: list[Job] = []
        self.ran: list[Job] = []  # in the order they started, here or in the background
        self.running: set[subprocess.Popen] = set()
        self.stopped = False
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def start(self, jobs: list[Job]) -> None:
        if os.environ.get("REALM_TEST_BACKGROUND", "1") == "0" or not jobs:
            return
        with self.lock:
            for j in jobs:
                j.queued = True
            self.queue = list(jobs)
        self.thread = threading.Thread(target=self._loop, name="background-checks", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """At the end of the session: nothing more starts, and what still runs (pytest stopped early: -x, an
        interrupt) is killed rather than left running."""
        with self.lock:
            self.stopped = True
            for j in self.queue:
                j.started = True
            self.queue = []
            running = list(self.running)
        for proc in running:
            _end(proc)

    def _next(self) -> Job | None:
        with self.lock:
            while self.queue:
                j = self.queue.pop(0)
                if not j.started:
                    j.started = True
                    return j
            return None

    def _loop(self) -> None:
        while (j := self._next()) is not None:
            j.run()

    def take(self, j: Job | None = None) -> Job | None:
        """Claims a job the worker has not started, to run it in the foreground: `j`, or else the one queued
        last (wanted last)."""
        with self.lock:
            if j is None:
                j = next((q for q in reversed(self.queue) if not q.started), None)
            if j is None or j.started:
                return None
            j.started = True
            if j in self.queue:
                self.queue.remove(j)
            return j


WORKER = _Worker()


def result(module_file: str, key: str) -> subprocess.CompletedProcess:
    """The finished check `key`: runs it here if it has not started (not queued, or still waiting behind
    others: the test needs it now); else waits for it, meanwhile running here the check queued last, if any
    (both cores busy while the tests wait)."""
    j = _REGISTRY[(os.path.realpath(module_file), key)]
    if WORKER.take(j):
        j.run()
    while not j.done.is_set():
        other = WORKER.take()
        if other is None:
            j.done.wait()
        else:
            other.run()
    if isinstance(j.result, BaseException):
        raise j.result
    return j.result
