"""Time opening the two real GGUF files: realm_jax.open_gguf against gguf-py's GGUFReader.

Both parse the header and metadata and map the tensor data without reading it. Prints a markdown table of
median wall times (page cache warm: one untimed open of each file first).

    python benchmarks/gguf_open.py [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import gguf

from realm_jax import assets
from realm_jax.gguf import open_gguf

MODELS = ["gemma3-270m-q4_k_m", "smollm2-135m-instruct-q4_1"]


def _median_seconds(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per reader (median reported)")
    args = parser.parse_args()

    print("| model | file MB | tensors | open_gguf ms | GGUFReader ms | speedup |")
    print("|---|---:|---:|---:|---:|---:|")
    for model in MODELS:
        path = assets.model_path(model)
        with open_gguf(path) as f:
            n_tensors = len(f.tensors)
        ours = _median_seconds(lambda: open_gguf(path).close(), args.runs)
        theirs = _median_seconds(lambda: gguf.GGUFReader(path), args.runs)
        size_mb = path.stat().st_size / 1e6
        print(
            f"| {model} | {size_mb:.0f} | {n_tensors} | {ours * 1e3:.0f} | {theirs * 1e3:.0f} "
            f"| {theirs / ours:.0f}x |"
        )


if __name__ == "__main__":
    main()
