"""The Pallas Triton backend (GPU): `pallas_kernels.triton`'s decode GEMV and prefill GEMM, tiled by
`pallas_kernels.tiling.choose_tiling`. JAX has deprecated the Pallas Triton lowering (Mosaic GPU is the
maintained one); every lowering warns so, and `pallas_kernels` filters that one warning."""

from __future__ import annotations

from realm_jax.linear.pallas import PallasBackend

__all__ = ["TRITON", "Triton"]


class Triton(PallasBackend):
    name = "triton"
    platforms = ("gpu",)
    kernels = "triton"


TRITON = Triton()
