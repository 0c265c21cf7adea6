"""realm_jax.native's bf16 gemm (gemm.cc): prefill's matmul on CPU, on weights packed in panels of 64 rows.

Checked against a float64 matmul of the bf16-rounded operands, in the AVX512_BF16 build (where the CPU has
it) and the portable scalar build, for row counts around the 6-row tiles and weights whose row count is
not a multiple of the 64-row panels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import realm_jax
from realm_jax import native
from realm_jax.errors import ShapeMismatchError
from realm_jax.native import NativeWeight
from realm_jax.quant import dequantize, to_dense
from helpers import matmul_tolerance, random_qtensor

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.reason()}")

BUILDS = [pytest.param(False, id="vector"), pytest.param(True, id="portable")]


def rms(a) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(a, np.float64)))))


def bf16_f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def check(x, w, portable=False):
    """native.gemm(x, pack_panels(w)) against float64 on the bf16-rounded operands."""
    y = jax.jit(lambda x, p: native.gemm(x, p, w.shape[0], out_dtype=jnp.float32, portable=portable))(
        x, native.pack_panels(w))
    assert y.shape == (*x.shape[:-1], w.shape[0]) and y.dtype == jnp.float32
    want = bf16_f64(x) @ bf16_f64(w).T
    if not want.size:
        return
    # Products of two bf16 are exact in f32: only the f32 accumulation separates kernel and reference.
    tol = matmul_tolerance(jnp.float32, w.shape[1], rms(bf16_f64(x)), rms(bf16_f64(w)))
    err = float(np.max(np.abs(np.asarray(y, np.float64) - want)))
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g}"


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


@pytest.mark.parametrize("sizes", [(128, 64, 64), (100, 30, 70)], ids=["whole-panels", "partial-panels"])
def test_concat_rows_keeps_the_panels_right(sizes, rng):
    """Fused q|k|v: panels concatenate as they are when the parts fill whole panels, else are repacked."""
    qts = [random_qtensor("Q8_0", n, 64, rng) for n in sizes]
    ws = [NativeWeight(q, panels=native.pack_panels(dequantize(q, jnp.bfloat16))) for q in qts]
    fused = NativeWeight.concat_rows(ws)
    want = jnp.concatenate([dequantize(q, jnp.bfloat16) for q in qts])
    np.testing.assert_array_equal(np.asarray(native.unpack_panels(fused.panels, sum(sizes))), np.asarray(want))
    assert fused.shape == (sum(sizes), 64) and fused.nbytes > fused.packed.nbytes


@pytest.mark.parametrize("rows", [native.MAX_ROWS, native.MAX_ROWS + 1, 40])
def test_qmatmul_takes_the_gemm_past_max_rows(rows, rng):
    """A NativeWeight with panels: the decode kernel up to MAX_ROWS rows, the gemm past it under a bf16
    compute dtype (XLA's dot on the unpacked weight under f32: the panels hold bf16 values)."""
    if not native.gemm_available():
        pytest.skip("this CPU has no AVX512_BF16: load() keeps a dense copy instead of panels")
    qt = random_qtensor("Q4_K", 100, 256, rng)
    w = NativeWeight(qt, panels=native.pack_panels(dequantize(qt, jnp.bfloat16)))
    x = jnp.asarray(rng.standard_normal((rows, 256)), jnp.float32)
    f = jax.jit(lambda x, w: realm_jax.qmatmul(x, w, compute_dtype=jnp.bfloat16, out_dtype=jnp.float32))
    text = f.lower(x, w).as_text()
    assert ("realm_gemm_bf16" in text) == (rows > native.MAX_ROWS)
    want = bf16_f64(x) @ np.asarray(dequantize(qt), np.float64).T
    tol = matmul_tolerance(jnp.bfloat16, 256, rms(x), rms(dequantize(qt)))
    assert float(np.max(np.abs(np.asarray(f(x, w)) - want))) <= tol


def test_load_uses_panels_under_bf16_only(smollm2_path):
    """load(): bf16 panels (no dense copy) for prefill under the bf16 policy, a dense copy under f32; the
    prefill runs the gemm and gives the XLA path's logits."""
    if not native.gemm_available():
        pytest.skip("this CPU has no AVX512_BF16: load() keeps a dense copy instead of panels")
    a = realm_jax.load(smollm2_path, impl="native", policy="bf16")
    layer = a.params["layers"][0].params["wqkv"]
    assert layer.panels is not None and layer.dense is None and layer.panels.dtype == jnp.bfloat16
    assert "realm_gemm_bf16" in a.compiled_text("prefill", prompt_tokens=16)
    f32 = realm_jax.load(smollm2_path, impl="native", policy="f32").params["layers"][0].params["wqkv"]
    assert f32.panels is None and f32.dense is not None
    b = realm_jax.load(smollm2_path, impl="xla", policy="bf16")
    ids = a.tokenizer.encode("Panels of sixty-four rows, read in place by the gemm while the layers scan.")
    la, lb = a.logits(ids), b.logits(ids)
    assert np.max(np.abs(la - lb)) < 0.05 * np.max(np.abs(lb))
    assert (la.argmax(-1) == lb.argmax(-1)).mean() >= 0.9


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


@pytest.mark.parametrize("activation", list(native.GLU_ACTS))
def test_ops_glu_native_and_xla_agree(activation, rng):
    """ops.glu on a NativeWeight with panels (the epilogue, past MAX_ROWS rows) and on the dense weight
    (XLA: split, activation, product) give the same hidden activations to bf16 rounding."""
    if not native.gemm_available():
        pytest.skip("this CPU has no AVX512_BF16: load() keeps a dense copy instead of panels")
    import realm_jax.ops as ops

    qt = random_qtensor("Q4_K", 256, 256, rng)
    dense = to_dense(qt, jnp.bfloat16)
    w = NativeWeight(qt, panels=native.pack_panels(dense.planes["w"]))
    x = jnp.asarray(rng.standard_normal((24, 256)), jnp.bfloat16)
    fast = jax.jit(lambda x, w: ops.glu(x, w, activation))
    assert "realm_gemm_glu_bf16" in fast.lower(x, w).as_text()
    slow = ops.glu(x, dense, activation, impl="xla")
    a, b = np.asarray(fast(x, w), np.float64), np.asarray(slow, np.float64)
    np.testing.assert_allclose(a, b, rtol=2**-7, atol=2**-7 * float(np.max(np.abs(b))) * 0.05)
    with pytest.raises(ValueError, match="activation"):
        ops.glu(x, dense, "relu")


@pytest.mark.parametrize("kv,window", [(1, 0), (2, 5)])
def test_attention_products_on_the_gemm(kv, window, rng):
    """ops.attention(impl="native") runs prefill's two products on the gemm (keys and values packed per
    batch row and kv head) and agrees with XLA's dots; decode-sized queries stay on XLA."""
    if not native.gemm_available():
        pytest.skip("this CPU has no AVX512_BF16")
    from realm_jax import ops

    b, t, n, h, s = 2, 12, 4, 32, 16
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in
               ((b, t, n, h), (b, s, kv, h), (b, s, kv, h)))
    pos = jnp.asarray(np.tile(np.arange(t), (b, 1)) + np.array([[0], [4]]), jnp.int32)
    f = jax.jit(lambda q, k, v, p, impl: ops.attention(q, k, v, p, scale=0.2, window=window, local=True, impl=impl),
                static_argnames="impl")
    assert "realm_gemm_bf16" in f.lower(q, k, v, pos, impl="native").as_text()
    assert "realm_gemm_bf16" not in f.lower(q[:, :1], k, v, pos[:, :1], impl="native").as_text()
    many = jnp.tile(q[:, :1], (1, 1, 4, 1))  # one query, 16 heads a kv head: a decode step stays on XLA
    assert "realm_gemm_bf16" not in f.lower(many, k, v, pos[:, :1], impl="native").as_text()
    a, want = np.asarray(f(q, k, v, pos, impl="native"), np.float32), np.asarray(f(q, k, v, pos, impl="xla"), np.float32)
    np.testing.assert_allclose(a, want, rtol=0.02, atol=0.02)
