"""Fused dequant-matmul kernels in Pallas: y = x @ dequant(w)^T with w kept quantized in device memory.

Kernel families chosen by the number of rows of x: decode (a few rows, a GEMV that streams the weight
once) and prefill (a GEMM on the tensor cores / MXU); on a GPU the linear layer's routes table picks per
device kind, format and rows of x (`realm_jax.linear.routes`):

    decode       the Pallas Triton GPU decode GEMV (`pallas_kernels.decode.gemv`) on the weight in its lane
                 layout (`pallas_kernels.decode_layout`, made at load), activations quantized to int16 per
                 32 values, integer dot products (dp2a) on the packed codes: a few rows of x
    lanesdot     the Pallas Triton GPU decode GEMM on the tensor cores for Q4_K, Q5_K and Q6_K (`lanesdot`)
                 on the same lanes: one dot per 16 codes of a sub-block, the codes fed to the mma.sync from
                 registers, the scales applied to the dots' outputs: 3-16 rows of x
    mma          the Pallas Triton GPU GEMM on the tensor cores (`pallas_kernels.mma.gemm`) on the same
                 lanes: each weight dequantized once in registers for all the rows of x a program holds (up
                 to 64 in one tile for decode, tiles of 128 for prefill; mma, wgmma)
    blockdot     the Pallas Triton GPU decode GEMM on the tensor cores for Q4_0, Q4_1 and Q4_K
                 (`pallas_kernels.blockdot.gemm`) on a layout of its own (block planes: the codes of a row
                 contiguous along K), one dot a quantization block, the codes fed to the wgmma from registers:
                 1-16 rows of x (the `triton_blocks` backend, a candidate beside the two above)
    tpu          Mosaic TPU (`pallas_kernels.tpu.matmul`), both families on one body that calls the
                 format's tile function from `realm_jax.quant`
    mosaic_gpu   the Mosaic GPU prefill GEMM for Hopper: plgpu.kernel, wgmma (`pallas_kernels.mosaic_gpu`), on the
                 same lanes, evaluating the Triton GEMM's dequantization row by row; a persistent grid, a TMA
                 warpgroup and one or two compute warpgroups, double-buffered dequantized tiles

Tiles come from one heuristic per kernel family. On a CPU the kernels run in interpret mode, which is how
the test suite checks them against the XLA reference.

The kernels are the bodies of the linear layer's Pallas backends (`realm_jax.linear.triton`, `blocks`,
`mosaic_gpu`, `mosaic_tpu`), which declare the formats they serve, lay out and validate the inputs and run
a kernel per shard on a mesh: use `realm_jax.linear` (or `realm_jax.qmatmul(x, w, impl=...)`) rather than
the kernels directly. This package imports `realm_jax.quant` for the format math (and `realm_jax.errors`),
nothing above it.
"""

from __future__ import annotations

import warnings

from pallas_kernels.tiling import DECODE_ROWS, TpuTiling, choose_tiling

__all__ = ["DECODE_ROWS", "TpuTiling", "choose_tiling"]

# Lowering a Triton kernel warns that the backend is deprecated, once per kernel; realm-jax knows (see
# pallas_kernels.decode) and does not repeat it to its users.
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning)
