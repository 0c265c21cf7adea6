"""The Mosaic TPU backend (`realm_jax.linear.mosaic_tpu`, kernels in `pallas_kernels.tpu`): the shared cases
in interpret mode on CPU, lowering for TPU at real shapes, and the TPU tile rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import DECODE_ROWS, TpuTiling, choose_tiling, tpu
from realm_jax.errors import ShapeMismatchError
from realm_jax.quant import dequantize
from helpers import assert_matmul_close, random_qtensor
from linear_base import F32, LinearTests, LoweringTests, tiling_grid


class TestMosaicTpuInterpret(LinearTests):
    BACKEND = "mosaic_tpu"
    ROWS = (1, 7, DECODE_ROWS, DECODE_ROWS + 1, 64)  # one block of rows up to DECODE_ROWS (decode)


class TestMosaicTpuLowering(LoweringTests):
    BACKEND = "mosaic_tpu"
    CUSTOM_CALLS = ("tpu_custom_call",)

    def lower(self, fn, x, w) -> str:
        return jax.export.export(jax.jit(fn), platforms=["tpu"])(x, w).mlir_module()


@pytest.mark.parametrize("fmt,m", [("Q4_K", 1), ("Q6_K", 7), ("Q5_0", 16), ("Q8_0", 40), ("Q5_K", 256)])
def test_no_out_of_bounds_reads(fmt, m, rng):
    """The ragged tail is padded, never read past: the checking interpreter raises on any such read."""
    k = 1024
    w, x = random_qtensor(fmt, 200, k, rng), jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    tiling = choose_tiling("tpu", fmt, m, 200, k)
    y = tpu.matmul(x, w, tiling=tiling, compute_dtype=F32, out_dtype=F32,
                   interpret=pltpu.InterpretParams(out_of_bounds_reads="raise"))
    assert_matmul_close(y, x, dequantize(w), compute_dtype=F32, out_dtype=F32)


def test_explicit_tiling_and_one_k_tile(rng):
    w = random_qtensor("Q8_0", 130, 640, rng)  # K=640: no 256-multiple divides it, one K tile
    x = jnp.asarray(rng.standard_normal((3, 640)), jnp.float32)
    for tiling in (choose_tiling("tpu", "Q8_0", 3, 130, 640), TpuTiling(block_m=8, block_n=128, block_k=128)):
        y = tpu.matmul(x, w, tiling=tiling, compute_dtype=F32, out_dtype=F32, interpret=True)
        assert_matmul_close(y, x, dequantize(w), compute_dtype=F32, out_dtype=F32)


def test_tiling_heuristic_obeys_the_tile_rules():
    for fmt, block, m, n, k in tiling_grid():
        if k % block:
            with pytest.raises(ShapeMismatchError, match="block_size"):
                choose_tiling("tpu", fmt, m, n, k)
            continue
        t = choose_tiling("tpu", fmt, m, n, k)
        assert k % t.block_k == 0 and t.block_k % block == 0 and t.block_m % 8 == 0 and t.block_n % 128 == 0
        assert t.block_m >= m if m <= DECODE_ROWS else t.block_m <= 256
