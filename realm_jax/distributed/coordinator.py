"""Joining processes (hosts) into one JAX system, and the global mesh over all their devices.

`join` calls `jax.distributed.initialize`, with explicit arguments or, under Slurm, Open MPI or Kubernetes,
with none (JAX reads the cluster's environment). After it, `jax.devices()` lists every process's devices and
a mesh over them is global: `load(path, mesh=global_mesh(config))` runs one SPMD program on all processes.

Lost peers end every process in bounded time, with a message naming the lost process:
- joining: a peer that never starts leaves the others waiting in initialize, which JAX ends with SIGABRT
  and no Python exception; a timer here fires first, prints who is missing and exits (EXIT_PEER_LOST).
- running: each process writes a heartbeat into the coordination service's key-value store every second
  (or a tenth of `heartbeat_timeout`) and reads everyone's; a peer silent for `heartbeat_timeout` seconds,
  or a coordination service that stops answering, ends the process with a message naming the peer's rank,
  host and pid. JAX's own heartbeat (twice as patient plus 30 s) remains behind it. When process 0 (which runs the
  coordination service) dies, JAX itself aborts the others at once from C++ (SIGABRT, a stack trace); a
  launched worker's guard (`guard`) turns that into one line naming process 0. Messages name a guarded
  worker by its guard's pid, the process launched.
Under `realm-jax launch --processes N` a supervisor also watches the processes and stops all of them as
soon as one fails; the watchdog here is what bounds a cluster run, where no supervisor exists.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import socket
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from realm_jax.distributed.config import DistributedConfig
from realm_jax.distributed.guard import EXIT_PEER_LOST, launched_pid
from realm_jax.distributed.mesh import MeshShape, make_mesh
from realm_jax.errors import CoordinatorError, MeshError, PeerError
from realm_jax.inputs import shown

_KEY = "realm_jax"  # prefix of this module's keys in the coordination service's store
_BEAT_INTERVAL = 1.0  # at most; a tenth of the timeout when that is shorter


def cluster_environment() -> str | None:
    """The cluster JAX's initialize() would detect from the environment: "Slurm", "Open MPI", "Kubernetes",
    or None. The checks are JAX's own (jax/_src/clusters)."""
    env = os.environ
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                              "SLURM_LOCALID")):
        return "Slurm"
    if "OMPI_MCA_orte_hnp_uri" in env or all(k in env for k in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                                                                "OMPI_COMM_WORLD_LOCAL_RANK")):
        return "Open MPI"
    if "KUBERNETES_SERVICE_HOST" in env and importlib.util.find_spec("kubernetes") is not None:
        return "Kubernetes"
    return None


@dataclasses.dataclass(frozen=True)
class Peer:
    """One process of the group: its rank (process id), host and pid."""

    rank: int
    host: str
    pid: int

    def __str__(self) -> str:
        return f"process {self.rank} ({self.host}, pid {self.pid})"


def process_name(rank: int | None = None, n: int | None = None) -> str:
    """"process R of N (host, pid P)": this process, as error messages name it."""
    who = "this process" if rank is None else f"process {rank}" + ("" if n is None else f" of {n}")
    return f"{who} ({socket.gethostname()}, pid {launched_pid()})"


def _die(message: str) -> None:
    """End this process now, from any thread: the main thread may be blocked inside a collective, where no
    Python exception can reach it."""
    print(f"realm-jax: error: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)


class Coordinator:
    """This process's place in a group of processes joined by `join`: rank, world size, devices, peers."""

    def __init__(self, rank: int, world_size: int, address: str | None, cluster: str | None, peers: list[Peer],
                 watchdog: _Watchdog | None):
        self.rank, self.world_size, self.address, self.cluster = rank, world_size, address, cluster
        self.peers = peers
        self._watchdog = watchdog
        self._joined = address is not None or cluster is not None

    def __repr__(self) -> str:
        return (f"Coordinator(rank={self.rank}, world_size={self.world_size}, address={self.address!r}, "
                f"cluster={self.cluster!r}, local_devices={len(self.local_devices)}, devices={len(self.devices)})")

    @property
    def is_main(self) -> bool:
        """Process 0: the one that prints."""
        return self.rank == 0

    @property
    def local_devices(self) -> list:
        return jax.local_devices()

    @property
    def devices(self) -> list:
        """Every process's devices (the global view)."""
        return jax.devices()

    def await_watchdog(self) -> None:
        """After a failed collective: give the watchdog the time to name a lost peer (it ends the process
        then); returns if none was lost."""
        if self._watchdog is not None:
            time.sleep(self._watchdog.timeout + 2 * self._watchdog.interval)

    def shutdown(self, timeout_s: float = 300.0) -> None:
        """Wait until every process has finished (a peer lost meanwhile still ends this one through the
        watchdog), then leave the distributed system."""
        if not self._joined:
            return
        if self._watchdog is not None:
            client = _client()
            try:
                client.wait_at_barrier(f"{_KEY}/finished", int(timeout_s * 1000))
            except jax.errors.JaxRuntimeError as e:
                raise PeerError(f"{process_name(self.rank, self.world_size)}: not every process finished within "
                                f"{timeout_s:.0f} s: {_first_line(e)}") from None
            self._watchdog.stop()
        jax.distributed.shutdown()
        self._joined = False


def _state():
    from jax._src import distributed  # the coordination service's client: JAX has no public handle on it

    return distributed.global_state


def _client():
    client = _state().client
    if client is None:
        raise CoordinatorError("jax.distributed is not initialized in this process")
    return client


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def join(config: DistributedConfig, *, init_timeout: float = 60.0, heartbeat_timeout: float | None = 15.0,
         agreement: dict[str, Any] | None = None) -> Coordinator:
    """Join the other processes through `jax.distributed.initialize`; call before anything else uses JAX.

    Args:
      config: explicit `num_processes`, `process_id` and `coordinator_address`, or none of them to let JAX
        read a Slurm, Open MPI or Kubernetes environment. `num_processes=1` without an address joins nothing.
      init_timeout: seconds to wait for every process to join; after them the missing ones are named and
        this process exits with EXIT_PEER_LOST.
      heartbeat_timeout: seconds of silence after which a peer counts as lost (None: no watchdog).
      agreement: what every process must have been given alike (JSON values: a command's arguments, the
        identity of its model file): each publishes its own, and one that differs from this process's is a
        CoordinatorError naming that process and the first item that differs, on every process. Workers given
        other prompts, seeds or files would otherwise run the same collectives on different data: a wrong
        answer, or a collective that waits forever.

    Returns:
      A `Coordinator` (rank, world size, local devices, peers, global meshes, shutdown).
    """
    if config.explicit and config.num_processes == 1 and config.coordinator_address is None:
        return Coordinator(0, 1, None, None, [Peer(0, socket.gethostname(), launched_pid())], None)
    cluster = None
    if not config.explicit:
        cluster = cluster_environment()
        if cluster is None:
            raise CoordinatorError(f"{process_name()}: no Slurm, Open MPI or Kubernetes environment found to join; "
                                   "give num_processes, process_id and coordinator_address (HOST:PORT of process 0)")
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0
               for t in (init_timeout, 1.0 if heartbeat_timeout is None else heartbeat_timeout)):
        raise CoordinatorError(f"init_timeout={shown(init_timeout)} and heartbeat_timeout={shown(heartbeat_timeout)} "
                               "must be finite numbers of seconds > 0")
    rank, n, address = config.process_id, config.num_processes, config.coordinator_address
    if rank == 0 and address is not None and _listening(address):
        # gRPC binds with SO_REUSEPORT: a second coordinator on the port would start, and both runs abort
        raise CoordinatorError(f"{process_name(rank, n)}: the coordinator address {address} is already in use "
                               "(another run's coordinator?): give another port")
    # SIGTERM ends a worker (JAX's preemption service would take it as a notice and run on); a jax without
    # the option has no such service
    if "jax_enable_preemption_service" in jax.config.values:
        jax.config.update("jax_enable_preemption_service", False)
    timer = threading.Timer(init_timeout, _join_timed_out, (rank, n, address, init_timeout))
    timer.daemon = True
    timer.start()
    try:
        # JAX's own limits sit behind this module's: its abort would say less. Its heartbeat runs in C++ and
        # the watchdog in Python threads, which a loaded machine can delay by seconds: at twice the watchdog's
        # timeout alone (10 s for 5) JAX's abort came first in a CI run on 2 busy cores.
        jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=rank,
                                   initialization_timeout=int(init_timeout) + 10,
                                   heartbeat_timeout_seconds=100 if heartbeat_timeout is None else
                                   int(2 * heartbeat_timeout) + 30,
                                   shutdown_timeout_seconds=int(init_timeout) + 10)
    except (ValueError, RuntimeError) as e:
        raise CoordinatorError(f"{process_name(rank, n)}: jax.distributed.initialize failed (coordinator "
                               f"{address or '(cluster)'}): {_first_line(e)}") from None
    finally:
        timer.cancel()
    rank, n = jax.process_index(), jax.process_count()
    address = address or _state().coordinator_address
    peers = _exchange_peers(rank, n, init_timeout, agreement)
    watchdog = None
    if n > 1 and heartbeat_timeout is not None:
        watchdog = _Watchdog(rank, peers, heartbeat_timeout)
        watchdog.start()
    return Coordinator(rank, n, address, cluster, peers, watchdog)


def _join_timed_out(rank: int | None, n: int | None, address: str | None, timeout: float) -> None:
    if rank is not None and rank > 0 and address is not None and not _listening(address):
        _die(f"{process_name(rank, n)}: nothing listens at the coordinator address {address} after {timeout:.0f} "
             "s: process 0 (the coordinator) did not start")
    if n == 1:  # no peer to wait for: this process could not reach the coordinator it runs
        _die(f"{process_name(rank, n)}: could not join the coordinator at {address or '(cluster)'} within "
             f"{timeout:.0f} s: does that address reach this host?")
    # JAX does not say which processes have registered: name every other one.
    missing = "some of the others" if n is None else "process(es) " + ", ".join(str(r) for r in range(n) if r != rank)
    hint = f" (or {address}, which process 0 serves, does not reach its host)" if rank == 0 and address else ""
    _die(f"{process_name(rank, n)}: the processes did not all join the coordinator at {address or '(cluster)'} "
         f"within {timeout:.0f} s; no word from one or more of {missing}: a peer failed to start{hint}")


def _listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            return True
    except OSError:
        return False


def _exchange_peers(rank: int, n: int, timeout: float, agreement: dict[str, Any] | None = None) -> list[Peer]:
    """Every process's host and pid (and `agreement`, checked against this process's), published through the
    coordination service's key-value store."""
    me = Peer(rank, socket.gethostname(), launched_pid())
    if n == 1:
        return [me]
    client = _client()
    client.key_value_set(f"{_KEY}/peer/{rank}", json.dumps({"host": me.host, "pid": me.pid, "agree": agreement}))
    peers, differ = [], []
    for r in range(n):
        if r == rank:
            peers.append(me)
            continue
        try:
            info = json.loads(client.blocking_key_value_get(f"{_KEY}/peer/{r}", int(timeout * 1000)))
        except jax.errors.JaxRuntimeError as e:
            raise PeerError(f"{process_name(rank, n)}: process {r} joined but did not publish its host within "
                            f"{timeout:.0f} s: {_first_line(e)}") from None
        peers.append(Peer(r, info["host"], int(info["pid"])))
        if info.get("agree") != json.loads(json.dumps(agreement)):  # (as the peer's went through JSON)
            differ.append((peers[-1], _first_difference(agreement or {}, info.get("agree") or {})))
    if differ:
        peer, what = differ[0]
        raise CoordinatorError(f"{process_name(rank, n)}: process {peer.rank} ({peer.host}, pid {peer.pid}) was "
                               f"started with other arguments: {what}; every process of a launch must be given the "
                               "same command and model file")
    return peers


def _first_difference(mine: dict[str, Any], theirs: dict[str, Any]) -> str:
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs.get(key)
        if json.dumps(a) == json.dumps(b):
            continue
        if isinstance(a, list) and isinstance(b, list):  # a command line: the first argument that differs
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            x = a[i] if i < len(a) else "(none)"
            y = b[i] if i < len(b) else "(none)"
            return f"{key} argument {i + 1}: {_short(x)} here, {_short(y)} there"
        return f"{key}: {_short(a)} here, {_short(b)} there"
    return "(nothing)"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Watchdog:
    """Heartbeats through the coordination service. One thread writes this process's beat and reads the
    others' (RPCs that may block when the service is gone); a second thread, which never blocks, ends the
    process when a peer's beat or the service's answers stop for `timeout` seconds."""

    def __init__(self, rank: int, peers: list[Peer], timeout: float):
        self.rank, self.peers, self.timeout = rank, {p.rank: p for p in peers}, timeout
        # Reads sample the beats: a change can look up to two intervals apart, so the interval is kept small.
        self.interval = min(_BEAT_INTERVAL, timeout / 10)
        now = time.monotonic()
        self._seen = {r: (None, now) for r in self.peers if r != rank}  # rank -> (last beat, when it changed)
        # Times of this process's last answered exchange, of its last attempt, and of an RPC still waiting.
        self._answered = self._tried = now
        self._waiting_since: float | None = None
        self._error = ""
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._beat, name="realm-jax-heartbeat", daemon=True),
                         threading.Thread(target=self._watch, name="realm-jax-watchdog", daemon=True)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2 * self.interval + 1)

    def _beat(self) -> None:
        client, count = _client(), 0
        while not self._stop.is_set():
            count += 1
            self._waiting_since = time.monotonic()
            try:
                client.key_value_set(f"{_KEY}/beat/{self.rank}", str(count), allow_overwrite=True)
                beats = client.key_value_dir_get(f"{_KEY}/beat/")
            except jax.errors.JaxRuntimeError as e:
                self._error = _first_line(e)
            else:
                self._answered = time.monotonic()
                for key, value in beats:
                    r = int(key.rsplit("/", 1)[1])
                    if r in self._seen and self._seen[r][0] != value:
                        self._seen[r] = (value, self._answered)
            self._tried, self._waiting_since = time.monotonic(), None
            self._stop.wait(self.interval)

    def _watch(self) -> None:
        # Silence is measured up to this process's own last answered read, so that a pause of this process
        # (a stalled thread, a suspended host) is not taken for a peer's death.
        me = str(self.peers[self.rank])
        while not self._stop.wait(self.interval / 2):
            waiting = self._waiting_since
            unanswered = max(self._tried - self._answered, 0 if waiting is None else time.monotonic() - waiting)
            if unanswered > self.timeout:
                _die(f"{me}: lost {self.peers[0]} (it runs the coordination service): no answer for "
                     f"{unanswered:.0f} s ({self._error or 'no reply'})")
            for r, (_, changed) in self._seen.items():
                if self._answered - changed > self.timeout:
                    _die(f"{me}: lost {self.peers[r]}: no heartbeat for {self._answered - changed:.0f} s")


def plan_mesh(config: DistributedConfig | MeshShape | None, processes: int, devices_per_process: int) -> MeshShape:
    """The mesh shape `global_mesh` will build for `processes` processes of `devices_per_process` devices
    each (one process: at most its devices, the first ones; several: all of them); MeshError if it cannot
    (checkable before any process starts)."""
    if not isinstance(config, DistributedConfig):
        config = DistributedConfig(mesh=config)
    n = processes * devices_per_process
    shape = config.shape_for(n)
    # one process may take fewer devices than it has (its first ones: `global_mesh`); processes span them all
    if shape.size > n or (processes > 1 and shape.size != n):
        raise MeshError(f"a mesh of data={shape.data} x stage={shape.stage} x model={shape.model} = {shape.size} "
                        f"devices does not match the {n} devices of {processes} process(es) ({devices_per_process} "
                        "each)")
    if processes > 1 and devices_per_process % shape.data:
        raise MeshError(f"data={shape.data} must divide the {devices_per_process} devices of each of the {processes} "
                        "processes: every process reads the whole batch, so the data axis stays inside a process "
                        "and the processes lie along stage and model")
    return shape


def global_mesh(config: DistributedConfig | MeshShape | None = None) -> Mesh:
    """A data / stage / model mesh over every process's devices (`jax.devices()`).

    Across processes the data axis stays inside each process and the processes lie along stage and model:
    every process then holds every row of the batch, which the runtime needs because each process reads
    the generated tokens. So the data size must divide each process's device count (`plan_mesh`).
    """
    devices = jax.devices()
    by_process: dict[int, list] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    counts = {p: len(ds) for p, ds in sorted(by_process.items())}
    if len(set(counts.values())) > 1:
        raise MeshError(f"the processes hold different numbers of devices ({counts}, process: devices); a global "
                        "mesh needs the same number on each")
    local = next(iter(counts.values()))
    shape = plan_mesh(config, len(counts), local)
    if len(counts) == 1:  # its first devices, as many as the mesh takes (strategy "none": one)
        return make_mesh(shape, devices[: shape.size])
    cols = local // shape.data
    grid = np.concatenate([np.array(sorted(ds, key=lambda d: d.id), dtype=object).reshape(shape.data, cols)
                           for _, ds in sorted(by_process.items())], axis=1)  # [data, processes x cols]
    return make_mesh(shape, list(grid.reshape(-1)))


__all__ = ["EXIT_PEER_LOST", "Coordinator", "Peer", "cluster_environment", "global_mesh", "join", "plan_mesh",
           "process_name"]
