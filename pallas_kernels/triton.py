"""The fused dequant-matmul on the Pallas Triton GPU backend: a decode GEMV and a prefill GEMM.

Grid (M / block_m, N / block_n); each program loops over K in tiles of block_k, slicing the plane refs
(`ref[:, pl.ds(...)]`: Triton allows no value slicing), dequantizing the tile in registers with the
format's tile function (realm_jax.quant) and accumulating in f32:
- decode (M <= 16): below 16 rows, one multiply-and-sum per row of x (tensor-core dots need 16 rows), so
  every weight byte is read once and the arithmetic stays in registers; at 16 rows, a dot.
- prefill: a dot of an x tile with the dequantized tile on the tensor cores.

The backend is deprecated in JAX (Mosaic GPU is the maintained one; see pallas_kernels.mosaic_gpu) and
every lowering warns so; `pallas_kernels` filters that one warning.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.layout import PlaneTile, plane_tiles, with_row_tail
from pallas_kernels.tiling import DECODE_ROWS, TritonTiling, round_up
from realm_jax.quant import QTensor, dequantize_tile

__all__ = ["matmul"]

_NT = (((1,), (1,)), ((), ()))  # x [m, k] . w [n, k] -> [m, n]


def _weight_tile(plane_refs, tiles: tuple[PlaneTile, ...], k, fmt: str, compute_dtype) -> jax.Array:
    planes = {t.name: r[:, pl.ds(k * t.width, t.width)] for t, r in zip(tiles, plane_refs)}
    return dequantize_tile(fmt, planes, dtype=compute_dtype)  # [block_n, block_k]


def _dot(x, w, compute_dtype):
    precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None
    return lax.dot_general(x, w, _NT, precision=precision, preferred_element_type=jnp.float32)


def _gemv_kernel(x_ref, *refs, fmt, tiles, block_k, n_k, compute_dtype):
    *plane_refs, o_ref = refs
    rows, block_n = o_ref.shape

    def x_tile(k, i, n):
        return x_ref[pl.ds(i, n), pl.ds(k * block_k, block_k)].astype(compute_dtype)

    if rows == DECODE_ROWS:
        def body(k, acc):
            return acc + _dot(x_tile(k, 0, rows), _weight_tile(plane_refs, tiles, k, fmt, compute_dtype),
                              compute_dtype)

        o_ref[...] = lax.fori_loop(0, n_k, body, jnp.zeros((rows, block_n), jnp.float32)).astype(o_ref.dtype)
        return

    def body(k, accs):
        # Products of two compute-dtype values are exact in f32, as in the dot they stand for.
        w = _weight_tile(plane_refs, tiles, k, fmt, compute_dtype).astype(jnp.float32)
        return tuple(acc + jnp.sum(x_tile(k, i, 1).astype(jnp.float32) * w, axis=1) for i, acc in enumerate(accs))

    accs = lax.fori_loop(0, n_k, body, tuple(jnp.zeros((block_n,), jnp.float32) for _ in range(rows)))
    for i, acc in enumerate(accs):
        o_ref[pl.ds(i, 1), :] = acc[None, :].astype(o_ref.dtype)


def _gemm_kernel(x_ref, *refs, fmt, tiles, block_k, n_k, compute_dtype):
    *plane_refs, o_ref = refs

    def body(k, acc):
        x = x_ref[:, pl.ds(k * block_k, block_k)].astype(compute_dtype)
        return acc + _dot(x, _weight_tile(plane_refs, tiles, k, fmt, compute_dtype), compute_dtype)

    o_ref[...] = lax.fori_loop(0, n_k, body, jnp.zeros(o_ref.shape, jnp.float32)).astype(o_ref.dtype)


def _call(x, planes, n_rows, *, fmt, tiling: TritonTiling, compute_dtype, out_dtype, interpret):
    (m, k), bm, bn, bk = x.shape, tiling.block_m, tiling.block_n, tiling.block_k
    tiles = plane_tiles(fmt, bk, k, lane=None)
    decode = m <= DECODE_ROWS
    kernel = functools.partial(_gemv_kernel if decode else _gemm_kernel, fmt=fmt, tiles=tiles, block_k=bk,
                               n_k=k // bk, compute_dtype=compute_dtype)
    in_specs = [pl.BlockSpec((bm, k), lambda i, j: (i, 0))]
    in_specs += [pl.BlockSpec((bn, planes[t.name].shape[1]), lambda i, j: (j, 0)) for t in tiles]
    return pl.pallas_call(
        kernel,
        grid=(m // bm, n_rows // bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n_rows), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name=f"q{'gemv' if decode else 'gemm'}_{fmt.lower()}_triton",
    )(x, *(planes[t.name] for t in tiles))


def matmul(x: jax.Array, w: QTensor, *, tiling: TritonTiling, compute_dtype, out_dtype, interpret=False) -> jax.Array:
    """x [M, K] @ dequant(w)^T -> [M, N] in out_dtype (inputs validated by the caller)."""
    m = x.shape[0]
    mp = round_up(m, tiling.block_m)
    xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    call = functools.partial(_call, xp, fmt=w.fmt, tiling=tiling, compute_dtype=jnp.dtype(compute_dtype),
                             out_dtype=jnp.dtype(out_dtype), interpret=interpret)
    return with_row_tail(call, w, tiling.block_n)[:m]
