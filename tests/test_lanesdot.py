"""The block-dot GEMM on the lanes (`pallas_kernels.lanesdot`: the `triton` backend's "dot" path for Q4_K,
Q5_K and Q6_K), in interpret mode on CPU: its arithmetic exactly where x is exact in f16, x of any
magnitude, rows of x from 1 to 16 and ragged N, a layer of a stack read in place, its tiling at an 8B
llama's shapes, bad arguments, the backend's routes to it, and its lowering for CUDA (an abstract H100).
The shared backend cases (tests/test_linear_triton.py) run it through `linear.matmul`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_kernels import lanesdot
from pallas_kernels.decode_layout import to_lanes
from realm_jax import linear
from realm_jax.errors import ShapeMismatchError, UnsupportedFormatError
from realm_jax.linear.triton import DOT_FROM, TRITON
from realm_jax.precision import Policy
from realm_jax.quant import QTensor, dequantize, get_format
from helpers import assert_matmul_close, random_qtensor

H100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                                                     platform="gpu"))
SHAPES_8B = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))


@pytest.mark.parametrize("fmt,m", [("Q4_K", 3), ("Q5_K", 16), ("Q6_K", 16), ("Q6_K", 3)])
def test_arithmetic_is_exact_where_x_is(fmt, m, rng):
    """x exact in f16 after each row's power-of-two scale (integers below 2^11 times a power of two from
    2^-40 to 2^40 a row): the product is the float64 one up to the f32 accumulators and the offsets' ~22
    bits, whatever each row's magnitude, for every format (the fifth and sixth bits from their H words);
    the padding rows of the lanes come out zero."""
    n, k = 130, 768
    w = random_qtensor(fmt, n, k, rng)
    x = rng.integers(-2047, 2048, (m, k)).astype(np.float64) * 2.0 ** rng.integers(-40, 40, (m, 1))
    y = np.asarray(lanesdot.gemm(jnp.asarray(x, jnp.float32), jax.jit(to_lanes)(w), fmt=fmt, interpret=True))
    want = x @ np.asarray(dequantize(w), np.float64).T
    assert y.shape == (m, 256)
    np.testing.assert_array_equal(y[:, n:], 0.0)
    err = np.abs(y[:, :n] - want).max(axis=1) / np.abs(want).max(axis=1)
    assert err.max() <= 4e-5, err


@pytest.mark.parametrize("fmt,m,n,k", [("Q4_K", 1, 64, 256), ("Q5_K", 5, 300, 512), ("Q6_K", 9, 128, 1024)])
def test_rows_of_x_and_ragged_n(fmt, m, n, k, rng):
    """Any rows of x up to 16 (8 or 16 a program, the padding not stored) and N off the tiles: within
    4e-5 of the product of x rounded to f16 (after its row's scale) with the exact weight, and within the
    reference's tolerance of the bf16 product."""
    w = random_qtensor(fmt, n, k, rng)
    x = rng.standard_normal((m, k)) * 3.0
    y = np.asarray(lanesdot.gemm(jnp.asarray(x, jnp.float32), to_lanes(w), fmt=fmt, interpret=True))[:, :n]
    scale = 2.0 ** (14 - np.floor(np.log2(np.abs(x).max(axis=1, keepdims=True))))
    x16 = (x * scale).astype(np.float16).astype(np.float64) / scale
    want = x16 @ np.asarray(dequantize(w), np.float64).T
    assert np.abs(y - want).max() <= 4e-5 * np.abs(want).max()
    assert_matmul_close(jnp.asarray(y), jnp.asarray(x, jnp.bfloat16), dequantize(w).astype(jnp.bfloat16),
                        compute_dtype=jnp.bfloat16, out_dtype=jnp.float32)


def test_rows_of_zeros_and_huge_rows(rng):
    """A row of zeros gives zeros; rows past f16's range (1e30) and of tiny values (1e-30) are scaled into
    it and come back at their own magnitude; an inf makes its row NaN."""
    n, k = 128, 256
    w = random_qtensor("Q4_K", n, k, rng)
    x = rng.standard_normal((4, k))
    x[0] = 0.0
    x[1] *= 1e30
    x[2] *= 1e-30
    x[3, 7] = np.inf
    y = np.asarray(lanesdot.gemm(jnp.asarray(x, jnp.float32), to_lanes(w), fmt="Q4_K", interpret=True))
    want = x[:3] @ np.asarray(dequantize(w), np.float64).T
    assert np.all(np.isfinite(y[:3])) and np.all(y[0] == 0.0) and np.all(np.isnan(y[3]))
    for r in (1, 2):
        assert np.abs(y[r, :n] - want[r]).max() <= 2e-3 * np.abs(want[r]).max()


@pytest.mark.parametrize("fmt", ["Q4_K", "Q6_K"])
def test_a_layer_of_a_stack_in_place(fmt, rng):
    """With `layer`, the kernel multiplies that layer of stacked lanes, as the layer's own lanes (the same
    program on the same bytes: equal results), with K split over programs; unrolled chunks (Q4_K) or a
    loop over them (Q6_K)."""
    ws = [random_qtensor(fmt, 128, 1024, rng) for _ in range(3)]
    stack = jax.tree.map(lambda *a: jnp.stack(a), *[to_lanes(w) for w in ws])
    x = jnp.asarray(rng.standard_normal((6, 1024)), jnp.float32)
    t = lanesdot.DotTiling(rows=64, splits=2, x_rows=8)
    for i, w in enumerate(ws):
        one = lanesdot.gemm(x, to_lanes(w), fmt=fmt, tiling=t, interpret=True)
        both = lanesdot.gemm(x, stack, fmt=fmt, layer=jnp.int32(i), tiling=t, interpret=True)
        np.testing.assert_array_equal(np.asarray(both), np.asarray(one))


def test_tiling_fills_the_gpu_at_the_8b_shapes():
    """Two programs an SM at an 8B llama's shapes (the k/v projection in 32-row programs, a unit each: 512);
    the splits divide the units; two warps a program; 128 rows a program at 8 rows of x, 64 at 16 and for
    Q6_K."""
    for fmt in lanesdot.FORMATS:
        for m in (1, 8, 16):
            for n, k in SHAPES_8B:
                t = lanesdot.tiling_for(fmt, n, k, m)
                units = k // 256
                assert n % t.rows == 0 and units % t.splits == 0 and t.x_rows == (8 if m <= 8 else 16), t
                assert t.num_warps == 2 and n // t.rows * t.splits >= 2 * 132, (fmt, m, n, k, t)
                want = 32 if n == 1024 else 128 if m <= 8 and fmt != "Q6_K" else 64
                assert t.rows == want, (fmt, m, n, k, t)


def test_bad_arguments(rng):
    w = random_qtensor("Q4_K", 128, 256, rng)
    lanes = to_lanes(w)
    with pytest.raises(ShapeMismatchError, match="1 to 16 rows"):
        lanesdot.gemm(jnp.ones((17, 256)), lanes, fmt="Q4_K", interpret=True)
    with pytest.raises(ShapeMismatchError, match="against Q4_K lanes"):
        lanesdot.gemm(jnp.ones((1, 512)), lanes, fmt="Q4_K", interpret=True)
    with pytest.raises(ShapeMismatchError, match="a stack"):
        lanesdot.gemm(jnp.ones((1, 256)), lanes, fmt="Q4_K", layer=0, interpret=True)
    with pytest.raises(ShapeMismatchError, match="does not divide"):
        lanesdot.gemm(jnp.ones((1, 256)), lanes, fmt="Q4_K", tiling=lanesdot.DotTiling(rows=96), interpret=True)
    with pytest.raises(UnsupportedFormatError, match="Q8_0 has no kernel"):
        lanesdot.gemm(jnp.ones((1, 256)), lanes, fmt="Q8_0", interpret=True)


def test_the_backend_routes_rows_to_it(rng):
    """Without a measured route, the triton backend takes the rows of Q4_K, Q5_K and Q6_K from DOT_FROM to 16
    to the block-dot GEMM (the GEMV below, the tensor-core GEMM past them); formats without it keep the GEMV
    and the GEMM; through `linear.matmul` its product matches the reference."""
    for fmt in lanesdot.FORMATS:
        assert [TRITON.path(fmt, m, jnp.bfloat16) for m in (1, DOT_FROM - 1, DOT_FROM, 16, 17)] == [
            "gemv", "gemv", "dot", "dot", "mma"]
    assert TRITON.path("Q8_0", DOT_FROM, jnp.bfloat16) == "gemv" and TRITON.path("Q4_K", 8, jnp.float32) == "xla"
    assert TRITON.serves("dot", "Q4_K", 16) and not TRITON.serves("dot", "Q4_K", 17)
    assert not TRITON.serves("dot", "Q8_0") and TRITON.serves("mma", "Q8_0", 64)
    w = random_qtensor("Q6_K", 100, 512, rng)
    x = jnp.asarray(rng.standard_normal((7, 512)), jnp.bfloat16)
    prepared = linear.prepare(w, Policy.of("bf16"), impl="triton")
    assert "block-dot GEMM" in linear.describe(prepared)
    y = linear.matmul(x, prepared, compute_dtype=jnp.bfloat16, out_dtype=jnp.float32)
    assert y.shape == (7, 100)
    assert_matmul_close(y, x, dequantize(w).astype(jnp.bfloat16), compute_dtype=jnp.bfloat16, out_dtype=jnp.float32)


@pytest.mark.parametrize("fmt,m,shape", [("Q4_K", 8, (4096, 4096)), ("Q5_K", 16, (1024, 4096)),
                                         ("Q6_K", 16, (14336, 4096))])
def test_lowers_for_cuda(fmt, m, shape):
    """The kernel lowers for an abstract H100 at an 8B llama's shapes, one Triton call (tests/
    test_kernel_report.py checks that no weight is copied on the way)."""
    n, k = shape
    f = get_format(fmt)
    qt = QTensor(fmt, (n, k), {p.name: jax.ShapeDtypeStruct((n, k // f.block_size * p.count), p.dtype)
                               for p in f.planes})
    planes = jax.eval_shape(to_lanes, qt)
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    with use_abstract_mesh(H100):
        text = jax.jit(lambda x, p: lanesdot.gemm(x, p, fmt=fmt)).trace(x, planes).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
