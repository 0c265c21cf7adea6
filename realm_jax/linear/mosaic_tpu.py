"""The Mosaic TPU backend: `pallas_kernels.tpu`'s one kernel body for both families (decode and prefill),
tiled by `pallas_kernels.tiling.choose_tiling`. On a CPU it runs in interpret mode: `impl="pallas"` there
checks the kernels against the reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from realm_jax.linear.pallas import KERNEL_FORMATS, PallasBackend
from realm_jax.quant import QTensor

__all__ = ["MOSAIC_TPU", "MosaicTpu"]


@functools.partial(jax.jit, static_argnames=("compute_dtype", "out_dtype", "interpret"))
def _matmul(x, w: QTensor, compute_dtype, out_dtype, interpret: bool) -> jax.Array:
    from pallas_kernels import tpu
    from pallas_kernels.tiling import choose_tiling

    tiling = choose_tiling("tpu", w.fmt, x.shape[0], w.shape[0], x.shape[1])
    return tpu.matmul(x, w, tiling=tiling, compute_dtype=compute_dtype, out_dtype=out_dtype, interpret=interpret)


class MosaicTpu(PallasBackend):
    name = "mosaic_tpu"
    platforms = ("tpu",)
    # the kernel body takes any tile function Mosaic TPU lowers: the shared formats, the 2- and 3-bit
    # k-quants and the 16-value codebooks (IQ4_NL, IQ4_XS, MXFP4: `quant.common.lookup16`, selects)
    formats = KERNEL_FORMATS | {"Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "MXFP4"}

    def kernel(self, x, w, *, compute_dtype, out_dtype, interpret):
        return _matmul(x, w, jnp.dtype(compute_dtype), jnp.dtype(out_dtype), interpret)


MOSAIC_TPU = MosaicTpu()
