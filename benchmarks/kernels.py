"""Fused dequant-matmul kernels against their peers on the same device, in one run.

For each format, weight shape (N, K) and number of rows M it times:
  BACKEND          each backend of the linear-layer registry (`realm_jax.linear`) that runs on this
                   platform and supports the format, on the weight as `load` prepares it under the bf16
                   policy (native on CPU: the kernel on the planes up to native.MAX_ROWS rows, the bf16
                   gemm on the planes past it; triton and mosaic_gpu on a GPU; mosaic_tpu on a TPU, and on a
                   CPU in interpret mode, which is a correctness tool, not a speed: its column is reported
                   but means nothing there)
  BACKEND/PATH     on a GPU, each path of a backend that has several (`triton`: gemv where the format has
                   it and M <= 16, mma, and xla on its own layout) instead of the backend's routed choice:
                   `--write-routes FILE` records the fastest path per format and M (the sum over the
                   shapes) for this device kind in FILE (`realm_jax/linear/routes.json` is the one the
                   registry reads: commit it)
  triton_blocks:wW with `--blocks-warps W`: the block-dot GEMM (`pallas_kernels.blockdot`) with W warps a
                   program instead of its own two (4: a warpgroup, which Triton gives `wgmma`s: the design
                   the kernel had before session 39, kept measurable so that a device can decide); not a
                   route
  xla              the XLA reference on the weight as stored: dequantize with jnp, then a dot
  dense_bf16       a bf16 dot on the weight dequantized to bf16 beforehand (the dense peer)
and the device's copy bandwidth (read + write of a large array). Each row gives weight GB/s (bytes of the
quantized weight over the time), % of copy bandwidth, TFLOP/s (2 M N K over the time), % of the dense
bf16 rate at the same shape, and the largest difference from the xla row's product (on the first weight),
over that product's largest magnitude: a kernel's first check on a device, not its tolerance test.

    python benchmarks/kernels.py                 # CPU: small shapes; GPU/TPU: the full set
    python benchmarks/kernels.py --full --formats Q4_K,Q8_0 --m 1,512 --json out.json --markdown out.md
    python benchmarks/kernels.py --impls triton --shapes 4096x4096,14336x4096 --m 1,8,16   # decode only
    python benchmarks/kernels.py --impls triton --m 1,8,16,128,512,2048 --write-routes realm_jax/linear/routes.json

Timing. On a GPU: device time, not dispatch: one jitted call multiplies x by every copy of the weight
(copies totalling at least 256 MiB, several times the L2 cache, so each is read from device memory), the
CUPTI profiler (`jax.experimental.mosaic.gpu.profiler.measure`) sums the kernels it launched, and the time
per product is that sum over the copies, median of `--runs` calls (where CUPTI is not there, the wall time
of that call after a warm-up, which adds only the executable's own launch gaps). The copy bandwidth is
measured the same way. On a CPU: a warm-up call, then `--reps` calls dispatched back to back and one sync,
median of `--runs` such batches, weights rotating through copies that exceed a 64 MiB last-level cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import pathlib
import platform
import statistics
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from realm_jax import linear, native  # noqa: E402
from realm_jax.bench import git_revision, write_report  # noqa: E402
from realm_jax.linear import routes  # noqa: E402
from realm_jax.precision import Policy  # noqa: E402
from realm_jax.quant import FORMATS, QTensor, dequantize, get_format  # noqa: E402

# (N, K): square 4096, the projections of an 8B llama (q/o, k/v, gate/up, down).
FULL_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
FULL_M = [1, 8, 16, 128, 512, 2048]
SMALL_SHAPES = [(1024, 1024), (1024, 4096)]
SMALL_M = [1, 16, 128]
DEFAULT_FORMATS = ["Q4_K", "Q5_K", "Q6_K", "Q8_K", "Q8_0"]
CACHE_BYTES = 64 << 20  # CPU: the copies of a weight exceed this last-level cache
GPU_BYTES = 256 << 20  # GPU: and this (several times an H100/H200's 50-60 MB L2)


def random_weight(fmt: str, n: int, k: int, key) -> QTensor:
    """Random planes generated on the device: uniform bits, small positive-and-negative scales."""
    f = get_format(fmt)
    planes = {}
    for i, p in enumerate(f.planes):
        shape, sub = (n, k // f.block_size * p.count), jax.random.fold_in(key, i)
        dt = jnp.dtype(p.dtype)
        if jnp.issubdtype(dt, jnp.floating):
            planes[p.name] = (0.02 * jax.random.normal(sub, shape, jnp.float32)).astype(dt)
        else:
            bits = jax.random.bits(sub, shape, jnp.uint32 if dt.itemsize == 4 else jnp.uint8)
            planes[p.name] = jax.lax.bitcast_convert_type(bits, dt) if dt.itemsize == 1 else bits.astype(dt)
    if fmt in ("Q4_K", "Q5_K"):  # 6-bit scales and mins
        planes["scales"], planes["mins"] = planes["scales"] & 63, planes["mins"] & 63
    return QTensor(fmt, (n, k), planes)


def weight_bytes(w: QTensor) -> int:
    return sum(int(np.prod(p.shape)) * jnp.dtype(p.dtype).itemsize for p in w.planes.values())


def time_call(fn, args_list, reps: int, runs: int) -> float:
    """Median seconds per call; `args_list` rotates through copies of the inputs."""
    jax.block_until_ready(fn(*args_list[0]))
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        out = [fn(*args_list[i % len(args_list)]) for i in range(reps)]
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / reps)
    return statistics.median(samples)


def device_seconds(fn, args_list, runs: int) -> float:
    """GPU: seconds of device work per fn(*args), args from args_list (distinct weights, more bytes than the
    L2 cache), all in one jitted call; CUPTI's kernel times where it is there (median over `runs` calls),
    else the call's wall time after a warm-up."""
    many = jax.jit(lambda argss: [fn(*a) for a in argss])
    try:
        from jax.experimental.mosaic.gpu import profiler

        try:
            _, times = profiler.measure(many, aggregate=True, iterations=runs)(args_list)
        except TypeError:  # older jax: one measurement a call, and a `mode`
            times = [profiler.measure(many, mode="cupti")(args_list)[1] for _ in range(runs)]
        times = times if isinstance(times, list) else [times]
        if all(t is not None for t in times):
            return statistics.median(times) / 1e3 / len(args_list)
    except (ImportError, RuntimeError) as e:
        print(f"  (CUPTI unavailable: {e}; timing the whole call)", file=sys.stderr)
    jax.block_until_ready(many(args_list))
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(many(args_list))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) / len(args_list)


def copy_bandwidth(nbytes: int, reps: int, runs: int) -> float:
    """Bytes per second of a device copy (bytes read + bytes written)."""
    x = jax.random.normal(jax.random.key(0), (nbytes // 4,), jnp.float32)
    fn = jax.jit(lambda a: -a)
    if jax.default_backend() == "gpu":
        return 2 * nbytes / device_seconds(fn, [(x,)], runs)
    return 2 * nbytes / time_call(fn, [(x,)], reps, runs)


def backends_for(platform_name: str) -> list[str]:
    """The registry's backends compiled for this platform (native where it builds), and on a CPU the
    platform's Pallas kernels in interpret mode."""
    names = [b.name for b in linear.BACKENDS.values() if b.name != linear.REFERENCE
             and platform_name in b.platforms and (b.name != "native" or native.available())]
    return names + ([linear.resolve("pallas", platform_name)] if platform_name == "cpu" else [])


def blocks_warps(warps: int):
    """x @ w^T on the block-dot GEMM with `warps` warps a program (the backend's matmul_path otherwise)."""
    from pallas_kernels import blockdot  # lazily, as the backend loads it

    def run(x, w):
        t = dataclasses.replace(blockdot.tiling_for(w.fmt, w.planes["q"].shape[-2], x.shape[1], x.shape[0]),
                                num_warps=warps)
        y = blockdot.gemm(x.astype(jnp.bfloat16), w.planes, fmt=w.fmt, layer=w.layer, tiling=t,
                          interpret=jax.default_backend() == "cpu")
        return y[:, : w.shape[0]].astype(jnp.bfloat16)

    return jax.jit(run)


def bench_shape(fmt, n, k, ms, *, backends, reps, runs, key, warps=()):
    plat = jax.default_backend()
    w0 = random_weight(fmt, n, k, key)
    wbytes = weight_bytes(w0)
    gpu = plat == "gpu"
    copies = max(1, min(16 if gpu else 8, -(-(GPU_BYTES if gpu else CACHE_BYTES) // wbytes)))
    ws = [w0] + [random_weight(fmt, n, k, jax.random.fold_in(key, 1000 + i)) for i in range(copies - 1)]
    # The dense peer: the weight dequantized to bf16 beforehand, through the same dot the XLA path uses
    # (weight on the left for few rows: XLA:CPU's one-row x @ W^T converts W to f32 on every call).
    dense = [QTensor("BF16", (n, k), {"w": dequantize(w, jnp.bfloat16)}) for w in ws]
    policy = Policy.of("bf16")
    prepared = {b: [linear.prepare(w, policy, impl=b) for w in ws] for b in backends
                if linear.choose(fmt, (n, k), b).backend == b}
    matmul = jax.jit(functools.partial(linear.matmul, compute_dtype=jnp.bfloat16, out_dtype=jnp.bfloat16))
    rows = []
    for m in ms:
        x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
        impls = {"xla": (matmul, [(x, w) for w in ws]), "dense_bf16": (matmul, [(x, d) for d in dense])}
        for b, weights in prepared.items():
            be = linear.BACKENDS[b]
            if not (gpu and be.paths):
                impls[b] = (matmul, [(x, w) for w in weights])
                continue
            for path in be.paths:
                if not be.serves(path, fmt, m):
                    continue  # e.g. the GEMV past 16 rows, or a format without one
                fn = jax.jit(functools.partial(be.matmul_path, path=path, compute_dtype=jnp.bfloat16,
                                               out_dtype=jnp.bfloat16))
                impls[f"{b}/{path}"] = (fn, [(x, w) for w in weights])
            if b == "triton_blocks" and m <= linear.BACKENDS[b].max_rows:
                impls.update({f"{b}:w{v}": (blocks_warps(v), [(x, w) for w in weights]) for v in warps})
        want = np.asarray(matmul(x, ws[0]), np.float32)  # the XLA path's product: each impl's error against it
        for name, (fn, args) in impls.items():
            seconds = device_seconds(fn, args, runs) if gpu else time_call(fn, args, reps, runs)
            base = name.partition(":")[0]
            interpret = base in prepared and plat not in linear.BACKENDS[base].platforms
            got = np.asarray(fn(*args[0]), np.float32)
            rows.append({"format": fmt, "m": m, "n": n, "k": k, "impl": name, "us": seconds * 1e6,
                         "weight_bytes": wbytes, "interpret": interpret,
                         "rel_err": float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))})
    return rows


def add_ratios(rows, copy_bps):
    dense = {(r["format"], r["m"], r["n"], r["k"]): r["us"] for r in rows if r["impl"] == "dense_bf16"}
    for r in rows:
        seconds = r["us"] * 1e-6
        r["weight_gbps"] = r["weight_bytes"] / seconds / 1e9
        r["pct_copy_bw"] = 100 * r["weight_bytes"] / seconds / copy_bps
        r["tflops"] = 2 * r["m"] * r["n"] * r["k"] / seconds / 1e12
        r["pct_dense_bf16"] = 100 * dense[(r["format"], r["m"], r["n"], r["k"])] / r["us"]


def measured_routes(rows) -> dict[str, dict[str, list[list]]]:
    """backend -> format -> [[M, the path fastest at M summed over the shapes timed], ...], from the
    BACKEND/PATH rows and the backends' own xla paths."""
    totals: dict = {}
    for r in rows:
        backend, _, path = r["impl"].partition("/")
        if path:
            key = (backend, r["format"], r["m"])
            totals.setdefault(key, {}).setdefault(path, []).append(r["us"])
    out: dict = {}
    for (backend, fmt, m), paths in sorted(totals.items()):
        shapes = max(len(t) for t in paths.values())
        timed = {p: sum(t) for p, t in paths.items() if len(t) == shapes}  # paths timed at every shape
        out.setdefault(backend, {}).setdefault(fmt, []).append([m, min(timed, key=timed.get)])
    return out


def write_routes(path: pathlib.Path, rows, meta) -> None:
    """Merge this run's measured routes for its device kind into the routes table at `path`."""
    paths = {b.name: b.paths for b in linear.BACKENDS.values() if b.paths}
    table = routes.validate(json.loads(path.read_text()), paths, str(path)) if path.exists() else {}
    measured = measured_routes(rows)
    entry = table.get(meta["device"], {"backends": {}})
    for backend, formats in measured.items():
        entry["backends"].setdefault(backend, {}).update(formats)
    entry["measured"] = {k: meta[k] for k in ("commit", "date", "jax", "command")}
    table[meta["device"]] = entry
    routes.validate(table, paths, str(path))
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"routes for {meta['device']} written to {path}")


def markdown(rows, meta) -> str:
    lines = [f"Device: {meta['device']} ({meta['platform']}); copy bandwidth {meta['copy_gbps']:.0f} GB/s; "
             f"jax {meta['jax']}; commit {meta['commit']}; {meta['date']}; `{meta['command']}`", "",
             "| format | M | N | K | impl | us | weight GB/s | % copy BW | TFLOP/s | % dense bf16 | "
             "max err / max XLA |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        impl = r["impl"] + (" (interpret)" if r["interpret"] else "")
        lines.append(f"| {r['format']} | {r['m']} | {r['n']} | {r['k']} | {impl} | {r['us']:.1f} | "
                     f"{r['weight_gbps']:.1f} | {r['pct_copy_bw']:.1f} | {r['tflops']:.3f} | "
                     f"{r['pct_dense_bf16']:.1f} | {r.get('rel_err', float('nan')):.1e} |")
    return "\n".join(lines) + "\n"



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="the full shape set (default on GPU/TPU)")
    ap.add_argument("--formats", default=",".join(DEFAULT_FORMATS))
    ap.add_argument("--m", help="rows of x, comma-separated (default: the set for the device)")
    ap.add_argument("--shapes", help="weight shapes NxK, comma-separated (default: the set for the device)")
    ap.add_argument("--impls", help="backends to time, comma-separated (default: every one for the platform); "
                                    "the xla and dense_bf16 peers are always timed")
    ap.add_argument("--reps", type=int, default=None, help="calls per timed batch")
    ap.add_argument("--runs", type=int, default=5, help="timed batches (the median is reported)")
    ap.add_argument("--json", type=pathlib.Path, help="write every row and the run's metadata here")
    ap.add_argument("--markdown", type=pathlib.Path, help="write the table here")
    ap.add_argument("--blocks-warps", default="", metavar="W[,W]",
                    help="also time the block-dot GEMM with W warps a program (e.g. 4: its wgmma design)")
    ap.add_argument("--write-routes", type=pathlib.Path, metavar="FILE",
                    help="merge the fastest path per format and M into this routes table (GPU)")
    args = ap.parse_args(argv)

    plat = jax.default_backend()
    interpret = plat == "cpu"
    full = args.full or not interpret
    shapes, ms = (FULL_SHAPES, FULL_M) if full else (SMALL_SHAPES, SMALL_M)
    try:
        ms = [int(v) for v in args.m.split(",")] if args.m else ms
        if args.shapes:
            shapes = [tuple(int(d) for d in v.lower().split("x")) for v in args.shapes.split(",")]
    except ValueError:
        ap.error(f"--m takes integers and --shapes NxK pairs, got --m {args.m!r} --shapes {args.shapes!r}")
    if any(m < 1 for m in ms) or any(len(s) != 2 or min(s) < 1 for s in shapes):
        ap.error("--m and --shapes take positive sizes")
    backends = backends_for(plat)
    if args.impls:
        wanted = [v.strip() for v in args.impls.split(",") if v.strip()]
        unknown = [v for v in wanted if v not in backends]
        if unknown:
            ap.error(f"--impls: {', '.join(unknown)} not among this platform's backends ({', '.join(backends)})")
        backends = wanted
    try:
        warps = [int(v) for v in args.blocks_warps.split(",") if v.strip()]
    except ValueError:
        ap.error(f"--blocks-warps takes integers, got {args.blocks_warps!r}")
    if any(w not in (1, 2, 4, 8) for w in warps):
        ap.error(f"--blocks-warps {args.blocks_warps}: each must be 1, 2, 4 or 8 warps a program")
    if warps and "triton_blocks" not in backends:
        ap.error("--blocks-warps times the triton_blocks backend's kernel (a GPU's): it is not among this run's "
                 f"backends ({', '.join(backends)})")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    quantized = [name for name, f in FORMATS.items() if f.block_size > 1]
    for fmt in formats:
        if fmt not in quantized:
            ap.error(f"--formats: {fmt!r} is not a quantized format; choose from {', '.join(quantized)}")
    reps = args.reps or (3 if interpret else 20)
    copy_bps = copy_bandwidth((256 if interpret else 1024) << 20, reps, args.runs)
    meta = {"device": jax.devices()[0].device_kind, "platform": plat, "jax": jax.__version__,
            "commit": git_revision(ROOT),
            "date": datetime.date.today().isoformat(), "host": platform.node(), "copy_gbps": copy_bps / 1e9,
            "command": "python benchmarks/kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"{meta['device']}: copy {copy_bps / 1e9:.1f} GB/s", flush=True)
    if args.write_routes and not (plat == "gpu" and any(linear.BACKENDS[b].paths for b in backends)):
        ap.error("--write-routes times the paths of a GPU backend that has several (triton): run it on a GPU")
    rows = []
    key = jax.random.key(0)
    for fmt in formats:
        for n, k in shapes:
            new = bench_shape(fmt, n, k, ms, backends=backends, reps=reps, warps=warps,
                              runs=args.runs, key=jax.random.fold_in(key, zlib.crc32(f"{fmt}{n}x{k}".encode())))
            add_ratios(new, copy_bps)
            rows += new
            print(f"  {fmt} {n}x{k} done", flush=True)
            if args.json:  # as it goes: a run cut short keeps what it measured
                pathlib.Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        if args.write_routes:  # a format's routes need all its shapes
            write_routes(args.write_routes, rows, meta)
    write_report(markdown(rows, meta), meta, rows, args.json, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
