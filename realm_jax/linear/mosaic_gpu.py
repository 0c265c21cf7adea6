"""The Mosaic GPU backend (Hopper): `pallas_kernels.mosaic_gpu`'s wgmma GEMM for prefill (more than
`pallas_kernels.tiling.DECODE_ROWS` rows under a 16-bit compute dtype). Fewer rows and f32 compute go to
the XLA reference on the planes as stored (the decode GEMV is the `triton` backend's)."""

from __future__ import annotations

import jax.numpy as jnp

from realm_jax.linear.base import xla_matmul
from realm_jax.linear.pallas import PallasBackend

__all__ = ["MOSAIC_GPU", "MosaicGpu"]

_WGMMA = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class MosaicGpu(PallasBackend):
    name = "mosaic_gpu"
    platforms = ("gpu",)

    def kernel_rows(self, m: int, compute_dtype, fmt: str | None = None) -> bool:
        """Whether m rows of x under `compute_dtype` go to the GEMM (else the reference)."""
        from pallas_kernels.tiling import DECODE_ROWS

        return m > DECODE_ROWS and jnp.dtype(compute_dtype) in _WGMMA

    def kernel(self, x, w, *, compute_dtype, out_dtype, interpret):
        from pallas_kernels import mosaic_gpu

        if not self.kernel_rows(x.shape[0], compute_dtype):
            return xla_matmul(x, w, compute_dtype, out_dtype)
        return mosaic_gpu.gemm(x, w, compute_dtype=jnp.dtype(compute_dtype), out_dtype=jnp.dtype(out_dtype),
                               interpret=interpret)

    def describe(self, w=None) -> str:
        from pallas_kernels.tiling import DECODE_ROWS

        return f"{super().describe(w)} wgmma GEMM (more than {DECODE_ROWS} rows, 16-bit compute), xla (fewer)"


MOSAIC_GPU = MosaicGpu()
