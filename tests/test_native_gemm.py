"""realm_jax.native's bf16 gemm (gemm.cc): prefill's matmul on CPU, on weights packed in panels of 64 rows
(`gemm`), or on a weight's quantized planes dequantized one panel at a time (`qgemm`).

Checked against a float64 matmul of the bf16-rounded operands, in the AVX512_BF16 build (where the CPU has
it) and the portable scalar build, for row counts around the 6-row tiles and weights whose row count is
not a multiple of the 64-row panels; `qgemm`'s bf16 product against `gemm` on the dense bf16 weight, bit
for bit, in every format; its int8 product (gemm_i8.h) against float64 on x as `quantize_x8` quantizes it
and the exactly dequantized weight."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax import native
from realm_jax.errors import ArgumentError, ShapeMismatchError
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
    check_glu(m, f, k, activation, portable, rng)


def check_glu(m, f, k, activation, portable, rng):
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


@pytest.mark.skipif(not native.gemm_amx(), reason="no AMX-BF16 here (or the tile state not granted, or "
                                                "REALM_JAX_NATIVE_AMX=0): the AVX512_BF16 tiles, tested above")
@pytest.mark.parametrize("amx", ["0", "1"])
def test_amx_tiles_and_the_avx512_ones_both_match_float64(amx, monkeypatch, rng):
    """On a CPU with AMX-BF16 the bf16 product runs on its tiles (16 rows of x a block), unless
    REALM_JAX_NATIVE_AMX=0 keeps the AVX512_BF16 tiles: both against float64, for rows around a block of 16
    and panels cut short, plain, with the GLU's epilogue and from quantized planes."""
    monkeypatch.setenv("REALM_JAX_NATIVE_AMX", amx)
    assert native.gemm_amx() == (amx == "1")
    for m, n, k in ((1, 64, 32), (17, 70, 96), (33, 130, 512)):
        check(jnp.asarray(rng.standard_normal((m, k)), jnp.float32),
              jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.float32))
    check_glu(19, 128, 64, "silu", False, rng)
    w = random_qtensor("Q4_K", 70, 512, rng)
    x = jnp.asarray(rng.standard_normal((21, 512)), jnp.bfloat16)
    y = jax.jit(lambda x, w: native.qgemm(x, w, out_dtype=jnp.float32))(x, w)
    dense = to_dense(w, jnp.bfloat16).planes["w"].reshape(w.shape)
    assert_matmul_close(y, x, dense, compute_dtype=jnp.float32, out_dtype=jnp.float32)


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
    got = jax.jit(lambda x, w: native.qgemm(x, w, out_dtype=jnp.float32, portable=portable, int8=False))(x, qt)
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
    f = jax.jit(lambda x, w, i: native.qgemm(x, w, layer=i, glu=activation, portable=portable, int8=False))
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
        jax.block_until_ready(call(x, jnp.int32(0), *planes[:-1], fmt=fmt, act=np.int64(0), int8=np.int64(0)))
    with pytest.raises(Exception, match="layer index is outside"):
        jax.block_until_ready(call(x, jnp.int32(1), *planes, fmt=fmt, act=np.int64(0), int8=np.int64(0)))
    with pytest.raises(Exception, match="unknown format"):
        jax.block_until_ready(call(x, jnp.int32(0), *planes, fmt=np.int64(99), act=np.int64(0), int8=np.int64(0)))
    with pytest.raises(Exception, match="with an activation bf16"):
        jax.block_until_ready(call(x, jnp.int32(0), *planes, fmt=fmt, act=np.int64(1), int8=np.int64(0)))
    with pytest.raises(Exception, match="int8 must be 0 or 1"):
        jax.block_until_ready(call(x, jnp.int32(0), *planes, fmt=fmt, act=np.int64(0), int8=np.int64(2)))
    q3 = random_qtensor("Q3_K", 192, 256, rng)
    with pytest.raises(Exception, match="no int8 path"):
        jax.block_until_ready(call(x, jnp.int32(0), *[q3.planes[p.name] for p in q3.format.planes],
                                   fmt=np.int64(native.FORMAT_IDS["Q3_K"]), act=np.int64(0), int8=np.int64(1)))


INT8 = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
needs_int8 = pytest.mark.skipif(not native.available() or not native.int8_formats(),
                                reason="no int8 prefill here (it needs AVX512_VNNI and AVX512_BF16)")


def dense64(qt) -> np.ndarray:
    return np.asarray(to_dense(qt, jnp.float32).planes["w"].reshape(qt.shape), np.float64)


@needs_int8
@pytest.mark.parametrize("fmt", INT8)
@pytest.mark.parametrize("m,n,k", [(13, 70, 256), (2, 64, 96), (7, 130, 512)])
def test_qgemm_int8_against_quantized_x(fmt, m, n, k, rng):
    """The int8 product is the f32 product of the exactly dequantized weight with x quantized per group of
    32 (`quantize_x8`): tiles of 3 rows and their remainders, a partial last panel, an odd count of groups."""
    if fmt.endswith("_K") and k % 256:
        k = 256
    qt = random_qtensor(fmt, n, k, rng)
    x = jnp.asarray(rng.standard_normal((m, k)) * 3, jnp.float32)
    got = jax.jit(lambda x, w: native.qgemm(x, w, out_dtype=jnp.float32, int8=True))(x, qt)
    xq = native.quantize_x8(x)
    assert_matmul_close(got, xq, dense64(qt), compute_dtype=jnp.float32, out_dtype=jnp.float32)
    assert not np.array_equal(np.asarray(xq), np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32)))


@needs_int8
@pytest.mark.parametrize("fmt,activation", [("Q4_K", "silu"), ("Q5_0", "gelu_tanh"), ("Q6_K", "silu")])
def test_qgemm_int8_glu_and_a_layer_of_a_stack(fmt, activation, rng):
    qts = [random_qtensor(fmt, 256, 512, rng) for _ in range(2)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *qts)
    x = jnp.asarray(rng.standard_normal((10, 512)), jnp.float32)
    f = jax.jit(lambda x, w, i: native.qgemm(x, w, layer=i, glu=activation, int8=True))
    act = {"silu": jax.nn.silu, "gelu_tanh": lambda g: jax.nn.gelu(g, approximate=True)}[activation]
    for i, qt in enumerate(qts):
        y = native.quantize_x8(x).astype(np.float64) @ dense64(qt).T
        want = np.asarray(act(jnp.asarray(y[:, :128])), np.float64) * y[:, 128:]
        got = np.asarray(f(x, stacked, jnp.int32(i)).astype(jnp.float32), np.float64)
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


@needs_int8
def test_qgemm_int8_zero_and_non_finite_rows(rng):
    """A row of zeros (or of values too small for 1 / d) gives zeros; a NaN or an infinity in a row makes
    that row NaN (never a finite wrong value), and the other rows keep their values."""
    qt = random_qtensor("Q4_0", 64, 128, rng)
    x = np.asarray(rng.standard_normal((5, 128)), np.float32)
    x[1] = 0
    x[2, 5] = np.nan
    x[3, 100] = np.inf
    x[4] = 2e-38  # max|x| / 127 has no finite inverse: codes 0, as numpy's reference says
    got = np.asarray(jax.jit(lambda x, w: native.qgemm(x, w, out_dtype=jnp.float32, int8=True))(jnp.asarray(x), qt))
    assert np.all(got[1] == 0) and np.all(np.isnan(got[2])) and np.all(np.isnan(got[3]))
    assert np.all(got[4] == 0) and np.all(native.quantize_x8(x[4:]) == 0)
    assert np.allclose(got[0], native.quantize_x8(x[:1]).astype(np.float64) @ dense64(qt).T, rtol=1e-4, atol=1e-3)


def test_int8_choice_and_its_errors(rng, monkeypatch):
    flags = open("/proc/cpuinfo").read().split()
    vnni = native.gemm_available() and "avx512_vnni" in flags and "avx512vl" in flags
    assert native.int8_formats() == (frozenset(INT8) if vnni else frozenset())
    monkeypatch.delenv("REALM_JAX_NATIVE_PREFILL", raising=False)
    assert not native.int8_prefill("Q4_0")  # bf16 unless asked
    qt = random_qtensor("Q3_K", 64, 256, rng)
    assert not native.int8_prefill("Q3_K")
    with pytest.raises(ValueError, match="no int8 product for Q3_K"):
        native.qgemm(jnp.zeros((3, 256)), qt, int8=True)
    monkeypatch.setenv("REALM_JAX_NATIVE_PREFILL", "bf16")
    assert not native.int8_prefill("Q4_0")
    monkeypatch.setenv("REALM_JAX_NATIVE_PREFILL", "int4")
    with pytest.raises(ArgumentError, match="REALM_JAX_NATIVE_PREFILL=.int4."):
        native.int8_prefill("Q4_0")
    monkeypatch.setenv("REALM_JAX_NATIVE_PREFILL", "int8")
    assert native.int8_prefill("Q4_0") == vnni and not native.int8_prefill("Q3_K")
    x = jnp.asarray(rng.standard_normal((5, 256)), jnp.float32)
    q4 = random_qtensor("Q4_0", 64, 256, rng)
    chosen = jax.jit(lambda x, w: native.qgemm(x, w, out_dtype=jnp.float32))(x, q4)
    asked = jax.jit(lambda x, w: native.qgemm(x, w, out_dtype=jnp.float32, int8=vnni))(x, q4)
    np.testing.assert_array_equal(np.asarray(chosen), np.asarray(asked))
    with pytest.raises(ShapeMismatchError, match="multiple of 32"):
        native.quantize_x8(np.zeros((2, 40)))


F32_BUILDS = [(fmt, False) for fmt in native.FORMAT_IDS] + [(fmt, True) for fmt in ("Q4_1", "Q6_K", "IQ2_XS", "F16")]


@pytest.mark.parametrize("fmt,portable", F32_BUILDS,
                         ids=[f"{f}-{'portable' if p else 'vector'}" for f, p in F32_BUILDS])
def test_qgemm_f32_against_float64(fmt, portable, rng):
    """The f32 gemm on the planes (gemm_f32.h) is the f32 product of the exactly dequantized weight: every
    format, a partial last panel and tiles of 6 rows with a remainder."""
    qt = random_qtensor(fmt, 70, 256, rng)
    x = jnp.asarray(rng.standard_normal((13, 256)), jnp.float32)
    got = jax.jit(lambda x, w: native.qgemm_f32(x, w, portable=portable))(x, qt)
    assert_matmul_close(got, x, dense64(qt), compute_dtype=jnp.float32, out_dtype=jnp.float32)


@pytest.mark.parametrize("portable", BUILDS)
def test_qgemm_f32_a_layer_of_a_stack_and_bad_operands(portable, rng):
    qts = [random_qtensor("Q5_0", 130, 96, rng) for _ in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *qts)
    x = jnp.asarray(rng.standard_normal((2, 5, 96)), jnp.float32)
    f = jax.jit(lambda x, w, i: native.qgemm_f32(x, w, layer=i, portable=portable))
    for i, qt in enumerate(qts):
        got = f(x, stacked, jnp.int32(i))
        assert got.shape == (2, 5, 130)
        assert_matmul_close(got, x, dense64(qt), compute_dtype=jnp.float32, out_dtype=jnp.float32)
    with pytest.raises(ShapeMismatchError, match="must end in K=96"):
        native.qgemm_f32(jnp.zeros((3, 64)), qts[0])
    call = jax.ffi.ffi_call("realm_gemm_q_f32", jax.ShapeDtypeStruct((3, 130), jnp.float32))
    planes = [stacked.planes[p.name] for p in stacked.format.planes]
    with pytest.raises(Exception, match="layer index is outside"):
        jax.block_until_ready(call(jnp.zeros((3, 96)), jnp.int32(3), *planes, fmt=np.int64(native.FORMAT_IDS["Q5_0"])))
    with pytest.raises(Exception, match="unknown format"):
        jax.block_until_ready(call(jnp.zeros((3, 96)), jnp.int32(0), *planes, fmt=np.int64(99)))
