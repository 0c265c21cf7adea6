"""Runs the hostile-input cases of tests/test_hostile.py, each in a process of its own under limits.

Started once by the test module (``python tests/hostile_runner.py``), it imports realm_jax (and so numpy and
jax, without starting a JAX backend) and test_tokenizer, and then forks one child per case, so a case costs
its own work, not a fresh interpreter's second of imports. The child caps its address space (RLIMIT_AS) and core dumps, points
its stdin/stdout/stderr at files, and runs the command line's `main(argv)` as ``realm-jax`` would (an
escaping exception prints its traceback and exits 1) or a snippet of Python. The runner waits for it with a
timeout (then kills it) and reports its exit status, signal, wall time, peak RSS and output.

Protocol: one JSON object per line each way. Request: {"argv": [...]} or {"code": "..."}, with "stdin"
(text), "limit_bytes" (address space beyond the runner's) and "timeout_s". Reply: {"status", "signal",
"timed_out", "seconds", "maxrss", "worker_maxrss", "stdout", "stderr"}.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback

import realm_jax  # noqa: F401  (imported once here; every child inherits it)
import test_tokenizer  # noqa: F401  (the template cases build tokenizers with its tiny_gpt2: 0.2 s a case)


def _vm_size() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def _child(request: dict, files: dict[str, str]) -> None:
    """The case, in the forked child; never returns."""
    code = 1
    try:
        limit = _vm_size() + request["limit_bytes"]
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        for fd, name, mode in ((0, "stdin", os.O_RDONLY), (1, "stdout", os.O_WRONLY), (2, "stderr", os.O_WRONLY)):
            os.dup2(os.open(files[name], mode), fd)
        sys.stdin = open(0, encoding="utf-8", closefd=False)
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
        if "argv" in request:
            from realm_jax.cli import main

            code = main(request["argv"])
        else:
            exec(compile(request["code"], "<case>", "exec"), {"__name__": "__case__"})
            code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - what escapes is what the test looks for
        traceback.print_exc()
        code = 1
    finally:
        try:
            from realm_jax import chat_template

            chat_template._POOL.close()  # reap the template worker, so its peak RSS is ours to report
            with open(files["worker"], "w") as f:
                f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def _run(request: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        files = {name: os.path.join(tmp, name) for name in ("stdin", "stdout", "stderr", "worker")}
        with open(files["stdin"], "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(request.get("stdin", ""))
        for name in ("stdout", "stderr", "worker"):
            open(files[name], "w").close()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(request, files)
        timed_out = False
        while True:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() - start > request["timeout_s"]:
                os.kill(pid, signal.SIGKILL)
                _, status, usage = os.wait4(pid, 0)
                timed_out = True
                break
            time.sleep(0.02)
        seconds = time.monotonic() - start

        def read(name):
            with open(files[name], encoding="utf-8", errors="backslashreplace") as f:
                return f.read()

        worker = read("worker")
        return {"status": os.waitstatus_to_exitcode(status), "signal": os.WIFSIGNALED(status),
                "timed_out": timed_out, "seconds": seconds, "maxrss": usage.ru_maxrss * 1024,
                "worker_maxrss": int(worker) * 1024 if worker else 0, "stdout": read("stdout"),
                "stderr": read("stderr")}


def main() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(_run(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
