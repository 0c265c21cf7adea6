"""Fused dequant-matmul kernels in Pallas: y = x @ dequant(w)^T with w kept quantized in device memory.

One kernel body per backend, each calling the format's tile function from `realm_jax.quant` (one
definition of the math), and two families chosen by the number of rows of x: decode (M <= DECODE_ROWS,
a GEMV that streams the weight once) and prefill (a GEMM on the tensor cores / MXU):

    tpu          Mosaic TPU (`pallas_kernels.tpu.matmul`, both families on one body)
    triton       the Pallas Triton GPU backend (`pallas_kernels.triton.matmul`)
    mosaic_gpu   Mosaic GPU for Hopper: plgpu.kernel, wgmma (`pallas_kernels.mosaic_gpu.gemv` / `gemm`)

Tiles come from one heuristic (`pallas_kernels.tiling.choose_tiling`). On a CPU the kernels run in
interpret mode, which is how the test suite checks them against the XLA reference.

The kernels are the bodies of the linear layer's Pallas backends (`realm_jax.linear.triton`,
`mosaic_gpu`, `mosaic_tpu`), which declare the formats they serve, validate the inputs and run a kernel
per shard on a mesh: use `realm_jax.linear` (or `realm_jax.qmatmul(x, w, impl=...)`) rather than the
kernels directly. This package imports `realm_jax.quant` for the format math (and `realm_jax.errors`),
nothing above it.
"""

from __future__ import annotations

import warnings

from pallas_kernels.tiling import DECODE_ROWS, TpuTiling, TritonTiling, choose_tiling

__all__ = ["DECODE_ROWS", "TpuTiling", "TritonTiling", "choose_tiling"]

# Lowering a Triton kernel warns that the backend is deprecated, once per kernel; realm-jax knows (see
# pallas_kernels.triton) and does not repeat it to its users.
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning)
