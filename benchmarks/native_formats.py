"""The native CPU decode matmul per weight format: is a lower-bit format as fast per weight byte as Q4_K?

For each format it quantizes random normal weights of an 8B llama's projection shapes (jnp quantizers, so the
scales are realistic; 1024 rows, repeated), then times `native.matmul` at decode rows (x [M, K] bf16, the runtime's compute dtype)
on copies of the weight that together exceed the last-level cache, so every call streams the weight from
memory. It reports microseconds per call, weight GB/s (bytes of the planes over the time) and G weights/s, and
each format's GB/s relative to Q4_K's in the same run (formats interleaved round by round, so drift in the
machine's speed hits them alike).

    python benchmarks/native_formats.py                                  # Q4_K, Q2_K, IQ4_XS, ... at M=1
    python benchmarks/native_formats.py --formats Q4_K,Q2_K --m 1,8 --json out.json
    python benchmarks/native_formats.py --formats Q4_K,Q2_K,Q3_K --shapes 1024x4096 --resident   # compute only
    python benchmarks/native_formats.py --formats Q4_1,Q5_0 --weight-dtypes bfloat16,float32 --m 1,8
        # weights rounded to bf16 (dot_bf16), or exact (dot_codes; the bf16 policy's decode)
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from realm_jax import native  # noqa: E402
from realm_jax.bench import git_revision  # noqa: E402
from realm_jax.quant import QTensor, quantize  # noqa: E402

FORMATS = ["Q4_K", "Q2_K", "IQ4_XS", "Q3_K", "IQ4_NL", "MXFP4", "Q6_K", "Q8_0"]
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # q/o, gate/up, down of an 8B llama
CACHE_BYTES = 96 << 20  # three times this CPU's 32 MiB L3


def weight_bytes(w: QTensor) -> int:
    return sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in w.planes.values())


def weights(fmt: str, n: int, k: int, seed: int, resident: bool = False) -> list[QTensor]:
    """Copies of an (n, k) weight, together larger than CACHE_BYTES (one copy if `resident`): 1024 random
    normal rows quantized once and repeated (the values do not change the kernel's work), copied to distinct
    buffers."""
    x = np.random.default_rng(seed).standard_normal((min(n, 1024), k), np.float32) * 0.02
    q = quantize(x, fmt)
    reps = (-(-n // x.shape[0]), 1)  # N need not be a multiple of the 1024 rows
    w = QTensor(fmt, (n, k), {name: jnp.tile(p, reps)[:n] for name, p in q.planes.items()})
    copies = 1 if resident else max(1, -(-CACHE_BYTES // weight_bytes(w)))
    return [w] + [QTensor(fmt, (n, k), {name: jnp.array(p, copy=True) for name, p in w.planes.items()})
                  for _ in range(copies - 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--m", default="1", help="rows of x, comma-separated")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="N x K, comma-separated")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (the median is reported)")
    ap.add_argument("--reps", type=int, default=20, help="calls per round")
    ap.add_argument("--resident", action="store_true",
                    help="one copy of each weight: at shapes that fit the caches (1024x4096) the kernel's compute is "
                         "timed, not memory, which other jobs' load disturbs much less")
    ap.add_argument("--weight-dtypes", default="float32",
                    help="native.matmul's weight_dtype, comma-separated: each format runs under each, interleaved, "
                         "and is reported against the first")
    ap.add_argument("--json", type=pathlib.Path)
    args = ap.parse_args()
    if not native.available():
        raise SystemExit(f"the native kernels are not available: {native.reason()}")
    fmts, ms = args.formats.split(","), [int(m) for m in args.m.split(",")]
    wds = args.weight_dtypes.split(",")
    mms = {wd: jax.jit(functools.partial(native.matmul, compute_dtype=jnp.bfloat16, out_dtype=jnp.bfloat16,
                                         weight_dtype=wd)) for wd in wds}
    runs = [(fmt, wd) for fmt in fmts for wd in wds]
    rows = []
    for n, k in (tuple(int(d) for d in shape.split("x")) for shape in args.shapes.split(",")):
        ws = {fmt: weights(fmt, n, k, seed=0, resident=args.resident) for fmt in fmts}
        for m in ms:
            x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), jnp.bfloat16)
            for fmt, wd in runs:
                jax.block_until_ready(mms[wd](x, ws[fmt][0]))
            samples = {run: [] for run in runs}
            for _ in range(args.rounds):
                for fmt, wd in runs:
                    start = time.perf_counter()
                    jax.block_until_ready([mms[wd](x, ws[fmt][i % len(ws[fmt])]) for i in range(args.reps)])
                    samples[fmt, wd].append((time.perf_counter() - start) / args.reps)
            for fmt, wd in runs:
                seconds = statistics.median(samples[fmt, wd])
                nbytes = weight_bytes(ws[fmt][0])
                rows.append({"format": fmt, "weight_dtype": wd, "m": m, "n": n, "k": k, "us": seconds * 1e6,
                             "weight_bytes": nbytes,
                             "bits_per_weight": 8 * nbytes / (n * k), "weight_gbps": nbytes / seconds / 1e9,
                             "gweights_per_s": n * k / seconds / 1e9})
        del ws
    base = {(r["weight_dtype"], r["m"], r["n"], r["k"]): r["weight_gbps"] for r in rows if r["format"] == "Q4_K"}
    first = {(r["format"], r["m"], r["n"], r["k"]): r["us"] for r in rows if r["weight_dtype"] == wds[0]}
    print(f"{'format':<8}{'weights':>9}{'M':>3} {'N x K':>12}{'bits/w':>8}{'us':>9}{'GB/s':>7}{'Gw/s':>7}  "
          f"GB/s vs Q4_K  speed vs {wds[0]}")
    for r in rows:
        ref = base.get((r["weight_dtype"], r["m"], r["n"], r["k"]))
        r["gbps_vs_q4_k"] = r["weight_gbps"] / ref if ref else None
        r["speed_vs_first"] = first[r["format"], r["m"], r["n"], r["k"]] / r["us"]
        vs = f"{r['gbps_vs_q4_k']:.2f}x" if ref else "-"
        print(f"{r['format']:<8}{r['weight_dtype']:>9}{r['m']:>3} {r['n']:>6}x{r['k']:<6}{r['bits_per_weight']:>7.3f}"
              f"{r['us']:>9.0f}{r['weight_gbps']:>7.1f}{r['gweights_per_s']:>7.2f}  {vs:>12}  "
              f"{r['speed_vs_first']:.2f}x")
    if args.json:
        meta = {"revision": git_revision(), "jax": jax.__version__, "rounds": args.rounds, "reps": args.reps,
                "resident": args.resident}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
