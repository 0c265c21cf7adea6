"""The prefill kernel for Hopper through Mosaic GPU (`plgpu.kernel` + `plgpu.emit_pipeline_warp_specialized`).

`gemm_lanes`: y = x @ dequant(w)^T for the formats of `FORMATS`, from the weight's lane planes as laid out
at load for every GPU kernel (`pallas_kernels.decode_layout`: [K / unit, P, N'], K-major, rows padded to
128), f16/bf16 operands on the tensor cores (`plgpu.wgmma`) with f32 accumulators; the dequantized tile is
stored in shared memory as the wgmma B operand. `gemm` takes a QTensor as stored (its lanes made for the
call). (Decode is the Triton kernels': `pallas_kernels.decode`, `pallas_kernels.mma`. The FMA GEMV this
module had for decode was slower than XLA's dequantize+dot on an H200 at every shape timed, 182-215 us
against 127-140 at M=1 (FACTS.md), copied every plane per call and took 14-42 s to compile: removed.)

Shapes: M rows of x, N rows of w (outputs), K the contraction.

The structure (the dense and mixed-type Hopper matmuls of jax's `pallas/ops/gpu` are the models):
- a persistent grid: one CTA per SM (`num_sms`), each looping over output tiles [block_m, block_n *
  compute_wgs], M minor, so that the CTAs at work at once share few weight tiles (read from HBM once, into
  L2);
- warp specialization: in each CTA one warpgroup only issues the TMA copies of x and the lanes,
  `max_concurrent_steps` steps ahead, and one or two compute warpgroups each dequantize their block_n rows
  of the weight (one row a thread), store them as the wgmma B operand and multiply them by the CTA's rows
  of x (the x tile is shared; the dequantized tile serves all block_m rows);
- no wait for the tensor cores each step: each compute warpgroup has two dequantized tiles, so step s+1
  dequantizes into one while step s's wgmma reads the other; it waits for a wgmma one step later, and
  the pipeline releases the inputs that wgmma read then (`delay_release=1`);
- the output in out_dtype, rounded once from the f32 accumulators and copied out by TMA from shared memory
  (an f32 [M, N] written and read again to cast it is ~235 MB more traffic at 2048 x 14336, 10-15% of the
  dot's time at 75% of dense).
`tiling_for` picks the warpgroups, tiles and rows of x per tile by shared memory and by how well the output
tiles fill the SMs' waves.

How the one definition of the math is kept. The dequantization is `pallas_kernels.mma`'s, the Triton
GEMM's own (its format functions: code words, masks and scales on the lanes, the tile in the order
`mma.permute_x` gives x's columns). Mosaic GPU's register layouts cannot express its reshapes and
broadcasts (a strided layout broadcasts only leading dims; a tiled layout reshapes only its major dims and
broadcasts only into the rank-2 WGMMA/TCGEN05 layouts). So the kernel gives each thread one row of the
weight and evaluates the jaxpr of a step's dequantization element by element: every element of a row's
tile becomes a [block_n] vector across rows (`_rowwise`). Reshapes, broadcasts and iota constants of the
jaxpr act on the element grid at trace time; only the arithmetic is emitted, on vectors. The lanes are
K-major already, so one word of a unit is a contiguous row of shared memory (the planes were transposed
per call before: a copy of the weight, and 18-34% more MLIR operations a step than now).

Layouts: `_row_layout` gives each thread rows of the tile (one weight row per thread at block_n=128). A
step's planes come in one load each ([units, P, block_n]: the leading dims are the registers' own), and the
dequantized rows go straight into the swizzled B operand, a store a chunk of 64 as each is made (a [64,
block_n] value whose rows are concatenated on an untiled axis); a plain staging buffer and a reload in the
WGMMA layout sat in between before, and a load a word, together half the MLIR operations of a step (Q4_K
7393 -> 3925).

Not done: feeding the wgmma from registers, as the mixed-type kernels feed their narrow operand (jax's
int8 A operand converted in the WGMMA_8BIT layout). Mosaic GPU can express it for 4-bit codes: a plane
laid out [N, K] in element order loads in the WGMMA_UPCAST_4X layout (a thread holds one 32-bit word, eight
consecutive codes of a row), goes to the WGMMA layout by a shuffle and a prmt a word (`layout_cast`) and
converts to bf16 there, and that lowers for CUDA (jax 0.12.0.1). But the Mosaic GPU interpreter's wgmma
reads its A operand only from shared memory, so such a kernel could not be checked on a CPU against the
reference as every kernel here is, and it needs a load-time layout of its own (codes [N, K] in element
order, not the lanes): left for a session with a GPU to check it on.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import fragmented_array as mgpu_fa
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.extend import core as jex_core

from pallas_kernels import mma
from pallas_kernels.decode_layout import LAYOUTS, ROW_ALIGN, to_lanes
from realm_jax.errors import ArgumentError, DTypeError, QTensorError, ShapeMismatchError, UnsupportedFormatError
from realm_jax.quant import QTensor, get_format

__all__ = ["MosaicGpuTiling", "gemm", "gemm_lanes", "num_sms", "supports", "tiling_for"]

# The formats whose dequantization (`pallas_kernels.mma`'s) is arithmetic on the codes: those that index a
# table of values (a gather) have none here.
FORMATS = frozenset(LAYOUTS) - mma.TABLE_FORMATS
# The formats whose dequantization reads the chunk's place in its unit beyond the planes' words (bit
# fields chosen by it): their steps take whole units.
_WHOLE_UNITS = frozenset({"Q2_K", "Q3_K"})
_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
_WGMMA_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
_THREADS = 128  # one warpgroup
_MAX_BLOCK_DIM = 256  # TMA: at most 256 elements per block dimension
_SMEM_BYTES = 232_448  # per CTA on H100/H200
_SMEM_ALIGN = 1024  # Mosaic GPU aligns each shared-memory allocation to this
_MIN_WAVE_FILL = 0.8  # `tiling_for`: output tiles / (waves of the SMs x SMs) a tiling must reach
# Steps in flight that a second dequantized tile (its wgmma waited for, and its inputs released, a step
# late) needs: with two, the copy of step s+2 waits for step s's release at the end of step s+1, and step
# s+2 then waits out that copy.
_LATE_RELEASE_STEPS = 3
_LANE = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicGpuTiling:
    """Static tiling of the Mosaic GPU kernel, chosen by `tiling_for`.

    Attributes:
      block_n: weight rows per compute warpgroup: 128 or 256 (one or two rows per thread); a CTA's tile
        is block_n * compute_wgs rows.
      block_k: elements of K per pipeline step: a multiple of the block size; the planes' blocks of
        K/bs*count rows must stay within 256 (Q8_K and Q8_0: 256 at most).
      block_m: rows of x per CTA (64 or 128: one or two wgmma M), shared by its compute warpgroups.
      max_concurrent_steps: pipeline depth (the TMA copies of x and the lanes in flight per input).
      compute_wgs: warpgroups that dequantize and multiply (1 or 2), each its own block_n rows of the
        weight against the CTA's rows of x; one more warpgroup issues the TMA copies.
      w_buffers: dequantized tiles per compute warpgroup (1 or 2). With 2 and at least three steps in
        flight, step s+1 dequantizes into one while step s's wgmma reads the other (the wgmma is waited for
        one step later, and the inputs it reads are released then); otherwise each step waits for its
        wgmma (with two steps in flight, a late release would make each step wait out a copy)."""

    block_n: int = 128
    block_k: int = 256
    block_m: int = 64
    max_concurrent_steps: int = 2
    compute_wgs: int = 1
    w_buffers: int = 1

    def check(self, fmt: str) -> None:
        lay = LAYOUTS[fmt]
        if self.block_n not in (128, 256):
            raise ValueError(f"MosaicGpuTiling: {self.block_n=} must be 128 or 256")
        if self.block_m not in (64, 128):
            raise ValueError(f"MosaicGpuTiling: {self.block_m=} must be 64 or 128")
        if self.block_k <= 0 or self.block_k % mma.CHUNK:
            raise ValueError(f"MosaicGpuTiling: {self.block_k=} must be a multiple of {mma.CHUNK} (the "
                             f"dequantization's chunks)")
        if self.block_k % lay.unit and (lay.unit % self.block_k or fmt in _WHOLE_UNITS):
            raise ValueError(f"MosaicGpuTiling: {self.block_k=} must be a multiple of {fmt}'s {lay.unit}-element "
                             f"units" + ("" if fmt in _WHOLE_UNITS else " or divide them"))
        if self.block_k // lay.unit > _MAX_BLOCK_DIM:
            raise ValueError(f"MosaicGpuTiling: {self.block_k=} gives {fmt} plane blocks of "
                             f"{self.block_k // lay.unit} units; at most {_MAX_BLOCK_DIM} fit a TMA copy")
        if self.max_concurrent_steps < 1:
            raise ValueError(f"MosaicGpuTiling: {self.max_concurrent_steps=} must be >= 1")
        if self.compute_wgs not in (1, 2):
            raise ValueError(f"MosaicGpuTiling: {self.compute_wgs=} must be 1 or 2")
        if self.w_buffers not in (1, 2):
            raise ValueError(f"MosaicGpuTiling: {self.w_buffers=} must be 1 or 2")
        if self.block_m * self.block_n > 128 * _THREADS:
            raise ValueError(f"MosaicGpuTiling: {self.block_m=} x {self.block_n=} f32 accumulators are "
                             f"{self.block_m * self.block_n // _THREADS} registers a thread; at most 128")
        if self.block_n * self.compute_wgs > _MAX_BLOCK_DIM:
            raise ValueError(f"MosaicGpuTiling: {self.block_n=} x {self.compute_wgs=} rows a CTA; at most "
                             f"{_MAX_BLOCK_DIM} fit a TMA copy")


def tiling_for(fmt: str, m: int, n: int, k: int, out_dtype=jnp.float32) -> MosaicGpuTiling:
    """The one heuristic: the tiling of `gemm` for x [m, k] @ w (n, k)^T.

    One chunk of 64 elements of K a step, four in flight (Q2_K and Q3_K: a unit of 256, two in flight): the
    step's dequantization is unrolled element by element, and its MLIR operations, which set the compile
    time, grow with block_k (256 elements a step made ~28-31k, 64 a quarter of that; 14-42 s of compile on
    an H200 at the old kernel's 35-47k).

    Then, of the tilings that fit shared memory and the rows of w, in this order: two compute warpgroups
    (where the rows come in whole 256s) with two dequantized tiles each (with three steps in flight or
    more), then one with two, then two and one with one; each with two wgmma M of x (128 rows, where x has
    more than 64; with three steps in flight where four do not fit), so that each dequantized element
    serves more rows, before one. The output tiles pass through shared memory in out_dtype, so out_dtype
    counts (f32 outputs leave less room). The first whose output tiles fill the SMs' waves to at least
    `_MIN_WAVE_FILL` is taken (at 512 x 4096, two warpgroups of 128 rows of x make 64 tiles: half the SMs
    idle), else the one that fills them best."""
    whole = fmt in _WHOLE_UNITS
    base = MosaicGpuTiling(block_n=128, block_k=LAYOUTS[fmt].unit if whole else mma.CHUNK,
                           max_concurrent_steps=2 if whole else 4)
    rows, sms = _round_up(n, ROW_ALIGN), num_sms()
    fitting = []
    deep = base.max_concurrent_steps
    for wgs, bufs in ((2, 2), (1, 2), (2, 1), (1, 1)):
        if bufs == 2 and deep < _LATE_RELEASE_STEPS:
            continue
        shapes = [(128, deep)] if m > 64 else []
        if m > 64 and bufs == 2 and deep > _LATE_RELEASE_STEPS:
            shapes.append((128, _LATE_RELEASE_STEPS))  # 128 rows of x, a step less in flight
        for block_m, steps in shapes + [(64, deep)]:
            t = dataclasses.replace(base, block_m=block_m, compute_wgs=wgs, w_buffers=bufs, max_concurrent_steps=steps)
            if rows % (t.block_n * wgs) == 0 and _gemm_smem_bytes(fmt, t, jnp.bfloat16, out_dtype) <= _SMEM_BYTES:
                tiles = -(-m // block_m) * (rows // (t.block_n * wgs))
                fill = tiles / (-(-tiles // sms) * sms)
                if fill >= _MIN_WAVE_FILL:
                    return t
                fitting.append((-fill, len(fitting), t))
    return min(fitting)[2] if fitting else base


# --- the jaxpr of a step's dequantization, evaluated with one [block_n] vector per element ------------
@functools.lru_cache(maxsize=None)
def _step_jaxpr(fmt: str, block_k: int, planes: tuple[tuple[str, int, str], ...], dtype,
                chunk: int) -> jex_core.ClosedJaxpr:
    """The jaxpr of chunk `chunk` [mma.CHUNK] of a step's dequantized tile (one weight row;
    `mma.permute_x`'s order) from the step's lanes {name: [units, P, 1]} (`planes`: (name, P, dtype)), by
    `pallas_kernels.mma`'s format functions: the same code words, masks and scales as the Triton GEMM."""
    lay = LAYOUTS[fmt]
    units = max(1, block_k // lay.unit)

    def tile(lanes):  # chunk i of the step: of its unit, where a step is part of one
        i = chunk
        first, count, part = (i * mma.CHUNK // lay.unit, 1, i % (lay.unit // mma.CHUNK)) \
            if lay.unit > mma.CHUNK else (2 * i, 2, 0)

        def get(name, words):
            a = lanes[name][first:first + count]
            return a if words is None else a[:, words[0]:words[0] + words[1]]

        return mma.FORMATS[fmt](get, part, 1, interpret=True, magic=jnp.uint32(mma.MAGIC)).astype(dtype)[:, 0]

    shapes = {name: jax.ShapeDtypeStruct((units, count, 1), jnp.dtype(dt)) for name, count, dt in planes}
    return jax.make_jaxpr(tile)(shapes)


_FOLD = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "neg": np.negative, "and": np.bitwise_and,
         "or": np.bitwise_or, "xor": np.bitwise_xor, "not": np.invert, "shift_left": np.left_shift,
         "shift_right_logical": np.right_shift, "max": np.maximum, "min": np.minimum,
         "div": np.floor_divide, "rem": np.remainder}  # div, rem: of constants (indices), never negative
_BITWISE = {"and", "or", "xor", "not"}


def _grid(value) -> np.ndarray:
    """A value -> an object array of its elements: numpy scalars (constants) or [block_n] vectors."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        return value
    value = np.asarray(value)
    out = np.empty(value.shape, object)
    for idx in np.ndindex(*value.shape):
        out[idx] = value[idx]
    return out


def _broadcast_in_dim(x: np.ndarray, rest, p) -> np.ndarray:
    shape = list(p["shape"])
    expanded = [1] * len(shape)
    for src, dst in enumerate(p["broadcast_dimensions"]):
        expanded[dst] = x.shape[src]
    return np.broadcast_to(x.reshape(expanded), shape)


def _slice(x: np.ndarray, rest, p) -> np.ndarray:
    strides = p["strides"] or (1,) * x.ndim
    return x[tuple(slice(*a) for a in zip(p["start_indices"], p["limit_indices"], strides))]


def _iota(x, rest, p) -> np.ndarray:
    d = p["dimension"]
    ramp = np.arange(p["shape"][d], dtype=p["dtype"]).reshape([-1 if i == d else 1 for i in range(len(p["shape"]))])
    return _grid(np.broadcast_to(ramp, p["shape"]))


# Primitives that only rearrange elements: applied to the element grid at trace time, emitting nothing.
# Each takes (first operand, the other operands, params).
_STRUCTURAL = {
    "reshape": lambda x, rest, p: x.reshape(p["new_sizes"]),
    "broadcast_in_dim": _broadcast_in_dim,
    "squeeze": lambda x, rest, p: np.squeeze(x, axis=tuple(p["dimensions"])),
    "transpose": lambda x, rest, p: np.transpose(x, p["permutation"]),
    "concatenate": lambda x, rest, p: np.concatenate([x, *rest], axis=p["dimension"]),
    "slice": _slice,
    "iota": _iota,
}


def _apply(prim, args, params):
    """One elementwise op on [block_n] vectors. Mosaic GPU does arithmetic and shifts on 8/16-bit
    integers only after widening; wrapping back by truncation gives the same bits."""
    dt = args[0].dtype
    if (prim.name not in _BITWISE | {"convert_element_type", "bitcast_convert_type"}
            and jnp.issubdtype(dt, jnp.integer) and dt.itemsize < 4):
        return prim.bind(*[a.astype(jnp.int32) for a in args], **params).astype(dt)
    return prim.bind(*args, **params)


def _elementwise(eqn, vals, splat) -> np.ndarray:
    out_aval = eqn.outvars[0].aval
    vals = [np.broadcast_to(v, out_aval.shape) for v in vals]
    out = np.empty(out_aval.shape, object)
    for idx in np.ndindex(*out_aval.shape):
        args = [v[idx] for v in vals]
        dtypes = [v.aval.dtype for v in eqn.invars]
        if all(isinstance(a, np.generic) for a in args):  # constants fold at trace time
            a = [np.asarray(x, dt) for x, dt in zip(args, dtypes)]
            if eqn.primitive.name == "convert_element_type":
                out[idx] = a[0].astype(eqn.params["new_dtype"])[()]
            elif eqn.primitive.name == "bitcast_convert_type":
                out[idx] = a[0].view(eqn.params["new_dtype"])[()]
            else:
                with np.errstate(over="ignore"):
                    out[idx] = np.asarray(_FOLD[eqn.primitive.name](*a)).astype(out_aval.dtype)[()]
            continue
        args = [splat(a, dt) if isinstance(a, np.generic) else a
                for a, dt in zip(args, dtypes)]
        out[idx] = _apply(eqn.primitive, args, eqn.params)
    return out


def _eval(jaxpr, consts, args, splat):
    env = {}

    def read(v):
        return _grid(np.asarray(v.val, v.aval.dtype)) if isinstance(v, jex_core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, (_grid(c) for c in consts)))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        vals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _STRUCTURAL:
            outs = [_STRUCTURAL[name](vals[0] if vals else None, vals[1:], eqn.params)]
        elif name in ("pjit", "closed_call", "jit"):
            inner = eqn.params.get("jaxpr") or eqn.params["call_jaxpr"]
            outs = _eval(inner.jaxpr, inner.consts, vals, splat)
        elif name == "optimization_barrier":
            outs = vals
        elif name in _FOLD or name in ("convert_element_type", "bitcast_convert_type"):
            outs = [_elementwise(eqn, vals, splat)]
        else:
            raise UnsupportedFormatError(f"mosaic_gpu: dequantize_tile uses {name!r}, which the row-wise "
                                         f"evaluator does not know")
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _splatter(width: int):
    """A constant operand -> a [width] vector, each made once (per step: the function's cache)."""
    splats = {}

    def splat(value, dtype):
        key = (jnp.dtype(dtype).name, np.asarray(value, dtype).tobytes())
        if key not in splats:
            splats[key] = jnp.full((width,), value, dtype)
        return splats[key]

    return splat


def _rowwise(fmt: str, block_k: int, lanes: dict[str, np.ndarray], dtype, splat, chunk: int) -> np.ndarray:
    """Chunk `chunk` of a step's dequantized tile from its lanes given as one [block_n] vector per element
    ({name: [units, P]}) -> [mma.CHUNK] vectors."""
    planes = tuple((name, a.shape[1], str(a[0, 0].dtype)) for name, a in sorted(lanes.items()))
    closed = _step_jaxpr(fmt, block_k, planes, jnp.dtype(dtype), chunk)
    [out] = _eval(closed.jaxpr, closed.consts, [lanes[name][..., None] for name, _, _ in planes], splat)
    return out


# --- layouts ------------------------------------------------------------------------------------
def _tiled(layout: mgpu_fa.TiledLayout):
    return plgpu.Layout.TILED(layout.tiling, warp_dims=layout.warp_dims, lane_dims=layout.lane_dims,
                              vector_dim=layout.vector_dim)


@functools.lru_cache(maxsize=None)
def _row_layout(block_n: int):
    """[block_n]: thread t of warp w owns rows w*block_n/4 + t*r .. +r (r = block_n/128) of the tile (the
    rows of a tiled [block_n, 8] layout)."""
    r = block_n // _THREADS
    tiling = mgpu_fa.Tiling(((block_n, 8), (block_n // 4, 8), (r, 8), (1, 1)))
    acc = mgpu_fa.TiledLayout(tiling, warp_dims=(-8,), lane_dims=(-6,), vector_dim=-1,
                              _check_canonical=False).canonicalize()
    return _tiled(acc.reduce((1,)))


def _load_rows(ref, layout) -> np.ndarray:
    """A lanes block [units, P, block_n] in SMEM -> an object array [units, P] of [block_n] vectors: one
    load of the block (its leading dims are the registers' own), indexed at trace time."""
    block = plgpu.load(ref, layout=layout, optimized=False)
    out = np.empty(ref.shape[:2], object)
    for u, p in np.ndindex(*ref.shape[:2]):
        out[u, p] = block[u, p]
    return out


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def _check(name: str, x, w, compute_dtype, out_dtype):
    if not isinstance(w, QTensor):
        raise QTensorError(f"{name}: w must be a QTensor, got {type(w).__name__}")
    w.check(f"{name}: w")
    if w.format.block_size == 1:
        raise UnsupportedFormatError(f"{name}: {w.fmt} weights are dense: a plain dot multiplies them")
    if w.fmt not in FORMATS:
        raise UnsupportedFormatError(f"{name}: no kernel for {w.fmt}; formats: {', '.join(sorted(FORMATS))}")
    x = jnp.asarray(x)
    if w.ndim != 2 or x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ShapeMismatchError(f"{name}: x.shape={x.shape} must be [M, K] with K={w.shape[-1]} of "
                                 f"w.shape={w.shape} (N, K)")
    return (x, *_dtypes(name, x.dtype, compute_dtype, out_dtype))


def _dtypes(name: str, x_dtype, compute_dtype, out_dtype):
    compute_dtype = jnp.dtype(x_dtype if compute_dtype is None else compute_dtype)
    out_dtype = jnp.dtype(x_dtype if out_dtype is None else out_dtype)
    for what, dt in (("x.dtype", jnp.dtype(x_dtype)), ("compute_dtype", compute_dtype), ("out_dtype", out_dtype)):
        if dt not in _FLOATS:
            raise DTypeError(f"{name}: {what}={dt} must be one of float32, float16, bfloat16")
    if compute_dtype not in _WGMMA_DTYPES:
        raise DTypeError(f"{name}: compute_dtype={compute_dtype} must be float16 or bfloat16 (wgmma); f32 "
                         f"compute is the XLA path's")
    return compute_dtype, out_dtype


def num_sms() -> int:
    """Streaming multiprocessors of the GPU the kernel runs on (the persistent grid's size): the default
    device's where it is a GPU, else an H100/H200's 132 (lowering for CUDA on a machine without one)."""
    device = jax.devices()[0]
    return (getattr(device, "core_count", None) or 132) if device.platform == "gpu" else 132


def _interpret(interpret):
    if interpret is True:
        return plgpu.InterpretGPUParams()
    return interpret or None


# --- prefill: dequantize to shared memory, then wgmma --------------------------------------------
def _gemm_kernel(x_gmem, *refs, fmt, names: tuple[str, ...], t: MosaicGpuTiling, steps: int, tiles: tuple[int, int],
                 dtype):
    """One CTA per SM, each looping over output tiles [block_m, block_n * compute_wgs] (M minor: the CTAs
    working at once share few weight tiles, read once from HBM into L2). In each, the last warpgroup
    copies x and the lanes in by TMA, `max_concurrent_steps` ahead; each compute warpgroup dequantizes its
    block_n rows of a step (one row a thread), stores them as a wgmma B operand in shared memory and
    issues the wgmma, which it waits for one step later (w_buffers=2: the inputs it reads are released
    then, `delay_release`)."""
    *plane_gmem, out_gmem = refs
    m_tiles, n_tiles = tiles
    cta_n = t.block_n * t.compute_wgs
    delay = 1 if t.w_buffers == 2 and min(steps, t.max_concurrent_steps) >= _LATE_RELEASE_STEPS else 0
    row_layout = _row_layout(t.block_n)
    x_transforms = _wgmma_transforms(t.block_k, dtype)

    def pipeline(body, context):
        in_specs = [plgpu.BlockSpec((t.block_m, t.block_k), lambda k: (0, k), transforms=x_transforms,
                                    delay_release=delay)]
        in_specs += [plgpu.BlockSpec(*_plane_block(fmt, n, t), delay_release=delay) for n in names]
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(steps,), in_specs=in_specs, max_concurrent_steps=t.max_concurrent_steps,
            memory_registers=40, wg_axis="wg", num_compute_wgs=t.compute_wgs, compute_context=context)

    def ignore(*_, **__):
        return None

    @functools.partial(
        pl.run_scoped, allocations=pipeline(ignore, ignore).get_allocations(x_gmem, *plane_gmem),
        w_smem=plgpu.SMEM((t.compute_wgs, t.w_buffers, t.block_k, t.block_n), dtype,
                          transforms=_wgmma_transforms(t.block_n, dtype)),
        out_smem=plgpu.SMEM((t.compute_wgs, t.block_m, t.block_n), out_gmem.dtype,
                            transforms=_wgmma_transforms(t.block_n, out_gmem.dtype)),
        collective_axes="wg")
    def scope(allocations, w_smem, out_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def tile(info):
            (index,) = info.index
            ni, mi = index // m_tiles, index % m_tiles
            rows = pl.ds(mi * t.block_m, t.block_m)
            mine = pl.ds(wg * t.block_n, t.block_n)  # this warpgroup's rows of the CTA's tile

            def step(idx, x_smem, *refs):
                *plane_smem, acc = refs
                w_tile = w_smem.at[wg, lax.rem(idx[0], t.w_buffers)]
                lanes = {n: _load_rows(r.at[:, :, mine], row_layout) for n, r in zip(names, plane_smem)}
                splat = _splatter(t.block_n)
                # w^T [block_k, block_n] is the wgmma B operand, tiled and swizzled in SMEM: stored a chunk of
                # 64 rows at a time as it is made (the rows concatenated on an untiled axis: free), each thread
                # its row's element of each, so that no more than a chunk of the tile is live in registers.
                for c in range(t.block_k // mma.CHUNK):
                    with jax.named_scope("dequant"):
                        w = _rowwise(fmt, t.block_k, lanes, dtype, splat, c)
                    w_tile[pl.ds(c * mma.CHUNK, mma.CHUNK)] = jnp.concatenate([v.reshape(1, -1) for v in w])
                plgpu.commit_smem()
                plgpu.wgmma(acc, x_smem, w_tile)
                # With two tiles, the previous step's wgmma (which read the tile the next step rewrites, and
                # the inputs released after this step) is done when at most this one is in flight.
                plgpu.wgmma_wait(delay)
                if delay:
                    # The pipeline releases the last step's inputs on none of its steps, and the next output
                    # tile's copies start as soon as the second last is released: that x slot must be read.
                    @pl.when(idx[0] == steps - 1)
                    def _():
                        plgpu.wgmma_wait(0)
                return acc

            def context(run):
                def accumulate(acc):
                    run(acc)
                    # The sums rounded once to out_dtype, through shared memory and a TMA copy (a thread's
                    # pairs of 16-bit outputs are no whole 32-byte sectors of GMEM); the previous tile's copy
                    # must have read the buffer first.
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    out_smem[wg] = acc[...].astype(out_gmem.dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(out_smem.at[wg],
                                            out_gmem.at[rows, pl.ds(ni * cta_n + wg * t.block_n, t.block_n)])

                pl.run_scoped(accumulate, plgpu.ACC((t.block_m, t.block_n), jnp.float32))

            pipeline(step, context)(x_gmem.at[rows], *[g.at[:, :, pl.ds(ni * cta_n, cta_n)] for g in plane_gmem],
                                    allocations=allocations)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's copy out, before the CTA ends


def _plane_block(fmt: str, name: str, t: MosaicGpuTiling):
    """A step's block of lane plane `name` and its index map: whole units, or where a step is a part of a
    unit, that part of each plane kept per chunk (its P words in proportion) and all of one kept per unit
    (P = 1: d, dmin)."""
    lay, p, cta_n = LAYOUTS[fmt], LAYOUTS[fmt].planes[name], t.block_n * t.compute_wgs
    if t.block_k >= lay.unit:
        return (t.block_k // lay.unit, p, cta_n), lambda k: (k, 0, 0)
    parts = lay.unit // t.block_k
    if p == 1:
        return (1, 1, cta_n), lambda k: (k // parts, 0, 0)
    return (1, p // parts, cta_n), lambda k: (k // parts, k % parts, 0)


@functools.lru_cache(maxsize=None)
def _lane_itemsizes(fmt: str) -> dict[str, int]:
    """Bytes an element of each of the format's lane planes."""
    f = get_format(fmt)
    lay = LAYOUTS[fmt]
    planes = {p.name: jax.ShapeDtypeStruct((ROW_ALIGN, lay.unit // f.block_size * p.count), p.dtype)
              for p in f.planes}
    lanes = jax.eval_shape(to_lanes, QTensor(fmt, (ROW_ALIGN, lay.unit), planes))
    return {name: a.dtype.itemsize for name, a in lanes.items()}


def _gemm_smem_bytes(fmt: str, t: MosaicGpuTiling, dtype, out_dtype=jnp.float32) -> int:
    """Shared memory of the kernel's allocations, each rounded up to Mosaic GPU's 1 KiB alignment: a
    buffer of `max_concurrent_steps` blocks per input, the dequantized tiles, the output tiles on their way
    out, the pipeline's barriers."""
    slots, size = t.max_concurrent_steps, jnp.dtype(dtype).itemsize
    buffers = [slots * int(np.prod(_plane_block(fmt, n, t)[0])) * b for n, b in _lane_itemsizes(fmt).items()]
    buffers += [slots * t.block_m * t.block_k * size, t.compute_wgs * t.w_buffers * t.block_k * t.block_n * size,
                t.compute_wgs * t.block_m * t.block_n * jnp.dtype(out_dtype).itemsize, slots * 8, slots * 8]
    return sum(_round_up(b, _SMEM_ALIGN) for b in buffers)


def _wgmma_transforms(minor: int, dtype):
    swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def _validate(name: str, fmt: str, tiling: MosaicGpuTiling, compute_dtype, out_dtype) -> None:
    tiling.check(fmt)
    if (smem := _gemm_smem_bytes(fmt, tiling, compute_dtype, out_dtype)) > _SMEM_BYTES:
        raise ValueError(f"{name}: {tiling} needs {smem} bytes of shared memory for {fmt}; an H100/H200 "
                         f"CTA has {_SMEM_BYTES}")


def supports(fmt: str, k: int) -> bool:
    """Whether `gemm_lanes` takes a `fmt` weight with K = k as laid out (K in whole steps of the default
    tiling: a multiple of 64, and of 256 for the k-quants)."""
    return fmt in FORMATS and k % tiling_for(fmt, 1, ROW_ALIGN, k).block_k == 0


def gemm_lanes(x, lanes: dict[str, jax.Array], *, fmt: str, compute_dtype, out_dtype=jnp.float32,
               tiling: MosaicGpuTiling | None = None, ctas: int | None = None, interpret=False) -> jax.Array:
    """x [M, K] @ dequant(w)^T from the weight's lane planes (`pallas_kernels.decode_layout.to_lanes`: the
    layout the Triton kernels read, made once at load; no copy of the weight per call) -> [M, N'] in
    out_dtype (N' the lanes' padded rows).

    The lanes are already K-major ([K / unit, P, N']): a step's TMA copy brings [block_k / unit, P, block_n
    * compute_wgs] of each plane, and the dequantization of `pallas_kernels.mma` makes the tile in the order of
    `mma.permute_x`, by which x's columns are permuted (a gather over x, not the weight). K must be a whole
    number of steps (`supports`), N' a multiple of block_n * compute_wgs.

    The grid is persistent: `ctas` CTAs (default one per SM, `num_sms()`; fewer where there are fewer
    output tiles) each loop over the tiles.

    In the interpreter, each warpgroup of a CTA is a program on XLA's CPU client, all of them blocking on
    each other's barriers at once, while the calling program waits in the callback that started them. The
    client's thread pool (one thread per CPU device, at least one per core) can run parts of any of them, so
    the CTA's compute_wgs + 1 warpgroups and the caller need compute_wgs + 2 of its threads, or they may
    wait on each other forever (seen on two cores with one device, under load). The default tiling takes
    one compute warpgroup where there are too few for two; a tiling that cannot run raises an ArgumentError
    (a ValueError) naming `--xla_force_host_platform_device_count`."""
    if fmt not in FORMATS:
        raise UnsupportedFormatError(f"gemm_lanes: no kernel for {fmt}; formats: {', '.join(sorted(FORMATS))}")
    compute_dtype, out_dtype = _dtypes("gemm_lanes", x.dtype, compute_dtype, out_dtype)
    lay = LAYOUTS[fmt]
    names = tuple(lay.planes)
    (m, k), n = x.shape, lanes["q"].shape[-1]
    if set(lanes) != set(names) or lanes["q"].shape[0] * lay.unit != k:
        raise ShapeMismatchError(f"gemm_lanes: x {x.shape} against {fmt} lanes "
                                 f"{ {key: v.shape for key, v in lanes.items()} }")
    interpret = _interpret(interpret)
    t = tiling or _default_tiling(fmt, m, n, k, out_dtype, interpret)
    _validate("gemm_lanes", fmt, t, compute_dtype, out_dtype)
    if interpret and not _interpreter_fits(t.compute_wgs):
        raise ArgumentError(f"gemm_lanes: {t} runs {t.compute_wgs + 1} warpgroups a CTA; the Mosaic GPU interpreter "
                            f"runs them and their caller at once only on {t.compute_wgs + 2} threads of XLA's CPU "
                            f"client, and this process's has {_interpreter_threads()} (one a CPU device, at least one "
                            f"a core): start it with XLA_FLAGS=--xla_force_host_platform_device_count="
                            f"{t.compute_wgs + 2} (or more)")
    if ctas is not None and ctas < 1:
        raise ValueError(f"gemm_lanes: ctas={ctas} must be >= 1")
    if k % t.block_k or n % (t.block_n * t.compute_wgs):
        raise ShapeMismatchError(f"gemm_lanes: K={k} and N'={n} must be multiples of {t.block_k=} and "
                                 f"{t.block_n=} x {t.compute_wgs=}")
    return _gemm(x, lanes, fmt, names, compute_dtype, out_dtype, t, ctas or num_sms(), interpret)


def _interpreter_threads() -> int:
    """The threads of XLA's CPU client pool: one per CPU device, at least one per core this process may
    run on (measured on two cores: 2 with one device, 4 with four)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(len(jax.devices("cpu")), cores)


def _interpreter_fits(compute_wgs: int = 1) -> bool:
    """Whether the interpreter can run a CTA of `compute_wgs` compute warpgroups here: they, the TMA
    warpgroup and their caller need compute_wgs + 2 threads of XLA's CPU pool (`gemm_lanes`)."""
    return compute_wgs + 2 <= _interpreter_threads()


def _default_tiling(fmt: str, m: int, n: int, k: int, out_dtype, interpret) -> MosaicGpuTiling:
    """`tiling_for`'s, with one compute warpgroup where the interpreter cannot run two at once."""
    t = tiling_for(fmt, m, n, k, out_dtype)
    if interpret and not _interpreter_fits(t.compute_wgs):
        return dataclasses.replace(t, compute_wgs=1)
    return t


@functools.partial(jax.jit, static_argnames=("fmt", "names", "compute_dtype", "out_dtype", "t", "ctas", "interpret"))
def _gemm(x, lanes, fmt, names, compute_dtype, out_dtype, t, ctas, interpret):
    (m, k), n = x.shape, lanes["q"].shape[-1]
    xp = mma.permute_x(x, fmt, compute_dtype, t.block_m)  # rows padded to block_m, columns in tile order
    m_pad = xp.shape[0]
    tiles = (m_pad // t.block_m, n // (t.block_n * t.compute_wgs))
    kernel = functools.partial(_gemm_kernel, fmt=fmt, names=names, t=t, steps=k // t.block_k, tiles=tiles,
                               dtype=compute_dtype)
    y = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((m_pad, n), out_dtype),  # rounded once, from the f32 sums
        grid=(min(ctas, tiles[0] * tiles[1]),), grid_names=("sm",),  # persistent: a CTA an SM at most
        num_threads=t.compute_wgs + 1, thread_name="wg", compiler_params=_LANE, interpret=interpret,
    )(xp, *(lanes[name] for name in names))
    return y[:m]


def gemm(x, w: QTensor, *, compute_dtype=None, out_dtype=None, tiling: MosaicGpuTiling | None = None,
         ctas: int | None = None, interpret=False) -> jax.Array:
    """Prefill matmul y = x @ dequant(w)^T on the tensor cores (wgmma), f32 accumulation, for a QTensor
    as stored: its lanes made for this call (`gemm_lanes` reads them as laid out at load), padded to whole
    steps and tiles.

    Args:
      x: [M, K] float32, float16 or bfloat16.
      w: a 2-D QTensor (N, K) in a quantized format (its backend declares which:
        `realm_jax.linear.pallas.KERNEL_FORMATS`).
      compute_dtype: float16 or bfloat16 (default x.dtype), the dtype the weight is dequantized to and x
        is cast to; products and sums are f32. Hopper's wgmma takes f32 only as tf32 (a 10-bit mantissa,
        not an f32 matmul): the backend sends f32 compute to the XLA path.
      out_dtype: the dtype of y (default x.dtype).
      tiling: a `MosaicGpuTiling`; `tiling_for` by default.
      ctas: CTAs of the persistent grid (default one per SM: `num_sms()`).
      interpret: True (or a `plgpu.InterpretGPUParams`) runs the Mosaic GPU interpreter (CPU; see
        `gemm_lanes` for the CPU devices that two compute warpgroups need).

    Returns:
      [M, N] in out_dtype.
    """
    x, compute_dtype, out_dtype = _check("gemm", x, w, compute_dtype, out_dtype)
    (m, k), n = x.shape, w.shape[0]
    t = tiling or _default_tiling(w.fmt, m, n, k, out_dtype, _interpret(interpret))
    _validate("gemm", w.fmt, t, compute_dtype, out_dtype)
    lanes = to_lanes(w)
    k_pad, n_pad = _round_up(k, t.block_k), _round_up(lanes["q"].shape[-1], t.block_n * t.compute_wgs)
    unit = LAYOUTS[w.fmt].unit
    lanes = {name: jnp.pad(a, ((0, (k_pad - k) // unit), (0, 0), (0, n_pad - a.shape[-1])))  # zeros: 0
             for name, a in lanes.items()}
    x = jnp.pad(x, ((0, 0), (0, k_pad - k)))
    y = gemm_lanes(x, lanes, fmt=w.fmt, compute_dtype=compute_dtype, out_dtype=out_dtype, tiling=t, ctas=ctas,
                   interpret=interpret)
    return y[:, :n]
