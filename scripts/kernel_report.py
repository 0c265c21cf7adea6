"""The shape of each GPU decode kernel, without a GPU: what it compiles to, at an 8B llama's layer shapes.

For every format and rows of x it lowers the linear layer's GPU backends for an abstract H100 (the whole
path a model runs: the backend's wrapper and its kernels, as `realm_jax.linear` calls them) and reports:

- Triton (`triton` backend, the path its heuristic takes: `pallas_kernels.decode`, the GEMV, up to
  GEMV_ROWS rows of x, `pallas_kernels.lanesdot`, the block-dot GEMM on the lanes, from DOT_FROM to 16 rows
  where the format has it, and `pallas_kernels.mma`, the tensor-core GEMM, past them, `--rows 512` for its
  prefill tiles; and the
  `triton_blocks` backend's block-dot GEMM, `pallas_kernels.blockdot`, up to 16 rows of x): the
  Triton IR, after Triton's TTIR passes as the device runs them, compiled to a cubin by pip's
  `triton` (an optional extra: `pip install triton==3.9.0`; no GPU needed), then `ptxas -v` (registers,
  spills) and `cuobjdump -sass`: the CPU seconds of that compile, machine instructions per weight element
  in the K loop (or, where a program makes one step and the loop is unrolled away, in the whole program),
  128-bit loads, barriers, shuffles and shared-memory traffic; the programs in the grid against the 132
  SMs.
- Mosaic GPU (`mosaic_gpu` backend, the prefill GEMM; decode is Triton's): its PTX is made only on the
  device, so the lowered MLIR operations per K step (the ops in the pipeline's loop body) at 512 rows,
  against the committed baseline (`kernel_report_baseline.json`, `--write-baseline`), which may only go
  down; the programs in the grid.
- `--compiler xla`: the Triton rows from XLA's own compile instead (`scripts/gpu_aot.py`: JAX's CUDA plugin
  compiling for an H100 without a GPU, `make gpu-aot`), the compiler a device runs: its Triton and passes
  differ from pip's, and so do the counts (session 45: the block-dot GEMM 10-35% more instructions a
  weight, the lanes GEMM at 16 rows of x 2-3x more).
- Both: from `jax.make_jaxpr` of the backend's matmul, any array of at least a weight's size made per call
  outside the kernels (a transpose, a pad or a copy of the weight).
- The decode step of the synthetic Q4_K_M and Q5_K_M models on each GPU decode backend (`step_copies`:
  `forward` on one token a row, traced for an abstract H100): any array of at least a layer weight's size
  made from the weights outside the kernels, and any layer weight a `scan` cuts out of the stack a step
  (a copy wherever a kernel reads it, as XLA cannot fuse a slice into a custom call).

    python scripts/kernel_report.py [--formats Q4_K,Q6_K] [--rows 1,4,16] [--json out.json] [--markdown out.md]
                                    [--write-baseline] [--compiler triton|xla]

At full issue an H200 executes about 5 instructions per weight element while streaming Q4_K at 3.7 TB/s
(FACTS.md); a decode GEMV at the bandwidth limit needs about 1-2.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import re
import resource
import subprocess
import sys
import tempfile

# --compiler xla: JAX's CUDA plugin checks for CUDA libraries the deviceless compile does not need (gpu_aot.py)
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.extend import core as jex_core  # noqa: E402
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "scripts"))  # gpu_aot, for --compiler xla
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default of the triton the GPU machine has

from realm_jax import linear  # noqa: E402
from realm_jax.linear.base import Prepared  # noqa: E402
from realm_jax.precision import Policy  # noqa: E402
from realm_jax.quant import QTensor, get_format  # noqa: E402

SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))  # q/o, k/v, gate/up, down of an 8B llama
ROWS = (1, 4, 16)
PREFILL_ROWS = 512  # the Mosaic GPU GEMM's rows in the report
# Mosaic GPU MLIR ops per K step, per jax version (its lowering adds ops of its own: 0.12.1 +12 a K step,
# WGMMA descriptors and shared-memory views): only goes down (`baseline`)
BASELINE = ROOT / "scripts" / "kernel_report_baseline.json"
BASELINE_SLACK = 1.01  # for a jax version with no record of its own, against the nearest one's
SMS = 132
H100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=SMS,
                                                                 platform="gpu"))
BF16 = jnp.dtype(jnp.bfloat16)
_INS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")


def abstract_weight(backend: str, fmt: str, n: int, k: int):
    """The backend's prepared weight for an (n, k) weight of `fmt`, as shapes only."""
    f = get_format(fmt)
    planes = {p.name: jax.ShapeDtypeStruct((n, k // f.block_size * p.count), p.dtype) for p in f.planes}
    return jax.eval_shape(lambda qt: linear.BACKENDS[backend].prepare(qt, Policy.of("bf16")),
                          QTensor(fmt, (n, k), planes))


def _matmul(backend: str):
    be = linear.BACKENDS[backend]
    return lambda x, w: be.matmul(x, w, compute_dtype=BF16, out_dtype=BF16, interpret=False)


_KERNEL_PRIMITIVES = ("pallas_call", "mpmd_map")  # Pallas kernels; mpmd_map: Mosaic GPU's `plgpu.kernel`


def weight_copies(backend: str, fmt: str, m: int, n: int, k: int, fn=None) -> list[str]:
    """Equations outside the kernels that make, from the weight, an array holding at least as many bytes
    as its largest plane: a per-call copy of the weight (e.g. a transpose to another layout). What is made
    from x alone (its layout for a kernel) or past a kernel (partial products) is not counted. `fn(x, w)`:
    the path to trace (default: the backend's matmul)."""
    w = abstract_weight(backend, fmt, n, k)
    biggest = max(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(w))
    jaxpr = jax.make_jaxpr(fn or _matmul(backend))(jax.ShapeDtypeStruct((m, k), BF16), w)
    return copies_in(jaxpr.jaxpr, set(jaxpr.jaxpr.invars[1:]), biggest)  # x, then the weight's arrays


_VIEWS = ("reshape", "squeeze", "expand_dims", "bitcast_convert_type")  # row-major: the same bytes, no copy
_UPDATES = ("dynamic_update_slice", "scatter")  # their result is their first operand, updated in place


def copies_in(jaxpr, from_weight: set, threshold: int) -> list[str]:
    """Equations of `jaxpr` outside the kernels that make, from the variables in `from_weight` (and what is
    made from them), an array of at least `threshold` bytes; and what a `scan` slices from them per step
    (a layer's weight cut out of the stack: a copy wherever a kernel, not a fusion, reads it)."""
    found = []

    def walk(jp, from_weight: set):
        for eqn in jp.eqns:
            if eqn.primitive.name in _KERNEL_PRIMITIVES:
                continue
            inputs = [v in from_weight for v in eqn.invars if not isinstance(v, jex_core.Literal)]
            if not any(inputs):
                continue
            inners = [i for i in (getattr(p, "jaxpr", p) for p in eqn.params.values()) if hasattr(i, "eqns")]
            if eqn.primitive.name == "scan":  # its xs: [length, ...] outside, sliced a step (consts, carry: as is)
                for outer, inner in zip(eqn.invars, inners[0].invars):
                    sliced = outer.aval.shape == (eqn.params["length"], *inner.aval.shape)
                    if sliced and outer in from_weight and inner.aval.size * inner.aval.dtype.itemsize >= threshold:
                        found.append(f"scan slices {inner.aval.dtype}{list(inner.aval.shape)} a step")
            if inners:  # a call: its equations are counted, not its results (a kernel's, past a kernel)
                for inner in inners:  # its inputs are the equation's, in order (else all taken as the weight's)
                    same = len(inner.invars) == len(eqn.invars)
                    inside = {iv for iv, ov in zip(inner.invars, eqn.invars)
                              if not same or (not isinstance(ov, jex_core.Literal) and ov in from_weight)}
                    walk(inner, inside)
                    if len(inner.outvars) == len(eqn.outvars):
                        from_weight.update(ov for iv, ov in zip(inner.outvars, eqn.outvars)
                                           if not isinstance(iv, jex_core.Literal) and iv in inside)
                    else:
                        from_weight.update(eqn.outvars)
                continue
            if eqn.primitive.name in _UPDATES:  # in place: what counts is whether it updates a weight's array
                if eqn.invars[0] in from_weight:
                    from_weight.update(eqn.outvars)
                continue
            for v in eqn.outvars:  # what is smaller than a weight (a row of the embedding, a product) is not one
                if v.aval.size * v.aval.dtype.itemsize >= threshold:
                    from_weight.add(v)
                    if eqn.primitive.name not in _VIEWS:
                        found.append(f"{eqn.primitive.name} -> {v.aval.dtype}{list(v.aval.shape)}")

    walk(jaxpr, set(from_weight))
    return found


def as_gpu():
    """The linear backends choose their GPU code (kernels, not interpret mode) by the default backend: a
    GPU's, inside this."""
    from unittest import mock

    return mock.patch.object(jax, "default_backend", lambda: "gpu")


def decode_step(path: pathlib.Path, backend: str, policy: str = "bf16", batch: int = 1):
    """A model's decode step as a function and its abstract arguments: (fn, (params, cache, tokens,
    positions), config), `forward` on one new token a row of `batch`, a 256-token cache, the weights prepared
    for `backend` as `load` lays them out (call under `as_gpu`: on a GPU)."""
    from realm_jax import runtime
    from realm_jax.checkpoint import read_gguf
    from realm_jax.models import config_from_gguf
    from realm_jax.models.transformer import forward, init_cache

    metadata, tensors = read_gguf(path)
    config = config_from_gguf(metadata, tensors, str(path))
    pol = Policy.of(policy)
    params = jax.eval_shape(lambda: runtime.build_params(config, tensors, str(path), pol, impl=backend,
                                                         last_apart=True))
    cache = jax.eval_shape(lambda: init_cache(config, batch, 256, pol.kv))
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)

    def fn(p, c, t, pos):
        return forward(config, p, t, pos, c, policy=pol, impl=backend, last=jnp.zeros((batch,), jnp.int32))

    return fn, (params, cache, tokens, tokens), config


def step_copies(path: pathlib.Path, backend: str, policy: str = "bf16", batch: int = 1) -> list[str]:
    """A model's decode step (`forward` on one new token a row, the weights prepared for `backend` as `load`
    lays them out on a GPU), traced for an abstract H100: what `copies_in` finds made from the weights
    outside the kernels, at the size of the smallest of a layer's linear weights' largest planes; and,
    marked "cache:", from the KV cache at the size of a layer's keys (a layer's cache copied out of the
    stack for XLA's attention, where the kernel reads it in place; the writes are in place)."""
    with as_gpu(), use_abstract_mesh(H100):
        fn, (params, cache, *tokens), _ = decode_step(path, backend, policy, batch)
        jaxpr = jax.make_jaxpr(fn)(params, cache, *tokens)
    layers = [lin for run in params["layers"] for lin in run.params.values() if isinstance(lin, Prepared)]
    threshold = min(max(leaf.size // leaf.shape[0] * leaf.dtype.itemsize for leaf in jax.tree.leaves(lin))
                    for lin in layers)
    n_params, n_cache = len(jax.tree.leaves(params)), len(jax.tree.leaves(cache))
    invars = jaxpr.jaxpr.invars
    per_layer = min(leaf.size // leaf.shape[0] * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))
    return (copies_in(jaxpr.jaxpr, set(invars[:n_params]), threshold)
            + [f"cache: {c}" for c in copies_in(jaxpr.jaxpr, set(invars[n_params:n_params + n_cache]), per_layer)])


# --- Triton: Triton IR -> cubin -> SASS ----------------------------------------------------------------
def capture_triton(fn, *args) -> list[dict]:
    """The Triton modules `fn(*args)` lowers to for an abstract H100: [{ttir, grid, num_warps, num_stages}]."""
    from jax._src.pallas.triton import pallas_call_registration as reg

    got, orig = [], reg.lowering.lower_jaxpr_to_triton_module

    def capture(*a, **kw):
        result = orig(*a, **kw)
        got.append((result.module.operation.get_asm(), tuple(result.grid)))
        return result

    reg.lowering.lower_jaxpr_to_triton_module = capture
    try:
        with use_abstract_mesh(H100):
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = orig
    warps = [int(v) for v in re.findall(r"num_warps = (\d+) : i32", text)]
    stages = [int(v) for v in re.findall(r"num_stages = (\d+) : i32", text)]
    return [{"ttir": ttir, "grid": grid, "num_warps": w, "num_stages": s, "source": (fn, args),
             "name": re.search(r"tt\.func public @(\w+)", ttir).group(1)}
            for (ttir, grid), w, s in zip(got, warps, stages)]


_OP = re.compile(r"^\s*(?:%[\w#:]+(?:, %[\w#:]+)* = )?\"?[a-z_]+\.[a-z_.]+", re.M)


def ttir_ops(ttir: str) -> int:
    """Operations in a captured Triton module, before Triton's passes: the size the compile starts from
    (unrolled code shows here first: Q4_K's unrolled groups took 4x the ops and ~15x the compile time)."""
    return len(_OP.findall(ttir))


def make_ttir(path: pathlib.Path) -> str:
    """The captured module after Triton's TTIR passes (canonicalize, combine: e.g. `acc + dot(a, b)` becomes
    a dot accumulating into acc), which the device's compile runs on Pallas's module and `triton.compile`
    skips for an IR file."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler.compiler import make_backend

    context = ir.context()
    ir.load_dialects(context)
    make_backend(GPUTarget("cuda", 90, 32)).load_dialects(context)
    module = ir.parse_mlir_module(str(path), context)
    module.context = context  # make_ttir builds its pass manager from mod.context, which only Triton's loader sets
    CUDABackend.make_ttir(module, {}, None, 90)
    return str(module)


def compile_triton(kernel: dict, workdir: pathlib.Path) -> dict:
    """Registers, spills and SASS of a captured Triton module, compiled for sm_90 by pip's triton."""
    import triton
    from triton.backends.compiler import GPUTarget

    bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    src = workdir / "kernel.ttir"
    src.write_text(kernel["ttir"])
    src.write_text(make_ttir(src))
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=workdir)  # compile it, not a cached copy
    start = resource.getrusage(resource.RUSAGE_SELF)
    compiled = triton.compile(str(src), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": kernel["num_warps"], "num_stages": kernel["num_stages"]})
    end = resource.getrusage(resource.RUSAGE_SELF)
    seconds = end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime  # CPU: this machine may be shared
    (workdir / "kernel.ptx").write_text(compiled.asm["ptx"])
    cubin = workdir / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    return cubin_figures(cubin, str(bin_dir / "cuobjdump")) | {"compile_s": seconds}


def cubin_figures(cubin: pathlib.Path, cuobjdump: str) -> dict:
    """Registers, spill bytes and SASS of a cubin. From the cubin itself (a separate `ptxas -v` of the PTX,
    without the compiler's own ptxas flags, allocates differently: it read 0 spill bytes where Triton's cubin
    had a 64-byte stack of spills). A Triton kernel has no local arrays: its stack frame is spilled registers."""
    usage = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump -res-usage {cubin}: no resource line in {usage!r}")
    regs, stack, local = map(int, found.groups())
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True).stdout
    return {"registers": regs, "spill_bytes": stack + local, "sass": sass}


def sass_body(sass: str, trips: int = 1) -> tuple[str, list[str]]:
    """The instructions one K step executes: the outermost loop (a backward branch), or the whole program
    where the K loop was unrolled away (one step per program); a loop inside it (the loop over a unit's
    groups of activation blocks, `trips` times) counted `trips` times."""
    ins = [(int(a, 16), op, rest) for a, op, rest in _INS.findall(sass)]
    spans = []  # (first, last) instruction index of each loop
    for i, (addr, op, rest) in enumerate(ins):
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            first = next(j for j, (a, _, _) in enumerate(ins) if a >= int(target.group(1), 16))
            if i - first > 8:
                spans.append((first, i))

    def inside(a, b):
        return a != b and b[0] <= a[0] and a[1] <= b[1]

    outer = [sp for sp in spans if not any(inside(sp, o) for o in spans)]
    nested = [sp for sp in spans if any(inside(sp, o) for o in spans)]
    if nested or (outer and trips == 1):  # the step loop, with any loop inside it
        step = max(outer, key=lambda sp: sp[1] - sp[0])
        inner = [sp for sp in nested if inside(sp, step)]
        scope, (lo, hi) = "loop", step
    else:  # one step a program: the whole program, its loop (over the groups) counted `trips` times
        scope, (lo, hi), inner = "program", (0, len(ins) - 1), outer
    ops = [op for _, op, _ in ins[lo : hi + 1]]
    for a, b in inner:
        ops += [op for _, op, _ in ins[a : b + 1]] * (trips - 1)
    return scope, ops


def compile_xla(kernel: dict, workdir: pathlib.Path) -> dict:
    """`compile_triton`'s figures from the compile a device makes: XLA's own (its Triton, then ptxas), for an
    H100 without a GPU (`scripts/gpu_aot.py`; JAX's CUDA plugin: `make gpu-aot`). The kernel's program (the
    path captured) compiles whole; this kernel's PTX is taken from XLA's dump."""
    import gpu_aot

    fn, args = kernel["source"]
    dump = pathlib.Path(tempfile.mkdtemp(dir=workdir))
    start = resource.getrusage(resource.RUSAGE_SELF)
    with as_gpu():
        gpu_aot.compile_for(kernel["name"], fn, *args, dump_to=dump)
    end = resource.getrusage(resource.RUSAGE_SELF)
    seconds = end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime  # the whole program's compile
    cubin = workdir / "kernel.cubin"
    subprocess.run([gpu_aot.ptxas(), "-arch=sm_90a", str(gpu_aot.ptx_of(dump, kernel["name"])), "-o", str(cubin)],
                   check=True, capture_output=True)
    return cubin_figures(cubin, gpu_aot.cuobjdump()) | {"compile_s": seconds}


COMPILERS = {"triton": compile_triton, "xla": compile_xla}
COMPILER = "triton"  # `--compiler`: pip's triton on the captured IR, or XLA's own compile (the device's)


def _sass_cost(kernel: dict, workdir: pathlib.Path, weights_per_step: int, weights_per_program: int,
               trips: int) -> dict:
    compiled = COMPILERS[COMPILER](kernel, workdir)
    scope, body = sass_body(compiled["sass"], trips)
    threads = 32 * kernel["num_warps"]
    ops = collections.Counter(op.split(".")[0] for op in body)
    weights = weights_per_step if scope == "loop" else weights_per_program
    shapes = [re.search(r"\.(\d+)x(\d+)x(\d+)", op) for op in body if op.startswith("HGMMA")]
    wgmma_macs = sum(int(g[1]) * int(g[2]) * int(g[3]) for g in shapes if g)  # one a warpgroup (4 warps)
    return {"registers": compiled["registers"], "spill_bytes": compiled["spill_bytes"], "scope": scope,
            "wgmma_macs": wgmma_macs,
            "compile_s": compiled["compile_s"], "dp2a": ops["IDP"] * threads / weights,
            "per_weight": len(body) * threads / weights, "ops": ops,
            "ldg128": sum(op.startswith("LDG.E.128") for op in body) * threads / weights}


def triton_row(fmt: str, m: int, n: int, k: int, workdir: pathlib.Path) -> dict:
    """The Triton decode kernel as the backend runs it (its grid, registers, spills, and the instructions per
    weight of a whole program, prologue and epilogue included), and the instructions per weight of its K
    loop, from the same kernel tiled with fewer K splits (so that a program makes several steps)."""
    from pallas_kernels import decode
    from pallas_kernels.decode_layout import LAYOUTS, quantize_x

    lay = LAYOUTS[fmt]
    units = k // lay.unit
    w = abstract_weight("triton", fmt, n, k)
    (kernel,) = capture_triton(_matmul("triton"), jax.ShapeDtypeStruct((m, k), BF16), w)
    t = decode.tiling_for(fmt, m, n, k)
    per_unit = t.rows * lay.unit // t.parts
    trips = max(1, 4 // t.parts) if lay.unit == 256 else 1  # the kernel's loop over a unit's groups
    program = _sass_cost(kernel, workdir, per_unit * t.units, per_unit * units // t.splits, trips)
    # ~4 steps a program (the K splits a unit count divides into), or all the units in one program
    fewer = [d for d in decode._pow2_divisors(units // t.units) if d <= t.splits // 4]
    looped = dataclasses.replace(t, splits=max(fewer, default=1))
    x = jax.ShapeDtypeStruct((m, k), BF16)
    (loop_kernel,) = capture_triton(
        lambda x, w: decode.gemv(*quantize_x(x, fmt), w.lanes, fmt=fmt, tiling=looped), x, w)
    loop = _sass_cost(loop_kernel, workdir, per_unit * t.units, per_unit * units // looped.splits, trips)
    rows_x = min(1 << max(m - 1, 0).bit_length(), decode.chunk_rows(fmt))
    for cost in (program, loop):  # two dp2a per code word of four weights, for each row of x: else miscounted
        if abs(cost["dp2a"] - 0.5 * rows_x) > 0.01:
            raise RuntimeError(f"{fmt} M={m} {n}x{k}: {cost['dp2a']:.3f} dp2a a weight counted in the "
                               f"{cost['scope']}, not {0.5 * rows_x}: the loop structure was misread")
    grid = kernel["grid"]
    programs = grid[0] * grid[1] * (grid[2] if len(grid) > 2 else 1)
    chunks = programs // (n // t.rows * t.splits * t.parts)  # each chunk of rows of x reads the weight again
    return {
        "kernel": "triton", "format": fmt, "m": m, "n": n, "k": k, "programs": programs,
        "ttir_ops": ttir_ops(kernel["ttir"]),
        "registers": program["registers"], "spill_bytes": program["spill_bytes"],
        "compile_s": round(program["compile_s"], 2),  # CPU s, TTIR to cubin here (the device's compile differs)
        "loop_registers": loop["registers"], "loop_spill_bytes": loop["spill_bytes"],
        # the cost of all M rows: every chunk of rows of x is a program of its own
        "instructions_per_weight": round(loop["per_weight"] * chunks, 3) if loop["scope"] == "loop" else None,
        "program_instructions_per_weight": round(program["per_weight"] * chunks, 3),
        "rows_per_program": rows_x,
        "ldg128_per_weight": round(loop["ldg128"], 4),
        "barriers": program["ops"]["BAR"], "shuffles": program["ops"]["SHFL"],
        "shared": sum(program["ops"][o] for o in ("STS", "LDS", "LDSM")),
        "weight_copies": weight_copies("triton", fmt, m, n, k),
    }


# --- Mosaic GPU: MLIR operations per K step -------------------------------------------------------------
def mma_row(fmt: str, m: int, n: int, k: int, workdir: pathlib.Path) -> dict:
    """The Triton tensor-core GEMM (`pallas_kernels.mma`: the backend's "mma" path, which it takes past
    GEMV_ROWS rows of x, and for prefill rows where the routes table says so) as the backend runs it, and
    the instructions per weight of its K loop (one chunk of K a step: the cost is the dequantization's, once
    per tile of x, so all the rows of x cost it times the tiles), from the same kernel with fewer K splits
    where the backend's tiling leaves one chunk a program."""
    from pallas_kernels import mma
    from realm_jax.linear.triton import multiply

    w = abstract_weight("triton", fmt, n, k)
    x = jax.ShapeDtypeStruct((m, k), BF16)
    path = lambda x, w: multiply(x, w, "mma", compute_dtype=BF16, interpret=False)  # noqa: E731
    (kernel,) = capture_triton(path, x, w)
    t = mma.tiling_for(fmt, n, k, m)
    chunk = mma.chunk_size(fmt, k)
    chunks = k // chunk
    program = _sass_cost(kernel, workdir, chunk * t.rows, chunk * t.rows * chunks // t.splits, 1)
    looped = dataclasses.replace(t, splits=max(1, t.splits // 4) if chunks // t.splits < 2 else t.splits)
    (loop_kernel,) = capture_triton(
        lambda x, w: mma.gemm(x, w.lanes, fmt=fmt, tiling=looped), x, w)
    loop = _sass_cost(loop_kernel, workdir, chunk * t.rows, chunk * t.rows * chunks // looped.splits, 1)
    hmma = (loop["ops"]["HMMA"] * loop_kernel["num_warps"] * 16 * 8 * 16  # MACs: m16n8k16, one a warp
            + loop["wgmma_macs"] * loop_kernel["num_warps"] // 4)  # wgmma (64 rows of x): one a warpgroup
    # a short K loop may be unrolled by Triton's passes: then the whole program is the unit counted
    steps = 1 if loop["scope"] == "loop" else chunks // looped.splits
    if hmma != t.x_rows * t.rows * chunk * steps:
        raise RuntimeError(f"{fmt} M={m} {n}x{k}: {loop['ops']['HMMA']} HMMA counted in the {loop['scope']}, not "
                           f"{steps} [{t.x_rows}, {chunk}] x [{chunk}, {t.rows}] products: the loop was misread")
    grid = kernel["grid"]
    tiles = grid[0]  # tiles of x: each dequantizes the weight again
    return {
        "kernel": "triton_mma", "format": fmt, "m": m, "n": n, "k": k, "programs": grid[0] * grid[1] * grid[2],
        "ttir_ops": ttir_ops(kernel["ttir"]),
        "registers": program["registers"], "spill_bytes": program["spill_bytes"],
        "compile_s": round(program["compile_s"], 2),
        "loop_registers": loop["registers"], "loop_spill_bytes": loop["spill_bytes"],
        "instructions_per_weight": round(loop["per_weight"] * tiles, 3),
        "program_instructions_per_weight": round(program["per_weight"] * tiles, 3),
        "rows_per_program": t.x_rows,
        "ldg128_per_weight": round(loop["ldg128"], 4),
        "barriers": program["ops"]["BAR"], "shuffles": program["ops"]["SHFL"],
        "shared": sum(program["ops"][o] for o in ("STS", "LDS", "LDSM")),
        "weight_copies": weight_copies("triton", fmt, m, n, k, path),
    }


def blocks_row(fmt: str, m: int, n: int, k: int, workdir: pathlib.Path) -> dict:
    """The block-dot decode GEMM (`pallas_kernels.blockdot`: the `triton_blocks` backend, up to MAX_ROWS rows
    of x) as the backend runs it, and the instructions per weight of its K loop (a step of 256 elements),
    from the same kernel with fewer K splits where the backend's tiling leaves one step a program."""
    from pallas_kernels import blockdot

    w = abstract_weight("triton_blocks", fmt, n, k)
    x = jax.ShapeDtypeStruct((m, k), BF16)
    (kernel,) = capture_triton(_matmul("triton_blocks"), x, w)
    t = blockdot.tiling_for(fmt, n, k, m)
    steps = k // blockdot.STEP
    per_step = t.rows * blockdot.STEP
    program = _sass_cost(kernel, workdir, per_step, per_step * steps // t.splits, 1)
    fewer = max(s for s in range(1, max(1, t.splits // 4) + 1) if steps % s == 0)  # a divisor of the steps
    looped = dataclasses.replace(t, splits=fewer if steps // t.splits < 2 else t.splits)
    (loop_kernel,) = capture_triton(lambda x, w: blockdot.gemm(x, w.planes, fmt=fmt, tiling=looped), x, w)
    loop = _sass_cost(loop_kernel, workdir, per_step, per_step * steps // looped.splits, 1)
    counted = 1 if loop["scope"] == "loop" else steps // looped.splits
    step_k = blockdot.STEP + blockdot.OFFSET_K[fmt]  # the blocks' dots, and the step's offset dots
    return _dot_row("triton_blocks", fmt, m, n, k, kernel, program, loop, loop_kernel, t, counted, step_k,
                    weight_copies("triton_blocks", fmt, m, n, k))


def _dot_row(name: str, fmt: str, m: int, n: int, k: int, kernel, program, loop, loop_kernel, t, counted: int,
             step_k: int, copies: list[str]) -> dict:
    """The report's row of a block-dot GEMM (`blocks_row`, `lanesdot_row`: two warps' `mma.sync`, a K step of
    step_k MACs a weight row and row of x, `counted` steps in the loop measured), checked against the HMMAs
    the loop holds."""
    macs = (loop["ops"]["HMMA"] * loop_kernel["num_warps"] * 16 * 8 * 16  # mma.sync m16n8k16: one a warp
            + loop["wgmma_macs"] * loop_kernel["num_warps"] // 4)  # wgmma: one a warpgroup
    if macs != t.x_rows * t.rows * step_k * counted:
        raise RuntimeError(f"{fmt} M={m} {n}x{k}: {macs} MACs counted in the {loop['scope']}, "
                           f"not {counted} steps of [{t.rows}, {step_k}] x [{step_k}, {t.x_rows}]: the loop was "
                           f"misread")
    grid = kernel["grid"]
    return {
        "kernel": name, "format": fmt, "m": m, "n": n, "k": k, "programs": grid[0] * grid[1],
        "ttir_ops": ttir_ops(kernel["ttir"]),
        "registers": program["registers"], "spill_bytes": program["spill_bytes"],
        "compile_s": round(program["compile_s"], 2),
        "loop_registers": loop["registers"], "loop_spill_bytes": loop["spill_bytes"],
        "instructions_per_weight": round(loop["per_weight"], 3),
        "program_instructions_per_weight": round(program["per_weight"], 3),
        "rows_per_program": t.x_rows,
        "ldg128_per_weight": round(loop["ldg128"], 4),
        "barriers": program["ops"]["BAR"], "shuffles": program["ops"]["SHFL"],
        "shared": sum(program["ops"][o] for o in ("STS", "LDS", "LDSM")),
        "weight_copies": copies,
    }


def lanesdot_row(fmt: str, m: int, n: int, k: int, workdir: pathlib.Path) -> dict:
    """The block-dot GEMM on the lanes (`pallas_kernels.lanesdot`: the `triton` backend's "dot" path) as the
    backend runs it, and the instructions per weight of its K loop (a unit of 256 elements a step), from the
    same kernel with fewer K splits where the backend's tiling leaves one unit a program."""
    from pallas_kernels import lanesdot

    w = abstract_weight("triton", fmt, n, k)
    x = jax.ShapeDtypeStruct((m, k), BF16)
    gemm = lambda x, w, t=None: lanesdot.gemm(x, w.lanes, fmt=fmt, tiling=t)  # noqa: E731
    (kernel,) = capture_triton(gemm, x, w)
    t = lanesdot.tiling_for(fmt, n, k, m)
    steps = k // 256
    per_step = t.rows * 256
    trips = 4 if fmt in lanesdot.LOOP_CHUNKS else 1  # the loop over a unit's four chunks
    program = _sass_cost(kernel, workdir, per_step, per_step * steps // t.splits, trips)
    # a divisor of the units that leaves a loop of four units or more (of two, with a loop inside, Triton
    # may unroll the outer one)
    looped = dataclasses.replace(t, splits=max(s for s in range(1, max(1, t.splits // 4) + 1) if steps % s == 0))
    (loop_kernel,) = capture_triton(lambda x, w: gemm(x, w, looped), x, w)
    loop = _sass_cost(loop_kernel, workdir, per_step, per_step * steps // looped.splits, trips)
    counted = 1 if loop["scope"] == "loop" else steps // looped.splits
    return _dot_row("triton_dot", fmt, m, n, k, kernel, program, loop, loop_kernel, t, counted, lanesdot.DOT_K[fmt],
                    weight_copies("triton", fmt, m, n, k, lambda x, w: gemm(x, w)))


def decode_row(fmt: str, m: int, n: int, k: int, workdir: pathlib.Path) -> dict:
    """The Triton kernel the backend takes for m rows of x without a measured route: the GEMV, the block-dot
    GEMM on the lanes or the tensor-core GEMM (past DECODE_ROWS its prefill tiles, which the backend takes
    where measured faster)."""
    from realm_jax.linear.triton import TRITON

    path = TRITON.path(fmt, m, BF16, device_kind="none")  # the heuristic's, whatever this machine is
    return {"gemv": triton_row, "dot": lanesdot_row}.get(path, mma_row)(fmt, m, n, k, workdir)


def capture_mosaic(fn, *args) -> list[str]:
    from jax._src.pallas.mosaic_gpu import lowering

    got, orig = [], lowering.lower_jaxpr_to_module

    def capture(*a, **kw):
        result = orig(*a, **kw)
        got.append(str(result.module))
        return result

    lowering.lower_jaxpr_to_module = capture
    try:
        with use_abstract_mesh(H100):
            jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        lowering.lower_jaxpr_to_module = orig
    return got


def _loop_bodies(mlir: str) -> list[int]:
    """The op count of every scf.for body in a module's text (nested bodies counted in their parent)."""
    counts, stack = [], []
    for line in mlir.splitlines():
        s = line.strip()
        if stack and re.match(r"^(%[\w#:, ]+ = )?[\w.]+[ (<{\"]", s) and not s.startswith("}"):
            stack[-1] += 1
        if re.search(r"\bscf\.for\b", s) and s.endswith("{"):
            stack.append(0)
        elif s.startswith("}") and stack and re.match(r"^\}(\s|$)", s):
            counts.append(stack.pop())
    return counts


def mosaic_row(fmt: str, m: int, n: int, k: int) -> dict:
    """The Mosaic GPU prefill GEMM (the `mosaic_gpu` backend past the decode rows): MLIR ops per K step."""
    from pallas_kernels.mosaic_gpu import tiling_for

    w = abstract_weight("mosaic_gpu", fmt, n, k)
    modules = capture_mosaic(_matmul("mosaic_gpu"), jax.ShapeDtypeStruct((m, k), BF16), w)
    t = tiling_for(fmt, m, n, k, BF16)  # as `_matmul` calls it: bf16 out
    bodies = [c for mod in modules for c in _loop_bodies(mod)]
    per_step = max(bodies) if bodies else 0
    tiles = -(-n // (t.block_n * t.compute_wgs)) * -(-m // t.block_m)
    return {"kernel": "mosaic_gpu", "format": fmt, "m": m, "n": n, "k": k,
            "programs": min(SMS, tiles), "tiles": tiles, "compute_wgs": t.compute_wgs, "block_m": t.block_m,
            "mlir_ops_per_k_step": per_step, "mlir_ops_per_weight": round(per_step / (t.block_n * t.block_k), 4),
            "weight_copies": weight_copies("mosaic_gpu", fmt, m, n, k)}


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v))


def baseline(version: str | None = None) -> tuple[dict[str, int], float, str]:
    """(the Mosaic GPU ops a K step no kernel may exceed, the slack allowed, the jax version they were recorded
    under) for jax `version` (default: this one): its own record, exactly; else the newest record not newer
    than it (the oldest where all are), within BASELINE_SLACK."""
    version = version or jax.__version__
    records = json.loads(BASELINE.read_text()) if BASELINE.exists() else {}
    if version in records:
        return records[version], 1.0, version
    if not records:
        return {}, 1.0, version
    older = [v for v in records if _version(v) <= _version(version)]
    nearest = max(older, key=_version) if older else min(records, key=_version)
    return records[nearest], BASELINE_SLACK, nearest


def report(formats, rows, shapes=SHAPES, *, mosaic: bool = True) -> list[dict]:
    """The Triton kernels for every format, rows of x and shape (the GEMV, or the tensor-core GEMM past
    GEMV_ROWS rows; the `triton_blocks` backend's block-dot GEMM where it takes the format and rows); the
    Mosaic GPU GEMM at PREFILL_ROWS rows and the first shape."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in formats:
            for m in rows:
                for n, k in shapes:
                    if linear.choose(fmt, (n, k), "triton").backend == "triton":
                        out.append(decode_row(fmt, m, n, k, pathlib.Path(tmp)))
                    blocks = linear.BACKENDS["triton_blocks"]
                    if linear.choose(fmt, (n, k), blocks.name).backend == blocks.name and m <= blocks.max_rows:
                        out.append(blocks_row(fmt, m, n, k, pathlib.Path(tmp)))
                print(f"  {fmt} M={m} done", file=sys.stderr, flush=True)
            if mosaic and linear.choose(fmt, shapes[0], "mosaic_gpu").backend == "mosaic_gpu":
                out.append(mosaic_row(fmt, PREFILL_ROWS, *shapes[0]))
    return out


STEP_MODELS = (ROOT / "tests" / "data" / "synthetic" / "llama-k-q4_k_m.gguf",
               ROOT / "tests" / "data" / "synthetic" / "llama-k-q5_k_m.gguf")
STEP_BACKENDS = ("triton", "triton_blocks")  # the GPU decode backends (Mosaic GPU's kernels are prefill's)


def step_rows(models=STEP_MODELS) -> list[dict]:
    """`step_copies` of each decode backend on each model (every format of a Q4_K_M and a Q5_K_M file)."""
    return [{"kernel": "decode_step", "backend": backend, "model": path.name,
             "weight_copies": step_copies(path, backend)} for path in models for backend in STEP_BACKENDS]


def markdown(rows: list[dict]) -> str:
    steps = [r for r in rows if r["kernel"] == "decode_step"]
    rows = [r for r in rows if r["kernel"] != "decode_step"]
    lines = ["| kernel | format | M | N x K | programs | regs | spill B | instr / weight: K loop (program) | "
             "LDG.128 / weight | bar / shfl / smem | compile s | MLIR ops (Triton: TTIR; Mosaic: a K step) | "
             "weight copies per call |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        copies = "; ".join(r["weight_copies"]) or "none"
        if r["kernel"] in ("triton", "triton_dot", "triton_mma", "triton_blocks"):
            lines.append(f"| {r['kernel']} | {r['format']} | {r['m']} | {r['n']}x{r['k']} | {r['programs']} | "
                         f"{r['registers']} | {r['spill_bytes']} | {r['instructions_per_weight']} "
                         f"({r['program_instructions_per_weight']}) | {r['ldg128_per_weight']} | {r['barriers']} / "
                         f"{r['shuffles']} / {r['shared']} | {r['compile_s']} | {r['ttir_ops']} | {copies} |")
        else:
            lines.append(f"| mosaic_gpu | {r['format']} | {r['m']} | {r['n']}x{r['k']} | {r['programs']} | - | - | - | "
                         f"- | - | - | {r['mlir_ops_per_k_step']} | {copies} |")
    if steps:
        lines += ["", "| decode step (`forward`, one token a row) | backend | weight copies per step |",
                  "|---|---|---|"]
        lines += [f"| {r['model']} | {r['backend']} | {'; '.join(r['weight_copies']) or 'none'} |" for r in steps]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from pallas_kernels.decode_layout import LAYOUTS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", default=",".join(LAYOUTS))
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="rows of x (M), comma-separated")
    ap.add_argument("--json", type=pathlib.Path)
    ap.add_argument("--markdown", type=pathlib.Path)
    ap.add_argument("--write-baseline", action="store_true",
                    help=f"record the Mosaic GPU ops in {BASELINE.name}, under this jax version")
    ap.add_argument("--compiler", choices=sorted(COMPILERS), default="triton",
                    help="what compiles the Triton kernels: pip's triton on the captured IR (default), or XLA's "
                         "own compile for an H100, as a device compiles them (needs JAX's CUDA plugin: make gpu-aot, "
                         "then run this with .venv-gpu-aot/bin/python)")
    args = ap.parse_args(argv)
    global COMPILER
    COMPILER = args.compiler
    if COMPILER == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            ap.error("needs pip's triton (no GPU needed): pip install triton==3.9.0")
    else:
        import gpu_aot

        try:
            gpu_aot.device()
        except Exception as e:  # no plugin, or one that cannot make the device
            ap.error(f"--compiler xla needs JAX's CUDA plugin (make gpu-aot): {str(e).splitlines()[0]}")
    rows = report([f for f in args.formats.split(",") if f], [int(v) for v in args.rows.split(",")]) + step_rows()
    table = markdown(rows)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    mosaic = {f"{r['format']} {r['m']}x{r['n']}x{r['k']}": r["mlir_ops_per_k_step"] for r in rows
              if r["kernel"] == "mosaic_gpu"}
    if args.write_baseline:
        records = json.loads(BASELINE.read_text()) if BASELINE.exists() else {}
        records[jax.__version__] = records.get(jax.__version__, {}) | mosaic
        BASELINE.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    else:
        base, slack, recorded = baseline()
        worse = {key: (ops, base[key]) for key, ops in mosaic.items() if key in base and ops > base[key] * slack}
        if worse:
            print(f"Mosaic GPU MLIR ops per K step above the baseline (jax {recorded}, x{slack}): {worse}",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
