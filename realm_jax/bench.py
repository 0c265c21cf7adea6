"""Prefill and decode speed of a loaded model, as `realm-jax bench`, benchmarks/e2e.py and
benchmarks/distributed.py measure it."""

from __future__ import annotations

import pathlib
import statistics
import subprocess
import time
from typing import Any

import numpy as np

from realm_jax.errors import ContextLengthError, SamplingError
from realm_jax.inputs import shown

__all__ = ["check_sizes", "git_revision", "measure", "write_report"]


MAX_RUNS = 1000  # timed runs: more measure nothing new, and each one is a full prefill and decode


def check_sizes(**sizes: int) -> None:
    """SamplingError unless every size is an int >= 1 (named as given), and `runs` at most `MAX_RUNS`."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SamplingError(f"{name}={shown(value)} must be an int >= 1")
    if sizes.get("runs", 1) > MAX_RUNS:
        raise SamplingError(f"runs={shown(sizes['runs'])} must be at most {MAX_RUNS}")


def measure(model, *, prompt_tokens: int = 128, decode_tokens: int = 64, batch: int = 1, runs: int = 3) -> dict[str, Any]:
    """Tokens per second of `model` on fixed pseudo-random prompts (no tokenizer time, the same ids every run).

    One run is a jitted prefill of `batch` prompts of `prompt_tokens` (timed until the first token is
    sampled), then `decode_tokens` greedy steps in one dispatch of the decode loop (timed until the tokens
    are on the host). A first run compiles and is not counted; the medians of `runs` runs are reported.

    Returns:
      {"prefill_tps", "decode_tps" (tokens of the whole batch per second), "warmup_s", "batch",
       "prompt_tokens", "decode_tokens", "runs"}.
    """
    import jax

    from realm_jax.sampling import SamplingConfig

    check_sizes(prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, batch=batch, runs=runs)
    context = model.config.context_length
    if prompt_tokens + decode_tokens + 1 > context:
        raise ContextLengthError(f"prompt_tokens={shown(prompt_tokens)} + decode_tokens={shown(decode_tokens)} + 1 "
                                 f"exceed the model's context of {context} tokens")
    model._check_fits(f"a benchmark of {shown(batch)} x ({prompt_tokens} + {decode_tokens}) tokens", batch=batch,
                      prompt_tokens=prompt_tokens, cache_tokens=prompt_tokens + decode_tokens + 1)
    ids = np.random.default_rng(0).integers(1, model.config.vocab_size, (batch, prompt_tokens)).tolist()

    def once() -> tuple[float, float]:
        t0 = time.perf_counter()
        gen = model.start(ids, max_new_tokens=decode_tokens + 1, sampling=SamplingConfig(), stop_ids=())
        jax.block_until_ready(gen.token)
        t1 = time.perf_counter()
        gen.step(decode_tokens)  # returns host arrays: the loop has finished
        return t1 - t0, time.perf_counter() - t1

    t0 = time.perf_counter()
    once()
    warmup = time.perf_counter() - t0
    pre, dec = zip(*(once() for _ in range(runs)))
    return {"prefill_tps": batch * prompt_tokens / statistics.median(pre),
            "decode_tps": batch * decode_tokens / statistics.median(dec), "warmup_s": warmup, "batch": batch,
            "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "runs": runs}


def git_revision(path: str | pathlib.Path = ".") -> str:
    """The short commit hash of the checkout at `path` (benchmark tables name the commit they measured), or
    "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(table: str, meta: dict[str, Any], rows: list[dict[str, Any]], json_path=None,
                 markdown_path=None) -> None:
    """Print a benchmark's markdown table and, where paths are given, write {"meta", "rows"} as JSON and the
    table as markdown (benchmarks/kernels.py and benchmarks/distributed.py)."""
    import json

    print(table)
    if json_path:
        pathlib.Path(json_path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if markdown_path:
        pathlib.Path(markdown_path).write_text(table)
