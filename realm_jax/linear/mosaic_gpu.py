"""The Mosaic GPU backend (Hopper): `pallas_kernels.mosaic_gpu`'s wgmma GEMM for prefill (more than
`pallas_kernels.tiling.DECODE_ROWS` rows under a 16-bit compute dtype), on the weight's lane planes as the
`triton` backend lays them out at load (`pallas_kernels.decode_layout`: one layout for every GPU kernel,
no copy of the weight per call). Fewer rows, f32 compute, and a K the kernel's steps do not divide go to
the XLA reference on the lanes (the decode kernels are the `triton` backend's).

It shares the `triton` backend's weight handling (its placement on a mesh with per-shard kernels, its
fused weights, its layers read in place from a stack); only the paths differ: "mosaic" and "xla", chosen
per device kind and format where `benchmarks/kernels.py` has measured them (`realm_jax.linear.routes`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp

from realm_jax.linear.pallas import KERNEL_FORMATS
from realm_jax.linear.triton import LanesWeight, Triton, _interpret

__all__ = ["MOSAIC_GPU", "MosaicGpu", "MosaicLanesWeight"]

_WGMMA = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["lanes", "layer"],
                   meta_fields=["fmt", "shape", "axes"])
@dataclasses.dataclass(frozen=True, repr=False)
class MosaicLanesWeight(LanesWeight):
    """The Mosaic GPU backend's weight: the lane planes of `LanesWeight`, multiplied by this backend."""

    backend: ClassVar[str] = "mosaic_gpu"


class MosaicGpu(Triton):
    name = "mosaic_gpu"
    formats = KERNEL_FORMATS
    max_rows = None
    paths = ("mosaic", "xla")
    weight_type = MosaicLanesWeight

    def path(self, fmt: str, m: int, compute_dtype, device_kind: str | None = None) -> str:
        """"mosaic" past DECODE_ROWS rows of x under a 16-bit compute dtype, else "xla"; a measured route
        (`routes`) wins where the table has one."""
        from pallas_kernels.tiling import DECODE_ROWS

        if jnp.dtype(compute_dtype) not in _WGMMA:
            return "xla"
        return self.measured_path(fmt, m, device_kind) or ("mosaic" if m > DECODE_ROWS else "xla")

    def matmul_path(self, x, w: LanesWeight, path: str, *, compute_dtype, out_dtype,
                    interpret: bool | None = None) -> jax.Array:
        from pallas_kernels import mosaic_gpu

        if path != "mosaic" or not mosaic_gpu.supports(w.fmt, w.shape[1]):
            return super().matmul_path(x, w, "xla", compute_dtype=compute_dtype, out_dtype=out_dtype,
                                       interpret=interpret)
        y = mosaic_gpu.gemm_lanes(x, w.layer_lanes(), fmt=w.fmt, compute_dtype=compute_dtype, out_dtype=out_dtype,
                                  interpret=_interpret(interpret))
        return y[:, : w.shape[0]]  # out_dtype from the kernel: no f32 [M, N] written and read again

    def decode_attention(self, q, k_cache, v_cache, scores_dtype):
        """None: XLA's attention (the decode kernels, attention's included, are the `triton` backend's)."""
        return None

    def describe(self, w=None) -> str:
        from pallas_kernels.tiling import DECODE_ROWS

        mode = " (interpret mode)" if jax.default_backend() == "cpu" else ""
        return (f"mosaic_gpu{mode}: wgmma GEMM on the lanes (more than {DECODE_ROWS} rows, 16-bit compute), "
                f"xla (fewer)")


MOSAIC_GPU = MosaicGpu()
