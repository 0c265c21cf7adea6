"""A hostile soak of `realm-jax serve`: N requests (1000 by default) from a bounded pool of clients, mixing
valid greedy completions with malformed JSON, wrong types, huge max_tokens, over-long prompts, oversized
bodies, wrong API keys, bad logit biases, tool calls (not served) and streams dropped after their first
chunk.

Pass: no 5xx and no connection failure, every valid request's text equals the server's own idle answer
for that prompt (greedy, batch-invariant: the crowd does not change it), every hostile one is a 4xx with
OpenAI's error JSON, and afterwards /health answers with no busy slot and nothing queued.

    python scripts/serve_soak.py [--model FILE] [--requests 1000] [--clients 16]   # starts its own server
    python scripts/serve_soak.py --url http://127.0.0.1:8000 [--api-key KEY]        # an existing one

Loopback only: --url must be on 127.0.0.1 or localhost.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import pathlib
import random
import subprocess
import sys
import time
import urllib.parse

import httpx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from realm_jax.serve.local import free_port, wait_until_serving  # noqa: E402

PROMPTS = ["Once upon a time", "The capital of France is", "def fib(n):", "Water boils at", "In 1492,",
           "The quick brown fox", "Dear Sir or Madam,", "Photosynthesis is"]
MAX_TOKENS = 8


def _wait(url: str, proc: subprocess.Popen | None, timeout: float = 600.0) -> None:
    try:
        wait_until_serving(url, proc, timeout=timeout)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None


def _valid(prompt: str) -> dict:
    return {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}


def _cases(max_context: int) -> list[tuple[str, object]]:
    """(kind, body) of every hostile class; bodies are bytes, or dicts sent as JSON."""
    return [
        ("malformed_json", b'{"prompt": "hi", '),
        ("not_an_object", b'"just a string"'),
        ("bad_utf8", b'{"prompt": "\xff\xfe"}'),
        ("wrong_type_max_tokens", {"prompt": "hi", "max_tokens": "many"}),
        ("wrong_type_prompt", {"prompt": {"text": "hi"}}),
        ("wrong_type_temperature", {"prompt": "hi", "temperature": "hot"}),
        ("bad_value_top_p", {"prompt": "hi", "top_p": 3}),
        ("bad_stop", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}),
        ("huge_max_tokens", {"prompt": "hi", "max_tokens": 10**12}),
        ("over_context_prompt", {"prompt": "lorem ipsum " * max_context, "max_tokens": 4}),
        ("bad_token_ids", {"prompt": [1, 2, -5]}),
        ("lone_surrogate", b'{"prompt": "\\udc80 hi"}'),
        ("deep_nesting", b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
        ("chat_bad_messages", {"messages": [{"role": 5, "content": "hi"}]}),
        ("bad_logit_bias", {"prompt": "hi", "logit_bias": {"9" * 5000: 1, "x": 1e308}}),
        ("chat_tools", {"messages": [{"role": "user", "content": "hi"}],
                        "tools": [{"type": "function", "function": {"name": "f"}}]}),
    ]


def _post(http: httpx.Client, url: str, path: str, body, headers: dict) -> httpx.Response:
    if isinstance(body, bytes):
        return http.post(url + path, content=body, headers={**headers, "Content-Type": "application/json"})
    return http.post(url + path, json=body, headers=headers)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="an existing server on 127.0.0.1 (default: start one)")
    p.add_argument("--model", default=None, help="the GGUF file of the server this starts (default: gemma3-270m)")
    p.add_argument("--api-key", default="soak-key")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not 1 <= args.requests <= 100_000 or not 1 <= args.clients <= 256:
        raise SystemExit("--requests must be in [1, 100000] and --clients in [1, 256]")
    proc = None
    if args.url is None:
        from realm_jax.assets import default_model_path

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.Popen([sys.executable, "-m", "realm_jax.cli", "serve", "--model",
                                 str(args.model or default_model_path()), "--port", str(port), "--slots", "8",
                                 "--queue-size", "256", "--max-context", str(args.max_context), "--api-key",
                                 args.api_key, "--max-body-bytes", str(1 << 20)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    else:
        url = args.url.rstrip("/")
        if urllib.parse.urlparse(url).hostname not in ("127.0.0.1", "localhost"):
            raise SystemExit(f"--url {url}: the soak runs on loopback only")
    headers = {"Authorization": f"Bearer {args.api_key}"}
    try:
        _wait(url, proc)
        with httpx.Client(timeout=600) as http:
            reference = {}
            for prompt in PROMPTS:  # the idle server's answers
                r = _post(http, url, "/v1/completions", _valid(prompt), headers)
                r.raise_for_status()
                reference[prompt] = r.json()["choices"][0]["text"]
        rng = random.Random(args.seed)
        hostile = _cases(args.max_context)
        plan = []
        for i in range(args.requests):
            roll = rng.random()
            if roll < 0.4:
                plan.append(("valid", rng.choice(PROMPTS)))
            elif roll < 0.5:
                plan.append(("dropped_stream", rng.choice(PROMPTS)))
            elif roll < 0.55:
                plan.append(("wrong_key", None))
            elif roll < 0.6:
                plan.append(("oversized_body", None))
            else:
                plan.append(rng.choice(hostile))
        counts: collections.Counter = collections.Counter()
        failures: list[str] = []

        def run(item):
            kind, arg = item
            with httpx.Client(timeout=600) as http:
                try:
                    if kind == "valid":
                        r = _post(http, url, "/v1/completions", _valid(arg), headers)
                        ok = r.status_code == 200 and r.json()["choices"][0]["text"] == reference[arg]
                    elif kind == "dropped_stream":
                        body = {**_valid(arg), "max_tokens": 200, "stream": True}
                        with http.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
                            lines = r.iter_lines()
                            ok = r.status_code == 200 and next(lines).startswith("data: ")
                        # leaving the block closes the connection mid-stream
                    elif kind == "wrong_key":
                        r = _post(http, url, "/v1/completions", _valid("hi"), {"Authorization": "Bearer nope"})
                        ok = r.status_code == 401
                    elif kind == "oversized_body":
                        r = _post(http, url, "/v1/completions", {"prompt": "x" * (2 << 20)}, headers)
                        ok = r.status_code == 413
                    else:
                        path = "/v1/chat/completions" if kind.startswith("chat") else "/v1/completions"
                        r = _post(http, url, path, arg, headers)
                        ok = 400 <= r.status_code < 500 and "message" in r.json()["error"]
                    if kind != "dropped_stream" and r.status_code >= 500:
                        ok = False
                except (httpx.HTTPError, json.JSONDecodeError, StopIteration) as e:
                    return kind, False, f"{type(e).__name__}: {e}"
                return kind, ok, "" if ok else f"status {r.status_code}: {r.text[:200]}"

        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            for kind, ok, why in pool.map(run, plan):
                counts[(kind, ok)] += 1
                if not ok and len(failures) < 20:
                    failures.append(f"{kind}: {why}")
        elapsed = time.monotonic() - start
        deadline = time.monotonic() + 60
        while True:
            health = httpx.get(f"{url}/health", timeout=10).json()
            if not health["busy"] and not health["queued"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
    kinds = sorted({k for k, _ in counts})
    for k in kinds:
        print(f"{k:>24}: {counts[(k, True)]:4d} ok, {counts[(k, False)]:4d} failed")
    print(f"{args.requests} requests in {elapsed:.0f} s; /health afterwards: busy={health['busy']} "
          f"queued={health['queued']} running={health['running']}")
    for f in failures:
        print("FAILED", f)
    bad = sum(counts[(k, False)] for k in kinds) + health["busy"] + health["queued"] + (not health["running"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
