"""The worker's guard (`realm_jax.distributed.guard`): JAX's abort on a lost coordination service becomes one
line naming the lost process; everything else passes through, and the guard ends as its child did. The
children here are small Python scripts that print what JAX prints (no jax imported); test_launch.py has the
real thing."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from realm_jax.distributed import guard

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUARD = ROOT / "realm_jax" / "distributed" / "guard.py"

# What a JAX process prints when its coordination service is gone (jaxlib 0.12, process 0 killed)
AGENT_LINE = ("E1207 21:46:00.556774   18670 coordination_service_agent.cc:288] Polled an error from coordination "
              "service (this can be an error from this or another task).\n")
FATAL_LEADER = ("F1207 21:46:00.556809   18670 client.h:86] Terminating process because the JAX distributed service "
                "detected fatal errors. This most likely indicates that another task died; see the other task logs "
                "for more details. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the "
                "leader task was preempted/died/restarted unexpectedly or this task is experiencing network issues.\n"
                "Additional GRPC error information from remote target coordination_service while calling "
                "/xla.coordination.CoordinationService/PollForError:\n:UNAVAILABLE:Stream removed (Socket closed)\n"
                "=== Source Location Trace: === \nexternal/xla+/xla/pjrt/distributed/coordination/"
                "coordination_service_error_util.cc:64\n\n*** Check failure stack trace: ***\n"
                "    @     0x7ff5b15f01b4  absl::lts_20260526::log_internal::LogMessage::SendToLog()\n"
                "    @     0x7ff5b15f0136  absl::lts_20260526::log_internal::LogMessage::Flush()\n")
FATAL_UNHEALTHY = ("F0926 17:26:32.075587  157988 client.h:77] Terminating process because the JAX distributed "
                   "service detected fatal errors. absl::Status: UNAVAILABLE: The following tasks are unhealthy "
                   "(stopped sending heartbeats):\n/job:jax_worker/replica:0/task:3\nThe tasks have crashed.\n"
                   "*** Check failure stack trace: ***\n    @     0x7ff5b15f01b4  SendToLog()\n")


def _child(body: str) -> list[str]:
    """A Python child running `body`, with `guard` loaded from its file (no package, no jax)."""
    prelude = ("import importlib.util, os, sys, time\n"
               f"spec = importlib.util.spec_from_file_location('g', {str(GUARD)!r})\n"
               "guard = importlib.util.module_from_spec(spec); spec.loader.exec_module(guard)\n")
    return [sys.executable, "-c", prelude + textwrap.dedent(body)]


def _run(body: str) -> tuple[int, str]:
    said = []
    code = guard.run(_child(body), write=said.append)
    return code, b"".join(said).decode()


def test_a_lost_leader_is_one_line_naming_it_and_the_rest_passes_through():
    code, err = _run(f"""
        sys.stderr.write("loading\\r 50%\\r100%\\nstarted\\n"); sys.stderr.flush()
        guard.tell("process 1 of 2 (h1, pid 11)", {{0: "process 0 (h0, pid 10)", 1: "process 1 (h1, pid 11)"}})
        time.sleep(0.3)
        sys.stderr.write({AGENT_LINE!r}); sys.stderr.flush()
        sys.stderr.write({FATAL_LEADER!r}); sys.stderr.flush()
        time.sleep(0.2)
        os.abort()
    """)
    assert code == guard.EXIT_PEER_LOST
    assert err.startswith("loading\r 50%\r100%\nstarted\n"), err
    lines = err.splitlines()
    assert lines[-1] == ("realm-jax: error: process 1 of 2 (h1, pid 11): lost process 0 (h0, pid 10) (it runs the "
                         "coordination service): JAX ended this process (UNAVAILABLE: Failed to send RPC to "
                         "coordination service)"), err
    assert "Polled an error" not in err and "stack trace" not in err and "@ " not in err and "Terminat" not in err


def test_unhealthy_tasks_are_named_and_before_joining_this_process_is():
    code, err = _run(f"""
        guard.tell("process 0 of 4 (h0, pid 10)", {{r: f"process {{r}} (h{{r}}, pid {{10 + r}})" for r in range(4)}})
        time.sleep(0.2)
        sys.stderr.write({FATAL_UNHEALTHY!r}); sys.stderr.flush()
        os.kill(os.getpid(), 11)  # (a TPU host saw SIGSEGV after this message)
    """)
    assert code == guard.EXIT_PEER_LOST
    assert err.splitlines() == ["realm-jax: error: process 0 of 4 (h0, pid 10): lost process 3 (h3, pid 13): JAX's "
                                "coordination service found it unhealthy and ended this process (UNAVAILABLE: The "
                                "following tasks are unhealthy (stopped sending heartbeats): "
                                "/job:jax_worker/replica:0/task:3 The tasks have crashed)"], err
    code, err = _run(f"sys.stderr.write({FATAL_LEADER!r}); sys.stderr.flush(); os.abort()")
    assert code == guard.EXIT_PEER_LOST
    assert err.startswith("realm-jax: error: this process (") and "pid " in err
    assert "lost the coordination service (process 0 runs it) before the processes had all joined" in err, err


def test_a_child_that_hangs_after_the_message_is_killed(monkeypatch):
    monkeypatch.setattr(guard, "FATAL_GRACE_S", 0.5)
    code, err = _run(f"sys.stderr.write({FATAL_LEADER!r}); sys.stderr.flush(); time.sleep(60)")
    assert code == guard.EXIT_PEER_LOST and "lost the coordination service" in err


def test_the_guard_ends_as_its_child_did(capfd):
    assert _run("print('out'); sys.stderr.write('err\\n'); sys.exit(5)") == (5, "err\n")
    assert capfd.readouterr().out == "out\n"  # stdout is the child's own
    assert _run("os.kill(os.getpid(), 9)") == (-9, "")
    assert _run("os.abort()")[0] == -signal.SIGABRT  # any other abort is the child's, unchanged
    partial = _run("sys.stderr.write('no newline at the end'); sys.stderr.flush(); time.sleep(0.5)")
    assert partial == (0, "no newline at the end")
    # the child is told who its guard is (and nothing leaks to what it starts)
    code, err = _run("""
        print(guard.guarded(), guard.launched_pid() == os.getppid(), file=sys.stderr)
        import subprocess
        subprocess.run([sys.executable, "-c",
                        "import os; print(os.environ.get('REALM_JAX_LAUNCHED_PID') == str(os.getppid()))"])
    """)
    assert (code, err) == (0, "True True\n")
    assert capfd.readouterr().out == "False\n"
    assert not guard.guarded() and guard.launched_pid() == os.getpid()


def test_termination_reaches_the_child():
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    timer.start()
    try:
        code, _ = _run("time.sleep(30)")
    finally:
        timer.cancel()
    assert code == -signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_as_a_script_it_dies_by_its_childs_signal():
    proc = subprocess.run([sys.executable, "-P", str(GUARD), "--", sys.executable, "-c",
                           "import os; os.kill(os.getpid(), 9)"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    proc = subprocess.run([sys.executable, "-P", str(GUARD), "--", sys.executable, "-c", "raise SystemExit(7)"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7
    proc = subprocess.run([sys.executable, "-P", str(GUARD)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "usage" in proc.stderr


@pytest.mark.parametrize("fatal", [FATAL_LEADER, FATAL_UNHEALTHY])
def test_the_message_split_across_reads_is_still_found(fatal):
    said = []
    relay = guard._Relay(said.append)
    text = ("progress\r" + AGENT_LINE + fatal).encode()
    for i in range(0, len(text), 7):
        relay.feed(text[i:i + 7])
    relay.flush()
    relay.release(force=True)
    assert b"".join(said) == b"progress\r" and relay.fatal.startswith(b"Terminating process")


def test_the_child_knows_whether_its_stderr_reaches_a_terminal(monkeypatch):
    """The progress bars: a guarded worker's stderr is a pipe to its guard, whose own may be a terminal."""
    body = "print(sys.stderr.isatty(), guard.stderr_is_terminal(), file=sys.stderr)"
    assert _run(body) == (0, "False False\n")
    monkeypatch.setattr(os, "isatty", lambda fd: True)
    assert _run(body) == (0, "False True\n")
