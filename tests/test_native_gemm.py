"""realm_jax.native's bf16 gemm (gemm.cc): prefill's matmul on CPU, on weights packed in panels of 64 rows
(`gemm`), or on a weight's quantized planes dequantized one panel at a time (`qgemm`).

Checked against a float64 matmul of the bf16-rounded operands, in the AVX512_BF16 build (where the CPU has
it) and the portable scalar build, for row counts around the 6-row tiles and weights whose row count is
not a multiple of the 64-row panels; `qgemm` against `gemm` on the dense bf16 weight, bit for bit, in
every format."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax import native
from realm_jax.errors import ShapeMismatchError
from realm_jax.quant import to_dense
from helpers import assert_matmul_close, matmul_tolerance, random_qtensor, rms

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.reason()}")

BUILDS = [pytest.param(False, id="vector"), pytest.param(True, id="portable")]


def bf16_f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def check(x, w, portable=False):
    """native.gemm(x, pack_panels(w)) against float64 on the bf16-rounded operands."""
    y = jax.jit(lambda x, p: native.gemm(x, p, w.shape[0], out_dtype=jnp.float32, portable=portable))(
        x, native.pack_panels(w))
    # Products of two bf16 are exact in f32: only the f32 accumulation separates kernel and reference.
    assert_matmul_close(y, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), compute_dtype=jnp.float32,
                        out_dtype=jnp.float32)


@pytest.mark.parametrize("portable", BUILDS)
@pytest.mark.parametrize("m,n,k", [(1, 64, 32), (5, 70, 64), (6, 128, 256), (7, 37, 512), (13, 200, 96),
                                   (130, 640, 256), (9, 1, 2), (0, 64, 64)])
def test_matches_float64(m, n, k, portable, rng):
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.float32)
    check(x, w, portable)


def test_batched_leading_axes_and_out_dtype(rng):
    x = jnp.asarray(rng.standard_normal((2, 11, 128)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((100, 128)), jnp.bfloat16)
    y = native.gemm(x, native.pack_panels(w), 100)
    assert y.shape == (2, 11, 100) and y.dtype == jnp.bfloat16
    want = bf16_f64(x.reshape(22, 128)) @ bf16_f64(w).T
    np.testing.assert_allclose(np.asarray(y, np.float64).reshape(22, 100), want, rtol=1e-2, atol=0.05)


def test_builds_report_their_path():
    flags = open("/proc/cpuinfo").read()
    assert native.gemm_available() == (" avx512_bf16 " in flags or "avx512_bf16\n" in flags)


def test_pack_and_unpack(rng):
    w = jnp.asarray(rng.standard_normal((70, 10)), jnp.bfloat16)
    p = native.pack_panels(w)
    assert p.shape == (2, 5, native.PANEL, 2) and p.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(p[0, 3, 7]), np.asarray(w[7, 6:8]))  # pair 3 of row 7
    np.testing.assert_array_equal(np.asarray(p[1, :, 6:]), 0)  # rows past N are zero
    np.testing.assert_array_equal(np.asarray(native.unpack_panels(p, 70)), np.asarray(w))
    with pytest.raises(ShapeMismatchError, match="K even"):
        native.pack_panels(jnp.zeros((4, 7)))


@pytest.mark.parametrize("portable", BUILDS)
def test_layer_of_a_stack_read_in_place(portable, rng):
    ws = [jnp.asarray(rng.standard_normal((90, 64)), jnp.bfloat16) for _ in range(3)]
    stacked = jnp.stack([native.pack_panels(w) for w in ws])
    x = jnp.asarray(rng.standard_normal((10, 64)), jnp.float32)
    f = jax.jit(lambda x, p, i: native.gemm(x, p, 90, layer=i, portable=portable))
    for i, w in enumerate(ws):
        np.testing.assert_array_equal(np.asarray(f(x, stacked, jnp.int32(i))),
                                      np.asarray(native.gemm(x, native.pack_panels(w), 90, portable=portable)))


def test_bad_operands_are_clear_errors(rng):
    p = native.pack_panels(jnp.zeros((70, 64), jnp.bfloat16))
    with pytest.raises(ShapeMismatchError, match=r"do not hold a weight \[70, 32\]"):
        native.gemm(jnp.zeros((3, 32)), p, 70)
    with pytest.raises(ShapeMismatchError, match=r"do not hold a weight \[200, 64\]"):
        native.gemm(jnp.zeros((3, 64)), p, 200)
    with pytest.raises(ShapeMismatchError, match="one layer of a stack"):
        native.gemm(jnp.zeros((3, 64)), p, 70, layer=0)
    with pytest.raises(ShapeMismatchError):
        native.gemm(jnp.zeros((3, 64)), p.astype(jnp.float32), 70)
    # The custom call checks what it is given: wrong shapes and an out-of-range layer are errors, not bad reads.
    call = jax.ffi.ffi_call("realm_gemm_bf16", jax.ShapeDtypeStruct((3, 70), jnp.float32))
    x = jnp.zeros((3, 64), jnp.bfloat16)
    with pytest.raises(Exception, match="w must be"):
        jax.block_until_ready(call(x, jnp.int32(0), p[:1]))
    with pytest.raises(Exception, match="layer index is outside"):
        jax.block_until_ready(call(x, jnp.int32(1), p))
    with pytest.raises(Exception, match="K must be even"):
        jax.block_until_ready(call(jnp.zeros((3, 63), jnp.bfloat16), jnp.int32(0), p))


def glu_reference(x, w, activation):
    """float64 act(x @ gate^T) * (x @ up^T) on the bf16-rounded operands."""
    gu = bf16_f64(x) @ bf16_f64(w).T
    gate, up = np.split(gu, 2, axis=-1)
    if activation == "silu":
        act = gate / (1 + np.exp(-gate))
    else:
        act = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
    return act * up, gu


@pytest.mark.parametrize("portable", BUILDS)
@pytest.mark.parametrize("activation", list(native.GLU_ACTS))
@pytest.mark.parametrize("m,f,k", [(1, 64, 32), (7, 128, 64), (13, 192, 256)])
def test_glu_epilogue_matches_float64(m, f, k, activation, portable, rng):
    """gate|up with the activation in the epilogue: act(gate) * up rounded to bf16, within the bf16
    rounding and f32 accumulation of float64 (gates up to |8|: silu's and gelu's tails are exercised)."""
    x = jnp.asarray(rng.standard_normal((m, k)) * 2, jnp.float32)
    w = jnp.asarray(rng.standard_normal((2 * f, k)) / np.sqrt(k), jnp.float32)
    y = jax.jit(lambda x, p: native.gemm(x, p, 2 * f, out_dtype=jnp.float32, glu=activation, portable=portable))(
        x, native.pack_panels(w))
    assert y.shape == (m, f)
    want, gu = glu_reference(x, w, activation)
    # f32 accumulation error of gate and up (propagated through act, whose slope is below 1.2), then
    # the rounding of the result to bf16.
    acc = matmul_tolerance(jnp.float32, k, rms(bf16_f64(x)), rms(bf16_f64(w)))
    gate, up = np.split(gu, 2, axis=-1)
    tol = acc * (1.2 * np.abs(up) + np.abs(gate) + acc) + np.abs(want) * 2.0**-8
    err = np.abs(np.asarray(y, np.float64) - want)
    assert np.all(err <= tol), f"max excess {np.max(err - tol):.3g}"


def test_glu_needs_whole_panels_and_a_known_activation(rng):
    p = native.pack_panels(jnp.zeros((192, 64), jnp.bfloat16))
    with pytest.raises(ShapeMismatchError, match="multiple of 64"):
        native.gemm(jnp.zeros((9, 64)), p, 192, glu="silu")  # halves of 96 rows
    p = native.pack_panels(jnp.zeros((256, 64), jnp.bfloat16))
    with pytest.raises(ShapeMismatchError, match="glu='relu'"):
        native.gemm(jnp.zeros((9, 64)), p, 256, glu="relu")
    call = jax.ffi.ffi_call("realm_gemm_glu_bf16", jax.ShapeDtypeStruct((9, 128), jnp.bfloat16))
    with pytest.raises(Exception, match="unknown activation"):
        jax.block_until_ready(call(jnp.zeros((9, 64), jnp.bfloat16), jnp.int32(0), p, act=np.int64(9)))


def panels_of(qt):
    """pack_panels of the weight rounded to bf16 as a dense bf16 copy holds it."""
    return native.pack_panels(to_dense(qt, jnp.bfloat16).planes["w"].reshape(qt.shape))


QGEMM_BUILDS = [(fmt, False) for fmt in native.FORMAT_IDS] + [(fmt, True) for fmt in ("Q4_1", "Q4_K", "IQ2_XS", "F16")]


@pytest.mark.parametrize("fmt,portable", QGEMM_BUILDS, ids=[f"{f}-{'portable' if p else 'vector'}" for f, p in QGEMM_BUILDS])
def test_qgemm_equals_gemm_on_the_bf16_weight(fmt, portable, rng):
    """Every format's planes, dequantized a panel at a time inside the gemm, give the product of the
    weight's bf16 copy (the same rounding, the same sums), for a partial last panel and a partial tile."""
    qt = random_qtensor(fmt, 70, 256, rng)
    x = jnp.asarray(rng.standard_normal((13, 256)), jnp.float32)
    got = jax.jit(lambda x, w: native.qgemm(x, w, out_dtype=jnp.float32, portable=portable))(x, qt)
    want = jax.jit(lambda x, p: native.gemm(x, p, 70, out_dtype=jnp.float32, portable=portable))(x, panels_of(qt))
    assert got.dtype == jnp.float32 and got.shape == (13, 70)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("portable", BUILDS)
@pytest.mark.parametrize("activation", list(native.GLU_ACTS))
def test_qgemm_glu_and_a_layer_of_a_stack(activation, portable, rng):
    """The gate|up epilogue and layer i of stacked planes, read in place, as `gemm` on that layer's panels."""
    qts = [random_qtensor("Q4_K", 256, 512, rng) for _ in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *qts)
    x = jnp.asarray(rng.standard_normal((20, 512)), jnp.float32)
    f = jax.jit(lambda x, w, i: native.qgemm(x, w, layer=i, glu=activation, portable=portable))
    for i, qt in enumerate(qts):
        want = native.gemm(x, panels_of(qt), 256, glu=activation, portable=portable)
        got = f(x, stacked, jnp.int32(i))
        assert got.shape == (20, 128)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_qgemm_bad_operands_are_clear_errors(rng):
    qt = random_qtensor("Q4_K", 192, 256, rng)
    with pytest.raises(ShapeMismatchError, match="must end in K=256"):
        native.qgemm(jnp.zeros((9, 128)), qt)
    with pytest.raises(ShapeMismatchError, match="multiple of 64"):
        native.qgemm(jnp.zeros((9, 256)), qt, glu="silu")  # halves of 96 rows
    planes = [qt.planes[p.name] for p in qt.format.planes]
    call = jax.ffi.ffi_call("realm_gemm_q", jax.ShapeDtypeStruct((9, 192), jnp.float32))
    x = jnp.zeros((9, 256), jnp.bfloat16)
    fmt = np.int64(native.FORMAT_IDS["Q4_K"])
    with pytest.raises(Exception, match="wrong number of planes"):
        jax.block_until_ready(call(x, jnp.int32(0), *planes[:-1], fmt=fmt, act=np.int64(0)))
    with pytest.raises(Exception, match="layer index is outside"):
        jax.block_until_ready(call(x, jnp.int32(1), *planes, fmt=fmt, act=np.int64(0)))
    with pytest.raises(Exception, match="unknown format"):
        jax.block_until_ready(call(x, jnp.int32(0), *planes, fmt=np.int64(99), act=np.int64(0)))
    with pytest.raises(Exception, match="with an activation bf16"):
        jax.block_until_ready(call(x, jnp.int32(0), *planes, fmt=fmt, act=np.int64(1)))
