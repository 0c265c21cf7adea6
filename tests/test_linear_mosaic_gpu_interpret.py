"""The Mosaic GPU backend in the Mosaic GPU interpreter on CPU: the shared cases (`LinearTests`), races, the
tile edges and steps of part of a unit or several (`pallas_kernels.mosaic_gpu`'s prefill GEMM).

The interpreter runs about 0.1 s per pipeline step, so the cases keep K to one or two pipeline steps and
the rows to the edge between the two kernels; N is never a multiple of the 128-row tile. It runs a CTA's
warpgroups as programs on XLA's CPU client, all blocking on each other's barriers while their caller waits
in a callback: they need as many threads of the client's pool (one per CPU device, at least one per core),
or they may wait forever (three hangs seen on two cores with one device, beside other work). So where this
process's pool is too small for one compute warpgroup (`mosaic_gpu._interpreter_fits()`: not on CI's two
cores), the module is skipped here and test_linear_mosaic_gpu.py runs it in a process of four CPU devices.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import DECODE_ROWS, mosaic_gpu
from pallas_kernels.mosaic_gpu import MosaicGpuTiling, gemm, tiling_for
from realm_jax.quant import dequantize, quantize
from helpers import assert_matmul_close, random_qtensor
from linear_base import BF16, LinearTests

if not mosaic_gpu._interpreter_fits():
    pytest.skip(f"the Mosaic GPU interpreter needs 3 threads of XLA's CPU client and this process has "
                f"{mosaic_gpu._interpreter_threads()}: test_linear_mosaic_gpu.py runs this module in a process of four "
                "CPU devices", allow_module_level=True)


class TestMosaicGpuInterpret(LinearTests):
    BACKEND = "mosaic_gpu"
    ROWS = (DECODE_ROWS, DECODE_ROWS + 1)  # the reference up to DECODE_ROWS rows, wgmma past it
    K_BLOCKS = (1, 2)
    N = 130  # two 128-row tiles, the second ragged


def test_no_races_in_a_persistent_loop(rng):
    """The stores of the dequantized tile into two buffers, the inputs released a step late and the
    persistent loop (two CTAs over three tiles, eight steps each, four in flight) are race-free (the
    detector raises)."""
    w, x = random_qtensor("Q4_K", 130, 512, rng), jnp.asarray(rng.standard_normal((130, 512)), jnp.float32)
    t = tiling_for("Q4_K", 130, 130, 512)
    assert (t.w_buffers, t.max_concurrent_steps) == (2, 4), t
    t = dataclasses.replace(t, compute_wgs=1, block_m=64)  # three row tiles
    y = gemm(x, w, compute_dtype=BF16, out_dtype=jnp.float32, tiling=t, ctas=2,
             interpret=plgpu.InterpretGPUParams(detect_races=True))
    assert_matmul_close(y, x, dequantize(w), compute_dtype=BF16, out_dtype=jnp.float32)


@pytest.mark.parametrize("fmt,m", [("Q4_K", 63), ("Q8_0", 65), ("Q6_K", 128), ("Q5_0", 129)])
def test_rows_around_the_tile_edges(fmt, m, rng):
    """x's rows just under, at and past a 64-row and a 128-row tile (the default tiling's block_m), N ragged."""
    w, x = random_qtensor(fmt, 200, 256, rng), jnp.asarray(rng.standard_normal((m, 256)), jnp.float32)
    y = gemm(x, w, compute_dtype=BF16, out_dtype=jnp.float32, interpret=True)
    assert y.shape == (m, 200)
    assert_matmul_close(y, x, dequantize(w), compute_dtype=BF16, out_dtype=jnp.float32)


@pytest.mark.parametrize("fmt,block_k", [("Q4_K", 128), ("Q6_K", 256), ("Q4_0", 256)])
def test_steps_of_part_of_a_unit_or_several_units(fmt, block_k, rng):
    """A step of half a k-quant unit (each plane kept per chunk read in part), of a whole one, of eight
    32-element blocks: the same product as the default one-chunk steps."""
    w, x = random_qtensor(fmt, 130, 512, rng), jnp.asarray(rng.standard_normal((64, 512)), jnp.float32)
    t = dataclasses.replace(tiling_for(fmt, 64, 130, 512), block_k=block_k, max_concurrent_steps=2, compute_wgs=1,
                            w_buffers=1 if block_k > 128 else 2)
    y = gemm(x, w, compute_dtype=BF16, out_dtype=jnp.float32, tiling=t, interpret=True)
    assert_matmul_close(y, x, dequantize(w), compute_dtype=BF16, out_dtype=jnp.float32)


def test_gemm_on_a_real_quantization_with_an_explicit_tiling():
    """Weights quantized by realm-jax (not random bytes), two 256-row tiles, the second ragged."""
    rng = np.random.default_rng(3)
    w = quantize(jnp.asarray(rng.standard_normal((300, 512)) * 0.05, jnp.float32), "Q5_1")
    x = jnp.asarray(rng.standard_normal((20, 512)), jnp.bfloat16)
    y = gemm(x, w, tiling=MosaicGpuTiling(block_n=256, block_k=128, block_m=64), interpret=True)
    assert_matmul_close(y, x, dequantize(w), compute_dtype=BF16, out_dtype=BF16)
