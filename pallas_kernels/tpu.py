"""The fused dequant-matmul on TPU (Mosaic): both families, decode and prefill, on one kernel body.

Grid (M / block_m, N / block_n, K / block_k), K innermost: each step dequantizes one [block_n, block_k]
weight tile with the format's tile function (realm_jax.quant) into the compute dtype and feeds it to the
MXU against an x tile, accumulating in an f32 VMEM scratch. Decode (M <= 16) is the same kernel with one
block of rows, so the weight streams through VMEM exactly once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.layout import PlaneTile, plane_tiles, with_row_tail
from pallas_kernels.tiling import TpuTiling, round_up
from realm_jax.quant import QTensor, dequantize_tile

__all__ = ["matmul"]

_NT = (((1,), (1,)), ((), ()))  # x [m, k] . w [n, k] -> [m, n]


def _kernel(x_ref, *refs, fmt: str, tiles: tuple[PlaneTile, ...], compute_dtype):
    *plane_refs, o_ref, acc_ref = refs
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    planes = {t.name: (r[:, k, :] if t.whole_row else r[...]) for t, r in zip(tiles, plane_refs)}
    w = dequantize_tile(fmt, planes, dtype=compute_dtype)  # [block_n, block_k]
    x = x_ref[...].astype(compute_dtype)
    precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None
    acc_ref[...] += lax.dot_general(x, w, _NT, precision=precision, preferred_element_type=jnp.float32)

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _call(x, planes, n_rows, *, fmt, k, tiling: TpuTiling, compute_dtype, out_dtype, interpret):
    bm, bn, bk = tiling.block_m, tiling.block_n, tiling.block_k
    tiles = plane_tiles(fmt, bk, k, lane=128)
    in_specs = [pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk))]
    args = [x]
    for t in tiles:
        p = planes[t.name]
        if t.whole_row:
            in_specs.append(pl.BlockSpec((bn, k // bk, t.width), lambda i, j, kk: (j, 0, 0)))
            args.append(p.reshape(p.shape[0], k // bk, t.width))
        else:
            in_specs.append(pl.BlockSpec((bn, t.width), lambda i, j, kk: (j, kk)))
            args.append(p)
    m = x.shape[0]
    return pl.pallas_call(
        functools.partial(_kernel, fmt=fmt, tiles=tiles, compute_dtype=compute_dtype),
        grid=(m // bm, n_rows // bn, k // bk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n_rows), out_dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=f"qmatmul_{fmt.lower()}_tpu",
    )(*args)


def matmul(x: jax.Array, w: QTensor, *, tiling: TpuTiling, compute_dtype, out_dtype, interpret=False) -> jax.Array:
    """x [M, K] @ dequant(w)^T -> [M, N] in out_dtype (inputs validated by the caller)."""
    m, k = x.shape
    mp = round_up(m, tiling.block_m)
    xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    call = functools.partial(_call, xp, fmt=w.fmt, k=k, tiling=tiling, compute_dtype=jnp.dtype(compute_dtype),
                             out_dtype=jnp.dtype(out_dtype), interpret=interpret)
    return with_row_tail(call, w, tiling.block_n)[:m]
