"""The multi-host launch: N processes on this host under a supervisor, or the command for each host of a
cluster, each running one `realm-jax` command (generate) over a mesh that spans every process.

A worker is `realm-jax launch --process-id I --num-processes N --coordinator HOST:PORT -- generate ...`
(or `realm-jax launch --cluster -- ...` under Slurm, Open MPI or Kubernetes); `realm-jax launch
--processes N` starts N of them on 127.0.0.1 and watches them: when one exits with an error or is killed,
it stops the others at once and names the one that failed. Workers bound their own waits as well
(`coordinator.join`), which is what ends a cluster run that has no supervisor. Every worker runs under a
guard (`guard`: the process launched, its worker a child) that turns JAX's abort on a lost coordination
service into one line. On Linux a worker is killed with its supervisor, however the supervisor ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence

from realm_jax.distributed import guard
from realm_jax.distributed.config import check_host
from realm_jax.distributed.coordinator import EXIT_PEER_LOST
from realm_jax.errors import CoordinatorError, PeerError

FAULT_ENV = "REALM_JAX_LAUNCH_FAULT"  # test hook, see fault_point
_FAULT_PHASES = ("join", "generate")
# Simulated CPU devices per process: XLA builds each one up front (20,000 took 65 s and 4.6 GB here).
MAX_CPU_DEVICES = 1024


MIN_TIMEOUT = 2.0  # the shortest init or heartbeat timeout a launch takes (the heartbeat beats every second)


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """What every worker of a launch is given besides its rank.

    Attributes:
      cpu_devices: simulate this many CPU devices in each process (jax_num_cpu_devices, CPU platform), for
        runs on one host; None uses the host's devices as JAX finds them.
      init_timeout: seconds for all processes to join before the missing ones are named.
      heartbeat_timeout: seconds of silence after which a peer counts as lost.
    """

    cpu_devices: int | None = None
    init_timeout: float = 60.0
    heartbeat_timeout: float = 15.0

    def __post_init__(self):
        if self.cpu_devices is not None and (isinstance(self.cpu_devices, bool) or not isinstance(self.cpu_devices, int)
                                             or not 1 <= self.cpu_devices <= MAX_CPU_DEVICES):
            raise CoordinatorError(f"cpu_devices={self.cpu_devices!r} must be an int in [1, {MAX_CPU_DEVICES}]")
        for name in ("init_timeout", "heartbeat_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not MIN_TIMEOUT <= value <= 3600:
                # (under a second or two, a healthy peer's beat or join reads as lost)
                raise CoordinatorError(f"{name}={value!r} must be a number of seconds in [{MIN_TIMEOUT:g}, 3600]")

    def argv(self) -> list[str]:
        cpu = [] if self.cpu_devices is None else ["--cpu-devices", str(self.cpu_devices)]
        return [*cpu, "--init-timeout", f"{self.init_timeout:g}", "--heartbeat-timeout", f"{self.heartbeat_timeout:g}"]


@contextlib.contextmanager
def reserved_port(host: str = "127.0.0.1"):
    """A free TCP port, kept from other programs while the context lasts.

    The port is bound here with SO_REUSEPORT and never listened on: the coordinator's gRPC server (which
    sets SO_REUSEPORT too) can still bind it, while a plain bind elsewhere, or the OS handing it out for an
    outgoing connection, cannot take it between the choice and process 0's start.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if hasattr(socket, "SO_REUSEPORT"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, 0))
        yield s.getsockname()[1]


def worker_argv(rank: int, n: int, address: str, command: Sequence[str], options: WorkerOptions, *,
                program: Sequence[str] = ("realm-jax",)) -> list[str]:
    """The command line of worker `rank` of `n` (program: how to start realm-jax there)."""
    return [*program, "launch", "--process-id", str(rank), "--num-processes", str(n), "--coordinator", address,
            *options.argv(), "--", *command]


def cluster_commands(hosts: Sequence[str], port: int, command: Sequence[str], options: WorkerOptions) -> list[str]:
    """One shell command per host (in order: the first host runs process 0 and the coordinator)."""
    if not hosts:
        raise CoordinatorError("hosts must name one or more hosts")
    for h in hosts:
        check_host(h, f"--hosts {','.join(hosts)}")
    if len(set(hosts)) != len(hosts):
        raise CoordinatorError(f"hosts={list(hosts)!r} names a host twice; give one process per host")
    if not 0 < port < 65536:
        raise CoordinatorError(f"port={port} must be in 1..65535")
    address = f"{hosts[0]}:{port}"
    return [shlex.join(worker_argv(r, len(hosts), address, command, options)) for r in range(len(hosts))]


def run_local(n: int, command: Sequence[str], options: WorkerOptions, *, poll_s: float = 0.1) -> None:
    """Run `n` workers on 127.0.0.1 and wait for them; their output goes to this process's stdout/stderr.

    Raises:
      PeerError: a worker exited with an error or was killed; the others were stopped. The message names
        the first one to fail (rank and pid) and the ones stopped.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CoordinatorError(f"processes={n!r} must be an int >= 1")
    # each worker under a guard (guard.py, run as a script: no jax imported there), which turns JAX's abort on a
    # lost coordination service into one line
    program = [sys.executable, "-P", guard.__file__, "--", sys.executable, "-m", "realm_jax.cli"]
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as stack:
        address = f"127.0.0.1:{stack.enter_context(reserved_port())}"
        stack.callback(lambda: _stop([p for p in procs if p.poll() is None]))
        arm = guard.die_with(os.getpid())
        for r in range(n):
            with warnings.catch_warnings():  # JAX's at-fork warning: the child only calls prctl, then execs
                warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
                procs.append(subprocess.Popen(worker_argv(r, n, address, command, options, program=program),
                                              preexec_fn=arm))
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                break
            if all(c == 0 for c in codes):
                return
            time.sleep(poll_s)
        # A process that stopped because it lost a peer is a consequence: name a cause if there is one.
        rank, code = min(failed, key=lambda rc: (rc[1] == EXIT_PEER_LOST, rc[0]))
        running = [(r, p) for r, p in enumerate(procs) if p.poll() is None]
        _stop([p for _, p in running])
        others = [f"process {r} {_describe(c)}" for r, c in failed if r != rank]
        others += [f"killed process {r} (pid {p.pid})" for r, p in running]
        raise PeerError(f"lost process {rank} of {n} (127.0.0.1, pid {procs[rank].pid}): it {_describe(code)}"
                        + (f"; {', '.join(others)}" if others else ""))


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}" + (" (it lost a peer)" if code == EXIT_PEER_LOST else "")


def _stop(procs: list[subprocess.Popen]) -> None:
    """Kill and reap. SIGKILL, not SIGTERM: JAX catches SIGTERM (as a preemption notice), and a process whose
    peer is lost cannot finish its collectives anyway."""
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def use_cpu_devices(n: int) -> None:
    """Run this process on `n` simulated CPU devices; call before anything initializes a JAX backend."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


@contextlib.contextmanager
def text_stdout():
    """Keep stdout for the generated text: native libraries (Gloo prints its connection log) write to file
    descriptor 1, which this moves to stderr while `sys.stdout` keeps writing to the real stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    old, sys.stdout = sys.stdout, os.fdopen(os.dup(saved), "w", encoding=sys.stdout.encoding, errors="replace")
    try:
        yield
    finally:
        sys.stdout.close()
        sys.stdout = old
        os.dup2(saved, 1)
        os.close(saved)


def fault_point(phase: str, rank: int) -> None:
    """Fail here if REALM_JAX_LAUNCH_FAULT="RANK:PHASE" asks for it (the tests' way to lose a peer):
    "join": process RANK exits with status 1 before joining, as a peer that never starts; "generate":
    process RANK kills itself with SIGKILL after its first generated piece, as a peer that dies mid-run."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    r, _, p = spec.partition(":")
    if not r.isdigit() or p not in _FAULT_PHASES:
        raise CoordinatorError(f"{FAULT_ENV}={spec!r} must be RANK:PHASE with PHASE one of {', '.join(_FAULT_PHASES)}")
    if int(r) != rank or p != phase:
        return
    print(f"realm-jax: process {rank} (pid {guard.launched_pid()}): failing at {phase!r} as {FAULT_ENV} asks",
          file=sys.stderr, flush=True)
    if phase == "join":
        os._exit(1)
    os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["FAULT_ENV", "MAX_CPU_DEVICES", "WorkerOptions", "cluster_commands", "fault_point", "reserved_port",
           "run_local", "text_stdout", "use_cpu_devices", "worker_argv"]
