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

__all__ = ["check_sizes", "git_revision", "measure", "memory_parts", "rss_mib", "write_report"]


MAX_RUNS = 1000  # timed runs: more measure nothing new, and each one is a full prefill and decode


def rss_mib() -> tuple[float, float]:
    """This process's resident memory now and its peak so far, in MiB (Linux: /proc and getrusage)."""
    import resource

    with open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    return now, max(now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # the high-water mark lags


def memory_parts(model, *, floor_mib: float, loaded_mib: float, prompt_tokens: int, decode_tokens: int,
                 batch: int = 1) -> dict[str, float]:
    """Where a `measure` run's peak resident memory went, in MiB: `floor_mib` (RSS of the process with JAX
    initialized, before the model loads), `loaded_mib` (RSS once `load` returned). Parts: the JAX floor; the
    weights (the params' arrays, each once); the tokenizer, metadata and what loading left behind (RSS after
    load less the floor and the weights); the KV cache of the generation `measure` runs (sized to the
    requested prompt and new tokens, as `Model.start` allocates it); and the rest of the peak: XLA's compiled
    programs, the compiler's heap and the runtime's buffers (activations, logits)."""
    from realm_jax.runtime import _CACHE_BUCKET, _prompt_length, _round_up, _unique_leaves, token_sizes

    weights = sum(leaf.nbytes for leaf in _unique_leaves(model.params)) / 2**20
    length = _round_up(_prompt_length(prompt_tokens) + decode_tokens + 1, _CACHE_BUCKET)
    kv = token_sizes(model.config, model.policy)["kv_bytes_per_token"] * length * batch / 2**20
    now, peak = rss_mib()
    return {"peak_rss": peak, "rss_now": now, "jax_floor": floor_mib, "weights": weights,
            "tokenizer_metadata_and_load": loaded_mib - floor_mib - weights, "kv_cache": kv,
            "kv_cache_tokens": length * batch, "compiled_programs_and_buffers": peak - loaded_mib - kv}


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
