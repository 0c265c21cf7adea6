"""The Pallas Triton backend (`realm_jax.linear.triton`, kernels in `pallas_kernels.triton`): the shared
cases in interpret mode on CPU, lowering for CUDA (an abstract H100) at real shapes, its tile rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_kernels import DECODE_ROWS, choose_tiling, triton
from realm_jax.quant import dequantize, get_format
from helpers import assert_matmul_close, random_qtensor
from linear_base import F32, LinearTests, LoweringTests, tiling_grid

H100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                                                     platform="gpu"))


class TestTritonInterpret(LinearTests):
    BACKEND = "triton"
    ROWS = (1, 7, DECODE_ROWS, DECODE_ROWS + 1, 64)  # the GEMV up to DECODE_ROWS rows, a dot at 16 exactly


class TestTritonLowering(LoweringTests):
    BACKEND = "triton"
    CUSTOM_CALLS = ("__gpu$xla.gpu.triton",)

    def lower(self, fn, x, w) -> str:
        with use_abstract_mesh(H100):
            return jax.jit(fn).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()


def test_explicit_tiling_of_k(rng):
    w = random_qtensor("Q8_0", 130, 640, rng)  # K tiles of 128
    x = jnp.asarray(rng.standard_normal((3, 640)), jnp.float32)
    y = triton.matmul(x, w, tiling=choose_tiling("triton", "Q8_0", 3, 130, 640), compute_dtype=F32, out_dtype=F32,
                      interpret=True)
    assert_matmul_close(y, x, dequantize(w), compute_dtype=F32, out_dtype=F32)


def test_tiling_heuristic_obeys_the_tile_rules():
    for fmt, block, m, n, k in tiling_grid():
        if k % block:
            continue
        g = choose_tiling("triton", fmt, m, n, k)
        for size in (g.block_m, g.block_n, g.block_k):
            assert size & (size - 1) == 0, g
        assert k % g.block_k == 0 and g.block_k % block == 0
        for p in get_format(fmt).planes:  # each plane's tile width is a power of two too
            width = g.block_k // block * p.count
            assert width & (width - 1) == 0, (fmt, p.name, g)
