"""Starting and reaching a server on this machine: a free loopback port, and a wait until it answers (the
benchmark, the soak script and the tests start `realm-jax serve` or llama.cpp's server as subprocesses)."""

from __future__ import annotations

import socket
import subprocess
import time

__all__ = ["free_port", "wait_until_serving"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, proc: subprocess.Popen | None, *, path: str = "/health", timeout: float = 600.0,
                       poll: float = 0.5) -> None:
    """Return once GET url + path answers 200; raise RuntimeError if `proc` (the server, or None for one
    started elsewhere) exits first or `timeout` seconds pass."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with {proc.returncode} before serving")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {url} did not serve within {timeout} s")
        time.sleep(poll)
