"""A worker's guard: the process a launch starts, which runs the worker as its child and turns JAX's abort on a
lost coordination service into one line naming the lost process.

When process 0 (which runs JAX's coordination service) dies, or the service finds a peer unhealthy, JAX's
client in every other process ends it at once from a C++ thread (`LOG(QFATAL)`: SIGABRT, a stack trace, no
Python exception), before this package's watchdog (`coordinator._Watchdog`) can name anyone; its callback
cannot be replaced from Python in the jaxlib this runs on. So every worker of a launch runs as the child of a
guard (`realm-jax launch --process-id/--cluster` is one: the command starts the worker again under it;
`launch --processes N` starts N guards), which:

- passes stdout through untouched (the child writes to it directly) and relays the child's stderr as it
  comes, a line (or a progress bar's carriage return) at a time (`stderr_is_terminal` tells the child whether
  that reaches a terminal);
- on JAX's "Terminating process because the JAX distributed service detected fatal errors", holds back the
  rest (the status, the stack trace) and the coordination agent's log line before it, waits for the child
  (at most `FATAL_GRACE_S`, then kills it) and prints one line: this process and the lost one by rank, host
  and pid (what the worker told it after joining, through the pipe named by GUARD_ENV), and JAX's status;
  then exits with EXIT_PEER_LOST;
- forwards SIGINT, SIGTERM and SIGHUP to the child (in a process group of its own, so a terminal's Ctrl-C
  reaches it once); the child dies with the guard however the guard ends (Linux);
- otherwise ends as the child did: its exit status, or killed by the same signal.

Messages name the guard's pid (PID_ENV), the process the launcher started and sees.

Standard library only: `launch.run_local` runs this file as a script (`python -P guard.py -- COMMAND...`)
without importing jax.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Sequence

EXIT_PEER_LOST = 3  # the exit status of a process that stops because a peer was lost
GUARD_ENV = "REALM_JAX_GUARD_FD"  # in the worker: the pipe to its guard (the worker runs guarded)
PID_ENV = "REALM_JAX_LAUNCHED_PID"  # in the worker: its guard's pid, the one messages name
TTY_ENV = "REALM_JAX_GUARD_TTY"  # in the worker: "1" where its guard's stderr is a terminal
FATAL_GRACE_S = 10.0  # after JAX's fatal message, how long the child may take to end before it is killed
_FATAL = "Terminating process because the JAX distributed service"
# absl's log prefix: severity, date, time, thread, file:line]
_ABSL = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ (\S+):\d+\] ")
_HELD_BACK_S = 1.0  # how long a coordination agent's error line waits to see whether the fatal one follows
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def guarded() -> bool:
    """Whether this process is a worker its guard started (the variables it was given name its parent:
    inherited further, they mean nothing)."""
    return os.environ.get(GUARD_ENV, "").isdigit() and os.environ.get(PID_ENV, "") == str(os.getppid())


def launched_pid() -> int:
    """The pid messages name for this process: its guard's where it runs guarded, else its own."""
    return os.getppid() if guarded() else os.getpid()


def stderr_is_terminal() -> bool:
    """Whether this process's stderr reaches a terminal: through its guard (a pipe, relayed) where it runs
    guarded. For the progress bars, which a terminal gets and a log does not."""
    return sys.stderr.isatty() or (guarded() and os.environ.get(TTY_ENV) == "1")


def tell(me: str, peers: dict[int, str]) -> None:
    """In a guarded worker, once joined: how the guard should name this process and its peers (rank ->
    "process R (host, pid P)"). Nothing where no guard listens."""
    if not guarded():
        return
    fd = os.environ[GUARD_ENV]
    try:
        os.write(int(fd), (json.dumps({"me": me, "peers": {str(r): p for r, p in peers.items()}}) + "\n").encode())
    except OSError:  # the guard is gone: the worker dies with it anyway
        pass


def die_with(parent: int):
    """A Popen `preexec_fn` (Linux; None elsewhere): the child gets SIGKILL when `parent` dies, even by
    SIGKILL (which runs none of its cleanup): a worker stuck in a collective whose peers still answer would
    otherwise run on as an orphan."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child imports and loads nothing

    def arm() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)

    return arm


class _Relay:
    """The child's stderr, relayed a segment (up to a newline or a carriage return) at a time, except JAX's
    fatal message and what follows it, and a coordination agent's error line just before it."""

    def __init__(self, write):
        self.write = write
        self.pending = b""  # an unfinished segment
        self.held: list[tuple[bytes, float]] = []  # (segment, when) held back
        self.fatal: bytes | None = None  # the fatal message and everything after it

    def feed(self, data: bytes) -> None:
        if self.fatal is not None:
            self.fatal = (self.fatal + data)[-65536:]
            return
        self.pending += data
        while self.fatal is None:
            cut = min((i for i in (self.pending.find(b"\n"), self.pending.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                break
            segment, self.pending = self.pending[:cut + 1], self.pending[cut + 1:]
            self._segment(segment)
        if self.fatal is None and len(self.pending) > 65536:  # a very long line: pass it on as it is
            self._segment(self.pending)
            self.pending = b""

    def _segment(self, segment: bytes) -> None:
        if _FATAL.encode() in segment:
            self.held.clear()  # the agent's "Polled an error" line belongs to the fatal one
            self.fatal = segment[segment.find(_FATAL.encode()):] + self.pending
            self.pending = b""
            return
        m = _ABSL.match(segment)
        if m and m.group(1).startswith(b"coordination_service"):
            self.held.append((segment, time.monotonic()))
            return
        self.release(force=True)
        self.write(segment)

    def release(self, force: bool = False) -> None:
        """Pass on what was held back long enough (all of it with `force`)."""
        now = time.monotonic()
        while self.held and (force or now - self.held[0][1] >= _HELD_BACK_S):
            self.write(self.held.pop(0)[0])

    def flush(self) -> None:
        """Pass on an unfinished segment (a prompt, a progress bar between updates)."""
        if self.fatal is None and self.pending:
            self.release(force=True)
            self.write(self.pending)
            self.pending = b""


def _write_stderr(data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(2, view):]
        except BlockingIOError:
            time.sleep(0.01)
        except OSError:  # stderr closed: nothing more can be said
            return


def _status(fatal: str) -> str:
    """JAX's status in its fatal message, its lines joined (the stack trace left out)."""
    text = fatal.split("absl::Status:", 1)[1] if "absl::Status:" in fatal else fatal
    lines = []
    for line in text.strip().splitlines():
        if line.startswith(("***", "===")) or line.lstrip().startswith("@ "):  # the trace
            break
        lines.append(line.strip())
    return " ".join(line for line in lines if line)


def lost_message(fatal: str, info: dict | None) -> str:
    """The one line a guard prints for JAX's fatal message `fatal`, with what the worker told it (None:
    nothing, it had not joined yet)."""
    status = _status(fatal)
    said = status.split(". ", 1)[0].rstrip(".")  # its first sentence
    said = said if len(said) <= 200 else said[:197] + "..."
    me = (info or {}).get("me") or f"this process ({socket.gethostname()}, pid {os.getpid()})"
    peers = (info or {}).get("peers") or {}
    tasks = sorted({int(t) for t in re.findall(r"/task:(\d+)", status)})
    if tasks and "unhealthy" in status:
        lost = ", ".join(peers.get(str(t), f"process {t}") for t in tasks)
        return f"{me}: lost {lost}: JAX's coordination service found it unhealthy and ended this process ({said})"
    leader = peers.get("0", "process 0")
    if info is None:
        return (f"{me}: lost the coordination service ({leader} runs it) before the processes had all joined: JAX "
                f"ended this process ({said})")
    return f"{me}: lost {leader} (it runs the coordination service): JAX ended this process ({said})"


def run(command: Sequence[str], *, write=_write_stderr) -> int:
    """Run `command` (a worker) as this process's guarded child and wait for it. Returns its exit status,
    EXIT_PEER_LOST after JAX's fatal message on a lost peer (printed as one line), or -S where a signal S
    killed it (`exit_like` ends a process so)."""
    info_r, info_w = os.pipe()
    env = dict(os.environ, **{GUARD_ENV: str(info_w), PID_ENV: str(os.getpid()), TTY_ENV: str(int(os.isatty(2)))})
    try:
        with warnings.catch_warnings():  # JAX's at-fork warning, where it runs: the child only calls prctl, then execs
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            child = subprocess.Popen(list(command), stderr=subprocess.PIPE, env=env, pass_fds=(info_w,),
                                     process_group=0, preexec_fn=die_with(os.getpid()))
    except BaseException:
        os.close(info_r)
        raise
    finally:
        os.close(info_w)
    main = threading.current_thread() is threading.main_thread()  # (signal handlers: the main thread's only)
    previous = {s: signal.signal(s, lambda sig, _frame: _forward(child, sig)) for s in _FORWARDED} if main else {}
    relay, info, info_text = _Relay(write), None, b""
    selector = selectors.DefaultSelector()
    selector.register(child.stderr, selectors.EVENT_READ)
    selector.register(info_r, selectors.EVENT_READ)
    open_fds, fatal_deadline, drain_deadline = 2, None, None
    try:
        while open_fds:
            now = time.monotonic()
            if relay.fatal is not None and fatal_deadline is None:
                fatal_deadline = now + FATAL_GRACE_S
            if fatal_deadline is not None and now > fatal_deadline and child.poll() is None:
                child.kill()
            if child.poll() is not None:  # ended: what is left in the pipes, unless a grandchild holds them
                drain_deadline = drain_deadline or now + 2.0
                if now > drain_deadline:
                    break
            events = selector.select(timeout=0.1)
            if not events:
                relay.flush()
                relay.release()
            for key, _ in events:
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                    open_fds -= 1
                elif key.fd == info_r:
                    info_text += data
                    if info_text.endswith(b"\n"):
                        try:
                            info = json.loads(info_text.decode(errors="replace").splitlines()[-1])
                        except ValueError:  # not the worker's JSON: the message names "this process" then
                            pass
                else:
                    relay.feed(data)
        code = child.wait()
    finally:
        selector.close()
        child.stderr.close()
        os.close(info_r)
        for s, handler in previous.items():
            signal.signal(s, handler)
    relay.flush()
    relay.release(force=True)
    if relay.fatal is not None:
        write(f"realm-jax: error: {lost_message(relay.fatal.decode(errors='replace'), info)}\n".encode())
        return EXIT_PEER_LOST
    return code


def _forward(child: subprocess.Popen, sig: int) -> None:
    if child.poll() is None:
        try:
            child.send_signal(sig)
        except OSError:  # it ended between the poll and the signal
            pass


def exit_like(code: int) -> None:
    """End this process as a child that ended with `code` did (`run`'s result): killed by the same signal,
    or that exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code < 0:
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        time.sleep(1)  # (a signal that does not end a process by default)
        code = 128 - code
    os._exit(code)


if __name__ == "__main__":  # python -P guard.py -- COMMAND...
    args = sys.argv[1:]
    if args[:1] != ["--"] or len(args) < 2:
        sys.exit("usage: python -P guard.py -- COMMAND...")
    exit_like(run(args[1:]))
