"""The Mosaic GPU backend (`realm_jax.linear.mosaic_gpu`, its prefill GEMM in `pallas_kernels.mosaic_gpu`;
up to 16 rows and f32 compute, the XLA reference): the shared cases in the Mosaic GPU interpreter on CPU,
lowering for CUDA (an abstract H100) at real shapes, races, and its tilings.

The interpreter runs about 0.1 s per pipeline step, so the cases keep K to one or two pipeline steps and
the rows to the edge between the two kernels; N is never a multiple of the 128-row tile. It runs a CTA's
warpgroups as programs on XLA's CPU client, which runs about one at a time per CPU device: this process
has one, so its cases take one compute warpgroup (with the TMA warpgroup, two programs), and the kernel's
two compute warpgroups run in a process of its own with four devices.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys

import background
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


# Two compute warpgroups (and the TMA one) in a process with four CPU devices: Q4_K and Q8_0 (rows of the
# lanes in 256s: the default tiling's two warpgroups), four tiles over three CTAs, each tile eight steps
# with the inputs released a step late, bf16 out through the shared-memory epilogue; the race detector
# on; Q6_K with one dequantized tile a warpgroup.
_TWO_WARPGROUPS = """
import dataclasses, json, sys
sys.path[:0] = sys.argv[1:]
import jax.numpy as jnp, numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu
from pallas_kernels.mosaic_gpu import gemm, tiling_for
from realm_jax.quant import dequantize
from helpers import assert_matmul_close, random_qtensor
rng, out = np.random.default_rng(5), []
for fmt, n, m, bufs in (("Q4_K", 500, 200, 2), ("Q8_0", 256, 130, 2), ("Q6_K", 384, 70, 1)):
    w, x = random_qtensor(fmt, n, 512, rng), jnp.asarray(rng.standard_normal((m, 512)), jnp.float32)
    t = dataclasses.replace(tiling_for(fmt, m, 512, 512), compute_wgs=2, w_buffers=bufs, block_m=64 + 64 * (m > 180),
                            max_concurrent_steps=3)
    y = gemm(x, w, compute_dtype=jnp.bfloat16, out_dtype=jnp.bfloat16, tiling=t, ctas=3,
             interpret=plgpu.InterpretGPUParams(detect_races=True))
    assert y.dtype == jnp.bfloat16
    assert_matmul_close(y, x, dequantize(w), compute_dtype=jnp.bfloat16, out_dtype=jnp.bfloat16)
    out.append([fmt, t.compute_wgs, t.w_buffers])
print(json.dumps(out))
"""


@background.job(__file__, "two_warpgroups")
def _two_warpgroups_job():
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    return [sys.executable, "-c", _TWO_WARPGROUPS, os.path.dirname(here), here], env, 600


@pytest.fixture(scope="module")
def two_warpgroups():
    proc = background.result(__file__, "two_warpgroups")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_compute_warpgroups_in_a_persistent_loop(two_warpgroups):
    assert two_warpgroups == [["Q4_K", 2, 2], ["Q8_0", 2, 2], ["Q6_K", 2, 1]]


def test_two_compute_warpgroups_need_as_many_interpreter_devices(rng):
    """In this one-device process, the default tiling takes one compute warpgroup; an explicit two raises
    instead of waiting forever."""
    w, x = random_qtensor("Q4_0", 256, 256, rng), jnp.ones((64, 256), jnp.float32)
    t = tiling_for("Q4_0", 2048, 4096, 4096)
    assert t.compute_wgs == 2
    default = functools.partial(mosaic_gpu._default_tiling, "Q4_0", 2048, 4096, 4096, jnp.float32)
    assert default(plgpu.InterpretGPUParams()).compute_wgs == 1
    assert default(None) == t  # compiled: as chosen
    t = dataclasses.replace(tiling_for("Q4_0", 64, 256, 256), compute_wgs=2)
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
        gemm(x, w, compute_dtype=BF16, tiling=t, interpret=True)


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
    with pytest.raises(ValueError, match="compute_wgs"):
        MosaicGpuTiling(compute_wgs=3).check("Q4_0")
    with pytest.raises(ValueError, match="w_buffers"):
        MosaicGpuTiling(w_buffers=0).check("Q4_0")
    with pytest.raises(ValueError, match="TMA"):
        MosaicGpuTiling(block_n=256, compute_wgs=2).check("Q4_0")  # 512 rows in one copy
    with pytest.raises(ValueError, match="registers"):
        MosaicGpuTiling(block_m=128, block_n=256).check("Q4_0")  # 256 accumulator registers a thread
    with pytest.raises(TypeError):
        MosaicGpuTiling(128)  # keyword-only
    w = random_qtensor("Q8_0", 128, 512, np.random.default_rng(0))
    with pytest.raises(ValueError, match="shared memory"):
        gemm(jnp.ones((128, 512), jnp.bfloat16), w, tiling=MosaicGpuTiling(block_m=128, max_concurrent_steps=4,
                                                                            w_buffers=2))


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
