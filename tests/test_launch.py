"""Several processes: DistributedConfig, the launch script, and lost peers.

Every multi-process run is a subprocess tree with a timeout (jax.distributed.initialize never runs in the
pytest process): 2 processes x 2 CPU devices on 127.0.0.1 give the tokens of one process; a peer that never
starts, or dies mid-run, ends every process with a non-zero status well within 120 s and a message naming
it, under the launch supervisor and without one (the cluster case: workers started directly, one of them
through JAX's Slurm detection). Bad arguments fail before any process starts.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import pytest

from realm_jax.cli import main
from realm_jax.distributed import (DistributedConfig, MeshShape, cluster_environment, parse_mesh, plan_mesh,
                                   strategy_of)
from realm_jax.distributed.guard import EXIT_PEER_LOST
from realm_jax.distributed.launch import FAULT_ENV, reserved_port
from realm_jax.errors import CoordinatorError, MeshError
import background

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "tests" / "data" / "synthetic" / "llama-k-q4_k_m.gguf")
PROMPT = "Once upon a time"
GENERATE = ["generate", PROMPT, "--model", MODEL, "--precision", "f32", "--max-new-tokens", "8"]
LOST_WITHIN_S = 120  # the bound the issue sets; the runs below take a few seconds past their timeouts
CLUSTER_VARS = ("SLURM_", "OMPI_", "KUBERNETES_SERVICE_HOST", "JAX_COORDINATOR")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_VARS) and k != FAULT_ENV}
    return env | extra


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 300):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env or _env())
    return proc, time.monotonic() - start


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("realm-jax: error:")]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --- DistributedConfig and mesh plans (no processes) ---------------------------------------------------
@pytest.mark.parametrize("spec, strategy", [("data=1", "none"), ("model=4", "tensor"), ("stage=2", "pipeline"),
                                            ("data=8", "data"), ("data=2,model=2", "hybrid"),
                                            ("stage=2, model=2, data=2", "hybrid")])
def test_strategy_follows_the_mesh(spec, strategy):
    shape = parse_mesh(spec)
    assert strategy_of(shape) == strategy
    assert DistributedConfig(mesh=shape).strategy == strategy
    assert DistributedConfig(strategy=strategy, mesh=shape).mesh == shape


@pytest.mark.parametrize("strategy, shape", [("none", MeshShape()), ("tensor", MeshShape(model=8)),
                                             ("data", MeshShape(data=8)), ("pipeline", MeshShape(stage=8))])
def test_mesh_follows_the_strategy(strategy, shape):
    assert DistributedConfig(strategy=strategy).shape_for(8 if strategy != "none" else 1) == shape


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(strategy="tensor", mesh=MeshShape(data=2, model=2)), MeshError, "which is 'hybrid'"),
    (dict(strategy="data", mesh=MeshShape(model=2)), MeshError, "it needs only data > 1"),
    (dict(strategy="none", mesh=MeshShape(stage=2)), MeshError, "'pipeline'"),
    (dict(strategy="sideways"), MeshError, "must be one of none, tensor, pipeline, data, hybrid"),
    (dict(mesh={"model": 2}), MeshError, "must be a MeshShape"),
    (dict(num_processes=0), CoordinatorError, "num_processes=0 must be an int >= 1"),
    (dict(num_processes=2, coordinator_address="h:1"), CoordinatorError, "needs this process's process_id"),
    (dict(num_processes=2, process_id=2, coordinator_address="h:1"), CoordinatorError, "process_id=2"),
    (dict(num_processes=2, process_id=0), CoordinatorError, "needs coordinator_address"),
    (dict(num_processes=2, process_id=0, coordinator_address="h"), CoordinatorError, "HOST:PORT"),
    (dict(num_processes=2, process_id=0, coordinator_address="h:70000"), CoordinatorError, "1..65535"),
    (dict(process_id=1), CoordinatorError, "need num_processes too"),
])
def test_bad_configs(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        DistributedConfig(**kwargs)


@pytest.mark.parametrize("spec, message", [("model=two", "must be an int"), ("layers=2", "not AXIS=SIZE"),
                                           ("model=2,model=2", "given twice"), ("model=0", "model=0")])
def test_bad_mesh_specs(spec, message):
    with pytest.raises(MeshError, match=re.escape(message)):
        parse_mesh(spec)


def test_mesh_plans_over_processes():
    assert plan_mesh(DistributedConfig(strategy="tensor"), 2, 2) == MeshShape(model=4)
    assert plan_mesh(MeshShape(data=2, model=2), 2, 2) == MeshShape(data=2, model=2)
    with pytest.raises(MeshError, match="does not match the 4 devices of 2 process"):
        plan_mesh(MeshShape(model=2), 2, 2)
    with pytest.raises(MeshError, match="data=4 must divide the 2 devices of each of the 2 processes"):
        plan_mesh(MeshShape(data=4), 2, 2)
    with pytest.raises(MeshError, match="needs a mesh shape"):
        plan_mesh(DistributedConfig(strategy="hybrid"), 2, 2)


def test_cluster_detection(monkeypatch):
    for key in list(os.environ):
        if key.startswith(CLUSTER_VARS):
            monkeypatch.delenv(key)
    assert cluster_environment() is None
    for key, value in dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="n0", SLURM_NTASKS="2", SLURM_PROCID="0").items():
        monkeypatch.setenv(key, value)
    assert cluster_environment() is None  # JAX needs SLURM_LOCALID as well
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert cluster_environment() == "Slurm"


# --- bad launch arguments fail before any process starts ---------------------------------------------------
TP2 = [*GENERATE, "--mesh", "model=2"]


@pytest.mark.parametrize("args, message", [
    (["--", *TP2], "launch takes one of --processes N"),
    (["--processes", "2", "--hosts", "a,b", "--", *TP2], "got --processes and --hosts"),
    (["--processes", "2"], "needs a command after --"),
    (["--processes", "2", "--", "inspect", MODEL], "launch runs generate or bench on every process; got 'inspect'"),
    (["--processes", "2", "--", *GENERATE], "launch needs generate --mesh (e.g. model=4) or --strategy"),
    (["--processes", "0", "--", *TP2], "--processes=0 must be >= 1"),
    (["--processes", "2", "--cpu-devices", "0", "--", *TP2], "cpu_devices=0 must be an int in [1, 1024]"),
    (["--processes", "2", "--init-timeout", "0", "--", *TP2], "init_timeout=0.0 must be"),
    (["--processes", "2", "--port", "9", "--", *TP2], "--port goes with --hosts"),
    (["--processes", "2", "--cpu-devices", "2", "--", *GENERATE, "--mesh", "model=3"],
     "model=3 = 3 devices does not match the 4 devices of 2 process(es) (2 each)"),
    (["--processes", "2", "--cpu-devices", "2", "--", *GENERATE, "--mesh", "data=4"], "data=4 must divide"),
    (["--processes", "2", "--cpu-devices", "4", "--", *GENERATE, "--mesh", "model=8"],  # before any worker starts
     "llama-k-q4_k_m.gguf: 4 query heads cannot be split over a model axis of 8 devices"),
    (["--processes", "2", "--", *TP2, "--strategy", "data"], "strategy='data' does not"),
    (["--processes", "2", "--", *TP2, "--temperature", "-1"], "temperature"),
    (["--hosts", "a,a", "--", *TP2], "names a host twice"),
    (["--process-id", "2", "--num-processes", "2", "--coordinator", "h:1", "--", *TP2], "process_id=2"),
    (["--process-id", "0", "--num-processes", "2", "--coordinator", "h", "--", *TP2], "HOST:PORT"),
    (["--process-id", "0", "--num-processes", "2", "--coordinator", "h:\u00b2\u00b3", "--", *TP2], "HOST:PORT"),
    (["--process-id", "0", "--num-processes", "2", "--coordinator", "a b:1234", "--", *TP2], "host 'a b' must be"),
    (["--process-id", "0", "--num-processes", "2", "--coordinator", "::1:1234", "--", *TP2], "IPv6 address in"),
    (["--hosts", "node0:8476,node1", "--", *TP2], "host 'node0:8476' must be a host name"),
    (["--processes", "2", "--heartbeat-timeout", "0.01", "--", *TP2], "heartbeat_timeout=0.01 must be a number of "
                                                                          "seconds in [2, 3600]"),
    (["--processes", "2", "--", *TP2[:-1], "model=2_0"], "the size of 'model' must be an int, got '2_0'"),
])
def test_bad_launch_arguments(capsys, args, message):
    assert main(["launch", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("realm-jax: error:") and message in err[0], err


@pytest.mark.parametrize("args, message", [
    (["--mesh", "model=1024"], "model=1024 = 1024 devices does not match the "),
    (["--strategy", "sideways"], "strategy='sideways' must be one of"),
    (["--mesh", "model=2", "--strategy", "none"], "strategy='none' does not match"),
])
def test_generate_mesh_errors(capsys, args, message):
    assert main([*GENERATE, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.fixture(scope="module")
def one_process_text():
    """What `generate` writes for GENERATE's prompt in one process on one device (this one)."""
    import realm_jax

    return PROMPT + realm_jax.load(MODEL, policy="f32", progress=False).generate(PROMPT, max_new_tokens=8) + "\n"


# The runs that only check what comes out (no time bound) are background checks (tests/background.py): they
# run while the in-process tests do, which otherwise waited ~60 s for them.
def _check(key: str, test: str, args: list[str], env: dict[str, str] | None = None) -> None:
    """Registers `_run(args, env)` (a script by its path under ROOT) as the background check `key`, which the
    test function named `test` reads."""
    args = [str(ROOT / a) if a.startswith("scripts/") else a for a in args]
    background.job(__file__, key, wants=lambda item: item.originalname == test)(
        lambda: ([sys.executable, *args], env or _env(), 300))


_FIRST_DEVICES = {"none": ["--strategy", "none"], "model2": ["--mesh", "model=2"]}
for _key, _mesh in _FIRST_DEVICES.items():
    _check(f"first_devices_{_key}", "test_one_process_runs_a_mesh_on_its_first_devices",
           ["-m", "realm_jax.cli", *GENERATE, *_mesh], _env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))


def test_one_process_runs_a_mesh_on_its_first_devices(one_process_text):
    """A mesh of fewer devices than the host has (4 here): no parallelism asked (one device), or model=2 (two);
    generate's own text each time."""
    outs = [background.result(__file__, f"first_devices_{key}") for key in _FIRST_DEVICES]
    assert all(p.returncode == 0 for p in outs), [p.stderr[-2000:] for p in outs]
    assert outs[0].stdout == outs[1].stdout == one_process_text


def test_cluster_mode_needs_a_cluster():
    proc, _ = _run(["-m", "realm_jax.cli", "launch", "--cluster", "--", *TP2])
    assert proc.returncode == 2
    assert _errors(proc.stderr) and "no Slurm, Open MPI or Kubernetes environment found" in _errors(proc.stderr)[0]


def test_hosts_print_one_command_each():
    proc, _ = _run(["scripts/launch_multihost.py", "--hosts", "node0,node1", "--port", "4321", "--", *GENERATE,
                    "--mesh", "model=8"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "# on node0" and lines[2] == "# on node1"
    for rank in (0, 1):
        assert f"launch --process-id {rank} --num-processes 2 --coordinator node0:4321 " in lines[2 * rank + 1]
        assert lines[2 * rank + 1].endswith("--max-new-tokens 8 --mesh model=8")


# --- runs of several processes -------------------------------------------------------------------------
def _launch_args(*options: str, mesh: str = "model=2,data=2") -> list[str]:
    return ["scripts/launch_multihost.py", "--processes", "2", "--cpu-devices", "2", *options, "--", *GENERATE,
            "--mesh", mesh]


def _launch(*options: str, mesh: str = "model=2,data=2", env=None, timeout: float = 300):
    return _run(_launch_args(*options, mesh=mesh), env=env, timeout=timeout)


_check("two_processes", "test_two_processes_give_the_tokens_of_one", _launch_args())


def test_two_processes_give_the_tokens_of_one(one_process_text):
    proc = background.result(__file__, "two_processes")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == one_process_text  # process 0 prints; stdout carries only the text
    assert not _errors(proc.stderr)


_check("bench_two_processes", "test_bench_over_two_processes",
       ["scripts/launch_multihost.py", "--processes", "2", "--cpu-devices", "2", "--", "bench", "--model", MODEL,
        "--mesh", "model=4", "--prompt-tokens", "16", "--decode-tokens", "4", "--runs", "1", "--json"])


def test_bench_over_two_processes():
    """launch forwards bench too: one JSON report from process 0 for a mesh over both processes' devices."""
    proc = background.result(__file__, "bench_two_processes")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["devices"] == 4 and report["mesh"] == {"data": 1, "stage": 1, "model": 4}
    assert report["prefill_tps"] > 0 and report["decode_tps"] > 0


def _lost(proc, elapsed: float, rank: int) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert elapsed < LOST_WITHIN_S
    message = _errors(proc.stderr)[-1]
    assert f"lost process {rank} of 2 (127.0.0.1, pid " in message
    for pid in map(int, re.findall(r"pid (\d+)", message)):  # the lost one and the ones killed: all gone
        assert _gone(pid)
    return message


def test_a_peer_that_never_starts_ends_the_launch():
    proc, elapsed = _launch(env=_env(**{FAULT_ENV: "1:join"}))
    message = _lost(proc, elapsed, 1)
    assert "it exited with status 1; killed process 0 (pid " in message


def test_a_peer_that_dies_mid_run_ends_the_launch():
    proc, elapsed = _launch(env=_env(**{FAULT_ENV: "1:generate"}))
    message = _lost(proc, elapsed, 1)
    assert "it was killed by SIGKILL; killed process 0 (pid " in message
    assert "process 1 (pid " in proc.stderr and "failing at 'generate'" in proc.stderr  # after its first piece


def _children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (Linux: /proc)."""
    out = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the workers' parent-death signal is Linux's")
def test_workers_die_with_a_killed_supervisor():
    """A supervisor killed by SIGKILL (as a timeout kills it) runs none of its cleanup: its workers get
    SIGKILL from the kernel, rather than running on as orphans (a worker stuck in a collective whose peer
    still answers never times out)."""
    sup = subprocess.Popen([sys.executable, "scripts/launch_multihost.py", "--processes", "2", "--cpu-devices", "2",
                            "--", *GENERATE, "--max-new-tokens", "400", "--mesh", "model=4"], cwd=ROOT, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(workers := _children(sup.pid)) < 2 and time.monotonic() < deadline and sup.poll() is None:
            time.sleep(0.1)
        assert len(workers) == 2, (workers, sup.poll())
    finally:
        sup.kill()
        sup.wait()
    deadline = time.monotonic() + 5  # the kernel's SIGKILL is at once; the run would take longer
    while (left := set(workers) & set(_all_live())) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:  # not to leave them running when this fails
        os.kill(pid, 9)
    assert not left, f"workers {sorted(left)} outlived their supervisor"


def _all_live() -> list[int]:
    """Every live (not zombie) process (Linux: /proc)."""
    out = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(int(stat.parent.name))
        except (OSError, IndexError):
            continue
    return out


def _worker(rank: int, address: str, *options: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "realm_jax.cli", "launch", "--process-id", str(rank),
                             "--num-processes", "2", "--coordinator", address, "--cpu-devices", "2", *options,
                             "--", *GENERATE, "--mesh", "model=4"], cwd=ROOT, env=env or _env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, float]]:
    start, out = time.monotonic(), []
    try:
        for p in procs:
            _, err = p.communicate(timeout=max(timeout - (time.monotonic() - start), 1))
            out.append((p.returncode, err, time.monotonic() - start))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def test_workers_given_other_arguments_refuse_to_run():
    """By hand, process 1 gets another prompt: every process says so at the join (naming the other and the
    argument) and exits 2, rather than running the same collectives on different tokens (a wrong text, exit 0)."""
    with reserved_port() as port:
        procs = [subprocess.Popen([sys.executable, "-m", "realm_jax.cli", "launch", "--process-id", str(rank),
                                   "--num-processes", "2", "--coordinator", f"127.0.0.1:{port}", "--cpu-devices",
                                   "2", "--", "generate", prompt, *GENERATE[2:], "--mesh", "model=4"], cwd=ROOT,
                                  env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for rank, prompt in ((0, PROMPT), (1, "The cat sat down"))]
        results = _finish(procs)
    for rank, (code, err, elapsed) in enumerate(results):
        other = 1 - rank
        assert code == 2 and elapsed < LOST_WITHIN_S, err[-3000:]
        assert re.search(rf"process {rank} of 2 .*: process {other} \(.+, pid \d+\) was started with other "
                         r"arguments: command argument 2: .* here, .* there", _errors(err)[-1]), err[-3000:]


def test_a_coordinator_port_in_use_is_refused():
    """Something listens at the address (another run's coordinator): process 0 says so at once, rather than
    starting a second coordinator on it (gRPC's SO_REUSEPORT), which aborted both runs."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        (code, err, elapsed), = _finish([_worker(0, f"127.0.0.1:{port}")])
    assert code == 2 and elapsed < 60, err[-2000:]
    assert _errors(err)[-1].endswith(f"the coordinator address 127.0.0.1:{port} is already in use (another run's "
                                     "coordinator?): give another port"), err[-2000:]


def test_one_process_that_cannot_reach_its_own_coordinator_says_so():
    """192.0.2.1 (TEST-NET-1) is no address of this host: not "a peer failed to start" with no peer named."""
    proc = subprocess.Popen([sys.executable, "-m", "realm_jax.cli", "launch", "--process-id", "0", "--num-processes",
                             "1", "--coordinator", "192.0.2.1:23456", "--cpu-devices", "2", "--init-timeout", "3",
                             "--", *GENERATE, "--mesh", "model=2"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    (code, err, elapsed), = _finish([proc])
    assert code in (2, 3) and elapsed < LOST_WITHIN_S, err[-2000:]
    assert "peer" not in _errors(err)[-1] and "192.0.2.1:23456" in _errors(err)[-1], err[-2000:]


def test_without_a_supervisor_a_missing_peer_is_named():
    """The cluster case: each worker alone bounds its wait to join and names who did not come."""
    with reserved_port() as port0, reserved_port() as port1:
        alone0 = _worker(0, f"127.0.0.1:{port0}", "--init-timeout", "3")
        alone1 = _worker(1, f"127.0.0.1:{port1}", "--init-timeout", "3")
        (code0, err0, t0), (code1, err1, t1) = _finish([alone0, alone1])
    assert code0 == code1 == 3 and max(t0, t1) < LOST_WITHIN_S
    assert re.search(r"process 0 of 2 \(.+, pid \d+\): the processes did not all join .* process\(es\) 1: a peer "
                     "failed to start", _errors(err0)[-1])
    assert "process 0 (the coordinator) did not start" in _errors(err1)[-1]


def test_without_a_supervisor_a_peer_dying_mid_run_is_named():
    """Workers joined through JAX's Slurm detection; process 1 dies after its first piece; process 0's
    watchdog names it once its heartbeat has been silent for 5 s."""
    with reserved_port() as port:
        slurm = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                     JAX_COORDINATOR_PORT=str(port), **{FAULT_ENV: "1:generate"})
        procs = [subprocess.Popen([sys.executable, "-m", "realm_jax.cli", "launch", "--cluster", "--cpu-devices", "2",
                                   "--heartbeat-timeout", "5", "--", *GENERATE, "--mesh", "model=4"], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=_env(**slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)))
                 for r in (0, 1)]
        (code0, err0, t0), (code1, _, _) = _finish(procs)
    assert code1 == -9
    assert code0 == 3 and t0 < LOST_WITHIN_S, err0[-3000:]
    assert re.search(rf"process 0 \(.+\): lost process 1 \(.+, pid {procs[1].pid}\): no heartbeat for \d+ s",
                     _errors(err0)[-1])


def test_without_a_supervisor_process_0_dying_mid_run_is_one_line():
    """Process 0 runs the coordination service: when it dies, JAX aborts the others at once from C++ (a stack
    trace, SIGABRT); each survivor's guard says it in one line naming process 0, and exits EXIT_PEER_LOST."""
    with reserved_port() as port:
        slurm = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                     JAX_COORDINATOR_PORT=str(port), **{FAULT_ENV: "0:generate"})
        procs = [subprocess.Popen([sys.executable, "-m", "realm_jax.cli", "launch", "--cluster", "--cpu-devices", "2",
                                   "--", *GENERATE, "--mesh", "model=4"], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=_env(**slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)))
                 for r in (0, 1)]
        (code0, _, _), (code1, err1, t1) = _finish(procs)
    assert code0 == -9
    assert code1 == EXIT_PEER_LOST and t1 < LOST_WITHIN_S, err1[-3000:]
    assert re.fullmatch(rf"realm-jax: error: process 1 of 2 \(.+, pid {procs[1].pid}\): lost process 0 \(.+, pid "
                        rf"{procs[0].pid}\) \(it runs the coordination service\): JAX ended this process \(.+\)",
                        err1.splitlines()[-1]), err1[-3000:]
    assert "stack trace" not in err1 and "Terminating" not in err1, err1[-3000:]
