"""The Mosaic TPU backend: `pallas_kernels.tpu`'s one kernel body for both families (decode and prefill),
tiled by `pallas_kernels.tiling.choose_tiling`. On a CPU it runs in interpret mode: `impl="pallas"` there
checks the kernels against the reference."""

from __future__ import annotations

from realm_jax.linear.pallas import PallasBackend

__all__ = ["MOSAIC_TPU", "MosaicTpu"]


class MosaicTpu(PallasBackend):
    name = "mosaic_tpu"
    platforms = ("tpu",)
    kernels = "tpu"


MOSAIC_TPU = MosaicTpu()
