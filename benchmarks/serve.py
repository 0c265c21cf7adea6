"""Serving throughput and latency with the official openai client: realm-jax's server (and llama.cpp's,
through llama-cpp-python's server extra, when it is installed) on the same GGUF file, same machine, same run.

For 1, 4 and 16 concurrent clients (--clients), each client sends --requests completions of --max-tokens
tokens in turn, streamed: greedy, or sampled with --temperature (and --top-p, --top-k; request j of a client
seeded j); the script reports the generated tokens per second over all clients,
the time to first token (TTFT) and the inter-token time (p50 and p99). `--ttft-under-load` also measures
the TTFT of a short request on an idle server and while a long one decodes (the continuous-batching figure).

    python benchmarks/serve.py [--model FILE] [--clients 1,4,16] [--temperature 1.0 [--top-p 0.95] [--top-k 40]]
                               [--llama-python VENV/bin/python] [--json out.json]

Only 127.0.0.1 is used; each server is a subprocess on a free port, killed at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from realm_jax.serve.local import free_port, wait_until_serving  # noqa: E402

PROMPTS = ["Once upon a time", "The capital of France is", "def fib(n):", "Water boils at", "In 1492,",
           "The quick brown fox", "Dear Sir or Madam,", "Photosynthesis is"]


class ServerFailed(RuntimeError):
    """A server subprocess exited or did not answer before serving; the message ends with its log's last line."""


@contextlib.contextmanager
def server(command: list[str], port: int, timeout: float = 600.0, env: dict | None = None):
    """Run a server subprocess until its /v1/models answers (llama.cpp's server has no /health); always kill
    it. Raises ServerFailed, with the last line of the server's log, if it does not come up."""
    log = tempfile.TemporaryFile()  # not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        try:
            wait_until_serving(f"http://127.0.0.1:{port}", proc, path="/v1/models", timeout=timeout)
        except RuntimeError as e:
            log.seek(0)
            lines = log.read().decode(errors="replace").strip().splitlines()
            raise ServerFailed(f"{e}: {lines[-1] if lines else 'its log is empty'}") from None
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.kill()
        proc.wait()
        log.close()


GREEDY = {"temperature": 0.0}


def one(client, model: str, prompt: str, max_tokens: int, sampling: dict = GREEDY, seed: int = 0) -> dict:
    """One streamed completion: its TTFT, inter-token gaps and token count. sampling: temperature, top_p
    and top_k (an extra field of llama.cpp's server and realm-jax's; 0 is off in both)."""
    start = time.perf_counter()
    times = []
    # top_k always sent when sampling: llama-cpp-python's server would otherwise apply its own 40
    extra = {"top_k": sampling.get("top_k", 0)} if sampling["temperature"] > 0 else None
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                       temperature=sampling["temperature"], top_p=sampling.get("top_p", 1.0),
                                       seed=seed, extra_body=extra, stream=True,
                                       stream_options={"include_usage": True})
    tokens = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if getattr(chunk, "usage", None):
            tokens = chunk.usage.completion_tokens
    if not times:
        raise RuntimeError("no text came back")
    return {"ttft": times[0] - start, "gaps": list(np.diff(times)), "tokens": tokens or len(times),
            "end": time.perf_counter()}


def run_level(base: str, model: str, clients: int, requests: int, max_tokens: int, sampling: dict = GREEDY) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=base, api_key="none", timeout=600, max_retries=0)

    def worker(i):
        return [one(client, model, PROMPTS[(i + j) % len(PROMPTS)], max_tokens, sampling, j) for j in range(requests)]

    one(client, model, "Warm up", 4, sampling)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(worker, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_ms": 1e3 * np.percentile(ttft, 50),
            "ttft_p99_ms": 1e3 * np.percentile(ttft, 99), "itl_p50_ms": 1e3 * np.percentile(gaps, 50),
            "itl_p99_ms": 1e3 * np.percentile(gaps, 99)}


def ttft_under_load(base: str, model: str, repeats: int = 9) -> dict:
    """The TTFT of a short request on an idle server, and while one long request decodes."""
    from openai import OpenAI

    client = OpenAI(base_url=base, api_key="none", timeout=600, max_retries=0)
    idle = [one(client, model, "The capital of France is", 4)["ttft"] for _ in range(repeats)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long = pool.submit(one, client, model, "Once upon a time", 480)
        time.sleep(1.0)  # the long one is decoding
        busy = [one(client, model, "The capital of France is", 4)["ttft"] for _ in range(repeats)]
        if long.done():
            raise RuntimeError("the long request ended before the short ones were measured: raise its max_tokens")
        long.result()
    return {"idle_ttft_ms": 1e3 * float(np.median(idle)), "busy_ttft_ms": 1e3 * float(np.median(busy)),
            "ratio": float(np.median(busy) / np.median(idle))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a GGUF file (default: the embedded gemma3-270m Q4_K_M)")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 (the default): off")
    p.add_argument("--ttft-under-load", action="store_true")
    p.add_argument("--llama-python", default=sys.executable, help="the Python whose llama-cpp-python[server] "
                   "runs llama.cpp's server (default: this one; a separate venv keeps the peer out of the project's)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    from realm_jax.assets import default_model_path

    path = args.model or str(default_model_path())
    levels = [int(c) for c in args.clients.split(",")]
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    out: dict = {"model": pathlib.Path(path).name, "cpus": os.cpu_count(), "max_tokens": args.max_tokens,
                 "requests_per_client": args.requests, "sampling": sampling, "servers": {}}
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "realm_jax.cli", "serve", "--model", path, "--port", str(port),
               "--slots", str(args.slots), "--max-context", "1024"]
    with server(command, port, env=env) as base:
        rows = [run_level(base, "realm-jax", c, args.requests, args.max_tokens, sampling) for c in levels]
        result = {"levels": rows}
        if args.ttft_under_load:
            result["ttft_under_load"] = ttft_under_load(base, "realm-jax")
        out["servers"]["realm-jax"] = result
    report("realm-jax", result)
    write(args.json, out)  # kept whatever happens to the peer
    out["servers"]["llama.cpp"] = result = llama_cpp_peer(args, path, levels, sampling)
    report("llama.cpp", result)
    write(args.json, out)
    return 0


def llama_cpp_peer(args, path: str, levels: list[int], sampling: dict) -> dict:
    """llama.cpp's server through llama-cpp-python on the same file and levels, or {"skipped": why}."""
    # Importing llama_cpp.server alone succeeds without the [server] extra; its app needs the extra's
    # packages (fastapi, sse-starlette, pydantic-settings), as `python -m llama_cpp.server` does.
    probe = subprocess.run([args.llama_python, "-c", "import llama_cpp, llama_cpp.server.app; "
                            "print(llama_cpp.__version__)"], capture_output=True, text=True)
    if probe.returncode:
        reason = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else f"exit {probe.returncode}"
        return {"skipped": f"llama-cpp-python[server] is not importable by {args.llama_python} ({reason}); pip "
                           "install 'llama-cpp-python[server]' (compiles llama.cpp), or --llama-python a venv "
                           "that has it"}
    # llama-cpp-python's server decodes one sequence at a time: concurrent clients queue.
    port = free_port()
    command = [args.llama_python, "-m", "llama_cpp.server", "--model", path, "--port", str(port), "--host",
               "127.0.0.1", "--n_ctx", "1024"]
    try:
        with server(command, port) as base:
            return {"version": probe.stdout.strip(),
                    "levels": [run_level(base, path, c, args.requests, args.max_tokens, sampling) for c in levels]}
    except ServerFailed as e:
        return {"skipped": f"llama.cpp's server did not start: {e}"}


def report(name: str, result: dict) -> None:
    if "skipped" in result:
        print(f"{name}: skipped: {result['skipped']}", flush=True)
        return
    for r in result["levels"]:
        print(f"{name}: {r['clients']:>2} clients: {r['tokens_per_s']:7.1f} tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} "
              f"p99 {r['ttft_p99_ms']:.0f} ms, inter-token p50 {r['itl_p50_ms']:.1f} p99 {r['itl_p99_ms']:.1f} ms")
    if "ttft_under_load" in result:
        t = result["ttft_under_load"]
        print(f"{name}: TTFT idle {t['idle_ttft_ms']:.0f} ms, while a long request decodes "
              f"{t['busy_ttft_ms']:.0f} ms ({t['ratio']:.2f}x)")
    sys.stdout.flush()


def write(path: str | None, out: dict) -> None:
    if path:
        pathlib.Path(path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
