"""Tile sizes for the fused dequant-matmul kernels: one frozen config per backend, one heuristic.

Legend: M rows of x, N rows of the weight (outputs), K the contraction; every block covers whole
quantization blocks along K.

Backend tile rules the heuristic satisfies (checked by lowering in tests/test_linear_mosaic_tpu.py):
- TPU (Mosaic): the last two dims of every block are divisible by (8, 128) or equal the array's. Planes
  whose per-tile width is not a multiple of 128 (the per-block scales) travel as whole rows instead (see
  `pallas_kernels.layout`), so block_k only has to divide K.
(The Triton decode kernel tiles itself: `pallas_kernels.decode.tiling_for`; Mosaic GPU's tile rules live
with its kernels: `pallas_kernels.mosaic_gpu.tiling_for`.)
"""

from __future__ import annotations

import dataclasses

from realm_jax.errors import ShapeMismatchError
from realm_jax.quant import get_format

__all__ = ["DECODE_ROWS", "TpuTiling", "choose_tiling", "round_up"]

# Up to this many rows of x the decode (GEMV) family runs; above it, the prefill (GEMM) family.
DECODE_ROWS = 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class TpuTiling:
    """Grid (M / block_m, N / block_n, K / block_k), K innermost, an f32 accumulator in VMEM."""

    block_m: int
    block_n: int
    block_k: int


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _largest_dividing(k: int, candidates) -> int | None:
    return next((c for c in candidates if k % c == 0), None)


def choose_tiling(backend: str, fmt: str, m: int, n: int, k: int):
    """The tiling for a matmul of x [m, k] with a (n, k) weight in `fmt` on `backend` ("tpu", or
    "mosaic_gpu", whose prefill kernel's tile rules live with it: `mosaic_gpu.tiling_for`).

    Decode (m <= DECODE_ROWS) keeps every row of x in one block, so each weight byte is read once; prefill
    tiles M too. K tiles of 2048 (TPU) amortize the per-step overhead over ~1 MiB of Q4_K weight per 256
    rows.
    """
    f = get_format(fmt)
    if k % f.block_size:
        raise ShapeMismatchError(f"choose_tiling: K={k} must be a multiple of {fmt}'s block_size={f.block_size}")
    decode = m <= DECODE_ROWS
    if backend == "tpu":
        block_m = round_up(m, 8) if decode else (256 if m >= 256 else round_up(m, 8))
        block_n = 256 if n >= 256 and not decode else 128
        # Multiples of 256 keep every 2-D plane tile lane-aligned; a K with none of them runs in one tile.
        block_k = _largest_dividing(k, (2048, 1024, 512, 256)) or k
        return TpuTiling(block_m=block_m, block_n=block_n, block_k=block_k)
    if backend == "mosaic_gpu":
        from pallas_kernels.mosaic_gpu import tiling_for

        return tiling_for(fmt, m, n, k)
    raise ValueError(f"choose_tiling: backend={backend!r} must be 'tpu' or 'mosaic_gpu'")
