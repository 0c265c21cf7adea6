"""The Mosaic GPU backend (Hopper): `pallas_kernels.mosaic_gpu`'s FMA GEMV for decode (up to
`pallas_kernels.tiling.DECODE_ROWS` rows) and its wgmma GEMM for prefill."""

from __future__ import annotations

import jax.numpy as jnp

from realm_jax.linear.pallas import PallasBackend

__all__ = ["MOSAIC_GPU", "MosaicGpu"]


class MosaicGpu(PallasBackend):
    name = "mosaic_gpu"
    platforms = ("gpu",)

    def kernel(self, x, w, *, compute_dtype, out_dtype, interpret):
        from pallas_kernels import mosaic_gpu
        from pallas_kernels.tiling import DECODE_ROWS

        kernel = mosaic_gpu.gemv if x.shape[0] <= DECODE_ROWS else mosaic_gpu.gemm
        return kernel(x, w, compute_dtype=jnp.dtype(compute_dtype), out_dtype=jnp.dtype(out_dtype),
                      interpret=interpret)


MOSAIC_GPU = MosaicGpu()
