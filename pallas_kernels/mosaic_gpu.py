"""The prefill kernel for Hopper through Mosaic GPU (`plgpu.kernel` + `plgpu.emit_pipeline`).

`gemm`: y = x @ dequant(w)^T for every quantized format of `realm_jax.quant`, f16/bf16 operands on the
tensor cores (`plgpu.wgmma`) with an f32 accumulator [block_m, block_n]; the dequantized tile is staged in
shared memory. (Decode, up to 16 rows, is the Triton GEMV of `pallas_kernels.decode`. The FMA GEMV this
module had for decode was slower than XLA's dequantize+dot on an H200 at every shape timed, 182-215 us
against 127-140 at M=1 (FACTS.md), copied every plane per call and took 14-42 s to compile: removed.)

Shapes: M rows of x, N rows of w (outputs), K the contraction; bs a format's block size.

How the one definition of the math is kept. `realm_jax.quant.dequantize_tile` splits the minor (block)
axis by reshapes and broadcasts each block's scale over it. Mosaic GPU's register layouts cannot express
either (a strided layout broadcasts only leading dims; a tiled layout reshapes only its major dims and
broadcasts only into the rank-2 WGMMA/TCGEN05 layouts). So the kernels give each thread one row of the
weight and evaluate the jaxpr of `dequantize_tile` element by element: every element of a row's tile
becomes a [block_n] vector across rows (`_rowwise`). Reshapes, broadcasts and iota constants of the jaxpr
act on the element grid at trace time; only the arithmetic is emitted, on vectors. The planes are
transposed to K-major ([K/bs*count, N], `_kmajor`) so that one element of a block is a contiguous
row of shared memory.

Layouts: `_row_layout` gives each thread rows of the tile (one weight row per thread at block_n=128).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import fragmented_array as mgpu_fa
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.extend import core as jex_core

from realm_jax.errors import DTypeError, QTensorError, ShapeMismatchError, UnsupportedFormatError
from realm_jax.quant import QTensor, dequantize_tile, get_format

__all__ = ["MosaicGpuTiling", "gemm", "tiling_for"]

_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
_WGMMA_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
_THREADS = 128  # one warpgroup
_MAX_BLOCK_DIM = 256  # TMA: at most 256 elements per block dimension
_STAGE_ROWS = 64  # rows of the dequantized tile staged at a time on their way into the wgmma operand
_SMEM_BYTES = 232_448  # per CTA on H100/H200
_LANE = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicGpuTiling:
    """Static tiling of the Mosaic GPU kernels, chosen by `tiling_for`.

    Attributes:
      block_n: weight rows per CTA: 128 or 256 (one or two rows per thread).
      block_k: elements of K per pipeline step: a multiple of the block size; the planes' blocks of
        K/bs*count rows must stay within 256 (Q8_K and Q8_0: 256 at most).
      block_m: rows of x per CTA (64 or 128, the wgmma M).
      max_concurrent_steps: pipeline depth (buffers in flight per input).
    """

    block_n: int = 128
    block_k: int = 256
    block_m: int = 64
    max_concurrent_steps: int = 2

    def check(self, fmt: str) -> None:
        f = get_format(fmt)
        if self.block_n not in (128, 256):
            raise ValueError(f"MosaicGpuTiling: {self.block_n=} must be 128 or 256")
        if self.block_m not in (64, 128):
            raise ValueError(f"MosaicGpuTiling: {self.block_m=} must be 64 or 128")
        if self.block_k <= 0 or self.block_k % f.block_size:
            raise ValueError(f"MosaicGpuTiling: {self.block_k=} must be a multiple of {fmt}'s "
                             f"block_size={f.block_size}")
        rows = max(self.block_k // f.block_size * p.count for p in f.planes)
        if rows > _MAX_BLOCK_DIM:
            raise ValueError(f"MosaicGpuTiling: {self.block_k=} gives {fmt} plane blocks of {rows} rows; "
                             f"at most {_MAX_BLOCK_DIM} fit a TMA copy")
        if self.max_concurrent_steps < 1:
            raise ValueError(f"MosaicGpuTiling: {self.max_concurrent_steps=} must be >= 1")


def tiling_for(fmt: str, m: int, n: int, k: int) -> MosaicGpuTiling:
    """The one heuristic: the tiling of `gemm` for x [m, k] @ w (n, k)^T. block_m=64 is one wgmma M per
    warpgroup (128 overflows shared memory with block_k=256)."""
    f = get_format(fmt)
    per_256 = max(p.count for p in f.planes) * 256 // f.block_size
    return MosaicGpuTiling(block_n=128, block_k=256 if per_256 <= _MAX_BLOCK_DIM else 128, block_m=64)


# --- the jaxpr of dequantize_tile, evaluated with one [block_n] vector per element ----------------
@functools.lru_cache(maxsize=None)
def _tile_jaxpr(fmt: str, n_blocks: int, dtype) -> jax.extend.core.ClosedJaxpr:
    f = get_format(fmt)
    planes = {p.name: jax.ShapeDtypeStruct((n_blocks * p.count,), p.dtype) for p in f.planes}
    return jax.make_jaxpr(functools.partial(dequantize_tile, fmt, dtype=dtype))(planes)


_FOLD = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "neg": np.negative, "and": np.bitwise_and,
         "or": np.bitwise_or, "xor": np.bitwise_xor, "not": np.invert, "shift_left": np.left_shift,
         "shift_right_logical": np.right_shift, "max": np.maximum, "min": np.minimum}
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
    if prim.name not in _BITWISE | {"convert_element_type"} and jnp.issubdtype(dt, jnp.integer) and dt.itemsize < 4:
        return prim.bind(*[a.astype(jnp.int32) for a in args], **params).astype(dt)
    return prim.bind(*args, **params)


def _elementwise(eqn, vals, width: int) -> np.ndarray:
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
            else:
                with np.errstate(over="ignore"):
                    out[idx] = np.asarray(_FOLD[eqn.primitive.name](*a)).astype(out_aval.dtype)[()]
            continue
        args = [jnp.full((width,), a, dt) if isinstance(a, np.generic) else a
                for a, dt in zip(args, dtypes)]
        out[idx] = _apply(eqn.primitive, args, eqn.params)
    return out


def _eval(jaxpr, consts, args, width: int):
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
            outs = _eval(inner.jaxpr, inner.consts, vals, width)
        elif name == "optimization_barrier":
            outs = vals
        elif name in _FOLD or name == "convert_element_type":
            outs = [_elementwise(eqn, vals, width)]
        else:
            raise UnsupportedFormatError(f"mosaic_gpu: dequantize_tile uses {name!r}, which the row-wise "
                                         f"evaluator does not know")
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _rowwise(fmt: str, planes: dict[str, np.ndarray], dtype, width: int) -> np.ndarray:
    """dequantize_tile on a tile given as one [block_n] vector per plane element -> [n_blocks*bs] vectors."""
    f = get_format(fmt)
    n_blocks = len(planes[f.planes[0].name]) // f.planes[0].count
    closed = _tile_jaxpr(fmt, n_blocks, jnp.dtype(dtype))
    [out] = _eval(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(planes), width)
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
    """A plane tile [rows, block_n] in SMEM -> an object array of its rows as [block_n] vectors."""
    out = np.empty((ref.shape[0],), object)
    for j in range(ref.shape[0]):
        out[j] = plgpu.load(ref.at[j], layout=layout, optimized=False)
    return out


# --- wrapper-side layout --------------------------------------------------------------------------
def _kmajor(w: QTensor, n_pad: int, k_pad: int) -> dict[str, jax.Array]:
    """Planes [N, K/bs*count] -> K-major [K_pad/bs*count, N_pad], zero-padded (zero blocks dequantize to 0)."""
    f = w.format
    out = {}
    for p in f.planes:
        plane = jnp.asarray(w.planes[p.name])
        rows = k_pad // f.block_size * p.count
        out[p.name] = jnp.pad(plane.T, ((0, rows - plane.shape[1]), (0, n_pad - plane.shape[0])))
    return out


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def _check(name: str, x, w, compute_dtype, out_dtype):
    if not isinstance(w, QTensor):
        raise QTensorError(f"{name}: w must be a QTensor, got {type(w).__name__}")
    w.check(f"{name}: w")
    if w.format.block_size == 1:
        raise UnsupportedFormatError(f"{name}: {w.fmt} weights are dense: a plain dot multiplies them")
    x = jnp.asarray(x)
    if w.ndim != 2 or x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ShapeMismatchError(f"{name}: x.shape={x.shape} must be [M, K] with K={w.shape[-1]} of "
                                 f"w.shape={w.shape} (N, K)")
    compute_dtype = jnp.dtype(x.dtype if compute_dtype is None else compute_dtype)
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    for what, dt in (("x.dtype", x.dtype), ("compute_dtype", compute_dtype), ("out_dtype", out_dtype)):
        if dt not in _FLOATS:
            raise DTypeError(f"{name}: {what}={dt} must be one of float32, float16, bfloat16")
    return x, compute_dtype, out_dtype


def _interpret(interpret):
    if interpret is True:
        return plgpu.InterpretGPUParams()
    return interpret or None


# --- prefill: dequantize to shared memory, then wgmma --------------------------------------------
def _gemm_kernel(x_gmem, *refs, fmt, t: MosaicGpuTiling, steps: int, dtype):
    *plane_gmem, out_gmem, w_smem, stage_smem = refs
    f = get_format(fmt)
    names = [p.name for p in f.planes]
    ni, mi = lax.axis_index("n"), lax.axis_index("m")
    row_layout = _row_layout(t.block_n)

    def step(_, x_smem, *refs):
        *plane_smem, acc = refs
        planes = {n: _load_rows(r, row_layout) for n, r in zip(names, plane_smem)}
        with jax.named_scope("dequant"):
            w = _rowwise(fmt, planes, dtype, t.block_n)
        # w^T [block_k, block_n] is the wgmma B operand, which must sit in SMEM tiled and swizzled: rows of
        # w go to a plain staging buffer, come back in the WGMMA layout and are stored through the transforms.
        for start in range(0, t.block_k, _STAGE_ROWS):
            # One store of a [_STAGE_ROWS, block_n] value (concatenated on an untiled axis: free), not one per
            # row: every store is fenced by two warpgroup barriers.
            stage_smem[...] = jnp.concatenate([w[start + k].reshape(1, -1) for k in range(_STAGE_ROWS)])
            w_smem[pl.ds(start, _STAGE_ROWS)] = plgpu.load(stage_smem, layout=plgpu.Layout.WGMMA, optimized=False)
        plgpu.commit_smem()
        plgpu.wgmma(acc, x_smem, w_smem)
        plgpu.wgmma_wait(0)  # w_smem is rewritten by the next step
        return acc

    k_rows = {p.name: t.block_k // f.block_size * p.count for p in f.planes}
    x_transforms = _wgmma_transforms(t.block_k, dtype)
    in_specs = [plgpu.BlockSpec((t.block_m, t.block_k), lambda k: (0, k), transforms=x_transforms)]
    in_specs += [plgpu.BlockSpec((k_rows[n], t.block_n), lambda k: (k, 0)) for n in names]
    cols = pl.ds(ni * t.block_n, t.block_n)
    rows = pl.ds(mi * t.block_m, t.block_m)

    def scope(acc):
        acc = plgpu.emit_pipeline(step, grid=(steps,), in_specs=in_specs, init_carry=acc,
                                  max_concurrent_steps=t.max_concurrent_steps)(
            x_gmem.at[rows], *[g.at[:, cols] for g in plane_gmem])
        out_gmem[rows, cols] = acc[...]

    pl.run_scoped(scope, plgpu.ACC((t.block_m, t.block_n), jnp.float32))


def _gemm_smem_bytes(fmt: str, t: MosaicGpuTiling, dtype) -> int:
    f = get_format(fmt)
    planes = sum(t.block_k // f.block_size * p.count * t.block_n * np.dtype(p.dtype).itemsize for p in f.planes)
    x = t.block_m * t.block_k * jnp.dtype(dtype).itemsize
    staged = (t.block_k + _STAGE_ROWS) * t.block_n * jnp.dtype(dtype).itemsize
    return t.max_concurrent_steps * (planes + x) + staged


def _wgmma_transforms(minor: int, dtype):
    swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


@functools.partial(jax.jit, static_argnames=("compute_dtype", "out_dtype", "tiling", "interpret"))
def _gemm(x, w, compute_dtype, out_dtype, tiling, interpret):
    t = tiling
    (m, k), n = x.shape, w.shape[0]
    m_pad, n_pad, k_pad = _round_up(m, t.block_m), _round_up(n, t.block_n), _round_up(k, t.block_k)
    xp = jnp.pad(x.astype(compute_dtype), ((0, m_pad - m), (0, k_pad - k)))
    planes = _kmajor(w, n_pad, k_pad)
    kernel = functools.partial(_gemm_kernel, fmt=w.fmt, t=t, steps=k_pad // t.block_k, dtype=compute_dtype)
    y = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((m_pad, n_pad), jnp.float32),
        grid=(n_pad // t.block_n, m_pad // t.block_m), grid_names=("n", "m"),
        scratch_types=[plgpu.SMEM((t.block_k, t.block_n), compute_dtype,
                                  transforms=_wgmma_transforms(t.block_n, compute_dtype)),
                       plgpu.SMEM((_STAGE_ROWS, t.block_n), compute_dtype)],
        compiler_params=_LANE, interpret=_interpret(interpret),
    )(xp, *(planes[p.name] for p in w.format.planes))
    return y[:m, :n].astype(out_dtype)


def gemm(x, w: QTensor, *, compute_dtype=None, out_dtype=None, tiling: MosaicGpuTiling | None = None,
         interpret=False) -> jax.Array:
    """Prefill matmul y = x @ dequant(w)^T on the tensor cores (wgmma), f32 accumulation.

    Args:
      x: [M, K] float32, float16 or bfloat16.
      w: a 2-D QTensor (N, K) in a quantized format (its backend declares which:
        `realm_jax.linear.pallas.KERNEL_FORMATS`).
      compute_dtype: float16 or bfloat16 (default x.dtype), the dtype the weight is dequantized to and x
        is cast to; products and sums are f32. Hopper's wgmma takes f32 only as tf32 (a 10-bit mantissa,
        not an f32 matmul): the backend sends f32 compute to the XLA path.
      out_dtype: the dtype of y (default x.dtype).
      tiling: a `MosaicGpuTiling`; `tiling_for` by default.
      interpret: True (or a `plgpu.InterpretGPUParams`) runs the Mosaic GPU interpreter (CPU).

    Returns:
      [M, N] in out_dtype.
    """
    x, compute_dtype, out_dtype = _check("gemm", x, w, compute_dtype, out_dtype)
    if compute_dtype not in _WGMMA_DTYPES:
        raise DTypeError(f"gemm: compute_dtype={compute_dtype} must be float16 or bfloat16 (wgmma); f32 "
                         f"compute is the XLA path's")
    tiling = tiling or tiling_for(w.fmt, *x.shape[:1], *w.shape)
    tiling.check(w.fmt)
    if tiling.block_k % _STAGE_ROWS:
        raise ValueError(f"gemm: {tiling.block_k=} must be a multiple of {_STAGE_ROWS} (the staging rows)")
    if (smem := _gemm_smem_bytes(w.fmt, tiling, compute_dtype)) > _SMEM_BYTES:
        raise ValueError(f"gemm: {tiling} needs {smem} bytes of shared memory for {w.fmt}; an H100/H200 "
                         f"CTA has {_SMEM_BYTES}")
    return _gemm(x, w, compute_dtype, out_dtype, tiling, _interpret(interpret))
