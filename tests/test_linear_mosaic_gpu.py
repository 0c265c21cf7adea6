"""The Mosaic GPU backend (`realm_jax.linear.mosaic_gpu`, its prefill GEMM in `pallas_kernels.mosaic_gpu`;
up to 16 rows and f32 compute, the XLA reference): the shared cases in the Mosaic GPU interpreter on CPU,
lowering for CUDA (an abstract H100) at real shapes, races, and its tilings.

The interpreter runs about 0.1 s per pipeline step, so the cases keep K to one or two pipeline steps and
the rows to the edge between the two kernels; N is never a multiple of the 128-row tile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_kernels import DECODE_ROWS, mosaic_gpu
from pallas_kernels.mosaic_gpu import MosaicGpuTiling, gemm, tiling_for
from realm_jax.errors import DTypeError, UnsupportedFormatError
from realm_jax.linear.pallas import KERNEL_FORMATS
from realm_jax.quant import dequantize, quantize
from helpers import assert_matmul_close, random_qtensor
from linear_base import BF16, LinearTests, LoweringTests

_H100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3",
                                                                   num_cores=132, platform="gpu"))


class TestMosaicGpuInterpret(LinearTests):
    BACKEND = "mosaic_gpu"
    ROWS = (DECODE_ROWS, DECODE_ROWS + 1)  # the reference up to DECODE_ROWS rows, wgmma past it
    K_BLOCKS = (1, 2)
    N = 130  # two 128-row tiles, the second ragged


class TestMosaicGpuLowering(LoweringTests):
    BACKEND = "mosaic_gpu"
    CUSTOM_CALLS = ("mosaic_gpu_v2",)
    ROWS = (1, DECODE_ROWS + 1, 512)  # the reference, then the GEMM (1-3 s a lowering)
    SHAPES = ((4096, 4096), (4096, 14336))

    def lower(self, fn, x, w) -> str:
        with use_abstract_mesh(_H100):
            return jax.jit(fn).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()


def test_no_races(rng):
    """The staging of the dequantized tile and the pipelined reads are race-free (the detector raises)."""
    w, x = random_qtensor("Q4_K", 130, 512, rng), jnp.asarray(rng.standard_normal((64, 512)), jnp.float32)
    y = gemm(x, w, compute_dtype=BF16, out_dtype=jnp.float32,
             interpret=plgpu.InterpretGPUParams(detect_races=True))
    assert_matmul_close(y, x, dequantize(w), compute_dtype=BF16, out_dtype=jnp.float32)


@pytest.mark.parametrize("fmt,block_k", [("Q4_K", 128), ("Q6_K", 256), ("Q5_0", 256)])
def test_steps_of_part_of_a_unit_or_several_units(fmt, block_k, rng):
    """A step of half a k-quant unit (each plane kept per chunk read in part), of a whole one, of eight
    32-element blocks: the same product as the default one-chunk steps."""
    w, x = random_qtensor(fmt, 130, 512, rng), jnp.asarray(rng.standard_normal((64, 512)), jnp.float32)
    t = dataclasses.replace(tiling_for(fmt, 64, 130, 512), block_k=block_k, max_concurrent_steps=2)
    y = gemm(x, w, compute_dtype=BF16, out_dtype=jnp.float32, tiling=t, interpret=True)
    assert_matmul_close(y, x, dequantize(w), compute_dtype=BF16, out_dtype=jnp.float32)


def test_gemm_on_a_real_quantization_with_an_explicit_tiling():
    """Weights quantized by realm-jax (not random bytes), two 256-row tiles, the second ragged."""
    rng = np.random.default_rng(3)
    w = quantize(jnp.asarray(rng.standard_normal((300, 512)) * 0.05, jnp.float32), "Q5_1")
    x = jnp.asarray(rng.standard_normal((20, 512)), jnp.bfloat16)
    y = gemm(x, w, tiling=MosaicGpuTiling(block_n=256, block_k=128, block_m=64), interpret=True)
    assert_matmul_close(y, x, dequantize(w), compute_dtype=BF16, out_dtype=BF16)


@pytest.mark.parametrize("fmt", sorted(KERNEL_FORMATS))
def test_heuristic_tilings_are_valid(fmt):
    for m, n, k in ((17, 4096, 4096), (512, 4096, 14336), (64, 100, 256)):
        t = tiling_for(fmt, m, n, k)
        t.check(fmt)
        assert mosaic_gpu._gemm_smem_bytes(fmt, t, BF16) <= mosaic_gpu._SMEM_BYTES


def test_bad_tilings_raise():
    with pytest.raises(ValueError, match="block_k"):
        MosaicGpuTiling(block_k=100).check("Q4_0")
    with pytest.raises(ValueError, match="divide"):
        MosaicGpuTiling(block_k=192).check("Q4_K")  # neither whole units nor a part of one
    with pytest.raises(ValueError, match="units"):
        MosaicGpuTiling(block_k=128).check("Q3_K")  # its bit fields need the whole unit
    MosaicGpuTiling(block_k=128).check("Q4_K")  # half a unit a step
    with pytest.raises(ValueError, match="TMA"):
        MosaicGpuTiling(block_k=32 * 512).check("Q8_0")  # 512 units of the lanes in one copy
    with pytest.raises(ValueError, match="block_n"):
        MosaicGpuTiling(block_n=64).check("Q4_0")
    with pytest.raises(TypeError):
        MosaicGpuTiling(128)  # keyword-only
    w = random_qtensor("Q8_0", 128, 512, np.random.default_rng(0))
    with pytest.raises(ValueError, match="shared memory"):
        gemm(jnp.ones((128, 512), jnp.bfloat16), w, tiling=MosaicGpuTiling(block_m=128, max_concurrent_steps=4))


def test_unsupported_inputs_raise():
    dense = quantize(jnp.ones((128, 256)), "F16")
    with pytest.raises(UnsupportedFormatError, match="F16"):
        gemm(jnp.ones((64, 256)), dense)
    w = random_qtensor("Q4_0", 128, 256, np.random.default_rng(0))
    with pytest.raises(DTypeError, match="compute_dtype"):
        gemm(jnp.ones((64, 256)), w, compute_dtype=jnp.int8)
    with pytest.raises(DTypeError, match="wgmma"):
        gemm(jnp.ones((64, 256)), w, compute_dtype=jnp.float32)


def test_tiling_is_hashable_and_frozen():
    t = MosaicGpuTiling()
    hash(t)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.block_n = 256
